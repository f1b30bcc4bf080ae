"""The sequential engine, shared by language and vision models and by every method tier.

1. Capture the inputs of the first block for every calibration sample, with every
   positional and keyword argument the block receives (``fqbench.engine.capture``).
2. For each block, on the accelerator, by the method's tier:
   - layer methods: for each group of the block's linears, run the block on all samples
     with taps accumulating float64 Hessians ``H = (2/N) sum x x^T`` (N = calibration
     tokens), quantize the group's linears, and put the quantized weights in place;
   - block methods: hand the block, its inputs and its full-precision outputs to the method.
3. Re-run the block with its quantized weights: its outputs are the next block's inputs.

A layer method with a bit budget (``budget_bits``) is first measured on the full-precision model
and allocated one option per layer (``fqbench.engine.planning``); step 2 then quantizes each
layer with its planned option. Model methods calibrate on the whole model instead (``quantize_model`` dispatches).
Only the current block and the activations live on the accelerator; the rest of the model
stays where it is (CPU), so the peak accelerator memory is one block plus activations.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from fqbench.engine.capture import BlockInputs, accumulate_hessians, capture_block_inputs, enter_block, run_block
from fqbench.engine.planning import Plan, plan_budget
from fqbench.finite import NonFiniteError, all_finite
from fqbench.models.adapter import Block, replace_module
from fqbench.quant.checks import proxy_error
from fqbench.quantized import QuantizedWeight, QuantLinear
from fqbench.records import LayerRecord
from fqbench.seeding import derive_seed


@dataclass
class BlockContext:
    """What a block method sees besides the block and its inputs."""

    fp_outputs: list[torch.Tensor]  # the block's full-precision outputs for every sample
    device: torch.device
    seed: int
    true_sequential: bool


class Quantized(NamedTuple):
    """The engine's result: a record per quantized linear, and (when kept) the quantized weights by full name."""

    records: list[LayerRecord]
    layers: dict[str, QuantizedWeight]


def quantize_model(model: nn.Module, adapter, samples, method, *, device, seed: int = 0,
                   true_sequential: bool = True, keep_layers: bool = False, progress: bool = True) -> Quantized:
    """Quantize ``model`` in place with any method tier: the one entry point of the pipelines."""
    if method.tier == "model":
        records, layers = method.quantize_model(model, adapter, list(samples), device=device, seed=seed,
                                                progress=progress)
        return Quantized(records, layers if keep_layers else {})
    if method.tier not in ("layer", "block"):
        raise ValueError(f"method {method.name!r} has an unknown tier {method.tier!r}")
    blocks = adapter.blocks(model)
    inputs = capture_block_inputs(model, blocks, samples, lambda m, s: adapter.run(m, s, device), device)
    return quantize_blocks(blocks, inputs, method, device=device, seed=seed, true_sequential=true_sequential,
                           keep_layers=keep_layers, progress=progress, block_kwargs=adapter.block_kwargs)


def quantize_blocks(blocks: Sequence[Block], inputs: BlockInputs, method, *, device, seed: int = 0,
                    true_sequential: bool = True, keep_layers: bool = False, progress: bool = True,
                    block_kwargs=lambda index, kwargs: kwargs) -> Quantized:
    """Quantize every block in order with a layer or block method; the next block sees this one's quantized outputs.

    ``layers`` holds every ``QuantizedWeight`` (moved to CPU) when ``keep_layers`` is set (for saving
    packed models), else it is empty. A layer method with a ``bit_budget`` is planned first.
    """
    plan = None
    if method.tier == "layer" and method.bit_budget is not None:
        plan = plan_budget(blocks, inputs, method, device=device, seed=seed, true_sequential=true_sequential,
                           progress=progress, block_kwargs=block_kwargs)
    result = Quantized([], {})
    bar = tqdm(blocks, desc=f"quantizing ({method.name})", unit="block", disable=not progress)
    for index, block in enumerate(bar):
        start = time.perf_counter()
        block, block_inputs, home = enter_block(block, index, inputs, device, block_kwargs)
        if method.tier == "block":
            context = BlockContext(run_block(block.module, block_inputs), torch.device(device), seed, true_sequential)
            records, layers = method.quantize_block(block, block_inputs, context)
        else:
            records, layers = _quantize_linears(block, block_inputs, method, seed, true_sequential, plan)
        result.records.extend(records)
        outputs = run_block(block.module, block_inputs)
        if not all(all_finite(h) for h in outputs):
            raise NonFiniteError(f"block {block.name}: its outputs have NaN/Inf values after quantizing its linears; "
                                 f"check its weights and the model dtype (float16 overflows)")
        inputs = inputs.replace_hidden(outputs)
        block.module.to(home)
        if keep_layers:
            # A weight a QuantLinear of the block holds went home with the block; the others go to the CPU.
            held = {id(m) for m in block.module.modules()}
            result.layers.update({name: layer if id(layer) in held else layer.cpu() for name, layer in layers.items()})
        bar.set_postfix(block=block.name, seconds=f"{time.perf_counter() - start:.1f}")
    return result


