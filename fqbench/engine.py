"""The sequential engine, shared by language and vision models.

1. Capture the inputs of the first block for every calibration sample, with
   every positional and keyword argument the block receives (attention masks,
   position ids, rotary embeddings...): a pre-hook records them and stops the
   forward pass.
2. For each block, on the accelerator: for each group of its linears, run the
   block on all samples with hooks accumulating float64 Hessians
   ``H = (2/N) sum x x^T`` (N = calibration tokens), quantize the group's linears
   with the layer method, and put the quantized weights in place.
3. Re-run the block with quantized weights: its outputs are the next block's inputs.

Only the current block and the activations live on the accelerator; the rest of
the model stays where it is (CPU), so the peak accelerator memory is one block
plus activations.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from fqbench.finite import NonFiniteError, all_finite
from fqbench.methods.layers import QuantizedLayer, QuantizedLinear
from fqbench.methods.registry import Method
from fqbench.models.layout import Block
from fqbench.quant.checks import proxy_error
from fqbench.seeding import derive_seed


@dataclass
class LayerRecord:
    name: str
    shape: tuple[int, int]
    proxy_error: float
    seconds: float
    damping: float | None
    bits_per_weight: float
    nominal_bits: float
    effective_redundancy: float | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class BlockInputs:
    """The calibration activations entering a block: one (args, kwargs) per sample."""

    args: list[tuple]
    kwargs: list[dict]

    def replace_hidden(self, hidden: list[torch.Tensor]) -> "BlockInputs":
        return BlockInputs([(h, *a[1:]) for h, a in zip(hidden, self.args)], self.kwargs)


class _StopForward(Exception):
    pass


def capture_block_inputs(model: nn.Module, blocks: Sequence[Block], samples: Iterable,
                         run_model: Callable[[nn.Module, object], object], device) -> BlockInputs:
    """Run the model up to the first block for every sample and record that block's arguments.

    Everything outside the blocks is moved to ``device`` for the capture and back afterwards.
    """
    captured = BlockInputs([], [])

    def record(module, args, kwargs):
        captured.args.append(args)
        captured.kwargs.append(kwargs)
        raise _StopForward

    outside = _move_outside_blocks(model, blocks, device)
    handle = blocks[0].module.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            for sample in samples:
                try:
                    run_model(model, sample)
                except _StopForward:
                    pass
    finally:
        handle.remove()
        _restore(outside)
    if not captured.args:
        raise ValueError("no calibration samples reached the first block; is the calibration set empty?")
    return captured


def run_block(block: nn.Module, inputs: BlockInputs) -> list[torch.Tensor]:
    outputs = []
    with torch.no_grad():
        for args, kwargs in zip(inputs.args, inputs.kwargs):
            out = block(*args, **kwargs)
            outputs.append(out[0] if isinstance(out, (tuple, list)) else out)
    return outputs


def quantize_blocks(blocks: Sequence[Block], inputs: BlockInputs, method: Method, *, device, seed: int = 0,
                    true_sequential: bool = True, keep_layers: bool = False, progress: bool = True):
    """Quantize every linear of every block in order; returns ``(records, layers)``.

    ``layers`` maps full linear names to their ``QuantizedLayer`` (moved to CPU)
    when ``keep_layers`` is set (for saving packed models), else it is empty.
    """
    records: list[LayerRecord] = []
    kept: dict[str, QuantizedLayer] = {}
    bar = tqdm(blocks, desc=f"quantizing ({method.name})", unit="block", disable=not progress)
    for block in bar:
        start = time.perf_counter()
        home = next(block.module.parameters()).device
        block.module.to(device)
        groups = block.groups if true_sequential else (tuple(block.linears()),)
        for group in groups:
            hessians = accumulate_hessians(block.module, group, inputs)
            for name in group:
                full_name = f"{block.name}.{name}"
                linear = block.module.get_submodule(name)
                record, layer = _quantize_linear(block.module, name, full_name, linear, hessians[name], method, seed)
                records.append(record)
                if keep_layers:
                    kept[full_name] = layer.cpu()
        outputs = run_block(block.module, inputs)
        if not all(all_finite(h) for h in outputs):
            raise NonFiniteError(f"block {block.name}: its outputs have NaN/Inf values after quantizing its linears; "
                                 f"check its weights and the model dtype (float16 overflows)")
        inputs = inputs.replace_hidden(outputs)
        block.module.to(home)
        bar.set_postfix(block=block.name, seconds=f"{time.perf_counter() - start:.1f}")
    return records, kept


def accumulate_hessians(block: nn.Module, names: Sequence[str], inputs: BlockInputs) -> dict[str, torch.Tensor]:
    """Run the block on all samples and return ``(2/N) sum x x^T`` (float64) for each named linear."""
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(names, 0)

    def hook_for(name):
        def hook(module, args, output):
            x = args[0].reshape(-1, args[0].shape[-1]).to(torch.float64)
            if name not in sums:
                sums[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
            sums[name].addmm_(x.T, x)
            counts[name] += x.shape[0]

        return hook

    handles = [block.get_submodule(n).register_forward_hook(hook_for(n)) for n in names]
    try:
        run_block(block, inputs)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if counts[n] == 0]
    if missing:
        raise RuntimeError(f"linears {missing} were never called by their block; check the model layout")
    return {n: sums[n].mul_(2.0 / counts[n]) for n in names}


def _quantize_linear(block, name, full_name, linear, H, method: Method, seed):
    W = linear.weight.data
    try:
        layer = method.quantize(W.float(), H, seed=derive_seed(seed, full_name))
    except (ValueError, RuntimeError) as error:  # name the layer: the method's checks see only W and H
        kind = ValueError if isinstance(error, ValueError) else RuntimeError
        raise kind(f"layer {full_name}: {error}") from error
    W_hat = layer.weight()
    error = proxy_error(W, W_hat, H)
    if getattr(layer, "act_bits", None) is not None:
        # Activation quantization changes the forward pass itself: run the layer in frame space.
        _replace_module(block, name, QuantizedLinear(layer, linear.bias))
    else:
        linear.weight.data = W_hat.to(W.dtype)
    info = dict(layer.info)
    record = LayerRecord(
        name=full_name,
        shape=tuple(W.shape),
        proxy_error=error,
        seconds=info.pop("seconds", float("nan")),
        damping=info.pop("damping", None),
        bits_per_weight=layer.bits_per_weight,
        nominal_bits=layer.nominal_bits,
        effective_redundancy=info.pop("effective_redundancy", None),
        extra={k: v for k, v in info.items() if isinstance(v, (str, int, float, bool))},
    )
    return record, layer


def _replace_module(parent: nn.Module, name: str, new: nn.Module) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = parent.get_submodule(owner_name) if owner_name else parent
    setattr(owner, attr, new)


def _move_outside_blocks(model: nn.Module, blocks: Sequence[Block], device):
    """Move the tensors that do not belong to a block, in place (tied weights stay tied).

    Returns what to move back.
    """
    inside = {id(t) for b in blocks for t in [*b.module.parameters(), *b.module.buffers()]}
    moved, seen = [], set()
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in inside or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        moved.append((tensor, tensor.device))
        tensor.data = tensor.data.to(device)
    return moved


def _restore(moved) -> None:
    for tensor, device in moved:
        tensor.data = tensor.data.to(device)


def summarize(records: Sequence[LayerRecord]) -> dict:
    """Model-level honest bits: weighted by the number of weights of every quantized linear."""
    weights = [r.shape[0] * r.shape[1] for r in records]
    total = sum(weights)
    if total == 0:
        return {"bits_per_weight": float("nan"), "nominal_bits": float("nan"), "quantized_weights": 0}
    return {
        "bits_per_weight": sum(r.bits_per_weight * w for r, w in zip(records, weights)) / total,
        "nominal_bits": sum(r.nominal_bits * w for r, w in zip(records, weights)) / total,
        "quantized_weights": total,
        "mean_proxy_error": sum(r.proxy_error for r in records) / len(records),
    }