def _quantize_linears(block: Block, inputs: BlockInputs, method, seed: int, true_sequential: bool,
                      plan: Plan | None = None):
    records, layers = [], {}
    groups = block.groups if true_sequential else (tuple(block.linears()),)
    for group in groups:
        hessians = accumulate_hessians(block.module, group, inputs)
        for name in group:
            full_name = f"{block.name}.{name}"
            linear = block.module.get_submodule(name)
            W = linear.weight.data
            layer_method = method if plan is None else plan.method_for(full_name)
            try:
                layer = layer_method.quantize(W.float(), hessians[name], seed=derive_seed(seed, full_name))
            except (ValueError, RuntimeError) as error:  # name the layer: the method's checks see only W and H
                kind = ValueError if isinstance(error, ValueError) else RuntimeError
                raise kind(f"layer {full_name}: {error}") from error
            install(block.module, name, layer)
            record = layer_record(full_name, W, layer, hessians[name])
            if plan is not None:
                record.extra.update(plan.describe(full_name))
            records.append(record)
            layers[full_name] = layer
    return records, layers


def install(parent: nn.Module, name: str, layer: QuantizedWeight) -> None:
    """Put a quantized weight in place of the linear ``name``: as the fake-quantized weight of the
    ``nn.Linear`` when its forward is a plain matmul, else as a ``QuantLinear`` (activations quantized
    inside the weight's own space, e.g. FrameQuant's frame-space activations)."""
    linear = parent.get_submodule(name)
    if layer.quantizes_activations:
        replace_module(parent, name, QuantLinear(layer, linear.bias))
    else:
        linear.weight.data = layer.weight().to(linear.weight.dtype)


def layer_record(full_name: str, W: torch.Tensor, layer: QuantizedWeight, H: torch.Tensor) -> LayerRecord:
    info = dict(layer.info)
    return LayerRecord(
        name=full_name,
        shape=tuple(W.shape),
        proxy_error=proxy_error(W, layer.weight(), H),
        seconds=info.pop("seconds", float("nan")),
        damping=info.pop("damping", None),
        bits_per_weight=layer.bits_per_weight,
        nominal_bits=layer.nominal_bits,
        effective_redundancy=layer.effective_redundancy,
        extra={k: v for k, v in info.items() if isinstance(v, (str, int, float, bool))},
    )


def summarize(records: Sequence[LayerRecord]) -> dict:
    """Model-level honest bits: weighted by the number of weights of every quantized linear; with
    quantized activations (records whose ``extra`` has ``act_bits``), the widest activation code."""
    weights = [r.shape[0] * r.shape[1] for r in records]
    total = sum(weights)
    if total == 0:
        return {"bits_per_weight": float("nan"), "nominal_bits": float("nan"), "quantized_weights": 0}
    act_bits = [r.extra["act_bits"] for r in records if r.extra.get("act_bits") is not None]
    return {
        "bits_per_weight": sum(r.bits_per_weight * w for r, w in zip(records, weights)) / total,
        "nominal_bits": sum(r.nominal_bits * w for r, w in zip(records, weights)) / total,
        "quantized_weights": total,
        "mean_proxy_error": sum(r.proxy_error for r in records) / len(records),
        **({"act_bits": max(act_bits), "activation_quantized_layers": len(act_bits)} if act_bits else {}),
    }
