"""Capture points of the sequential engine: a block's inputs, and the input of every linear.

- ``capture_block_inputs``: run the model up to its first block for every calibration sample
  and record that block's positional and keyword arguments (attention masks, position ids,
  rotary embeddings...); ``run_block`` replays a block on them.
- ``tap_linears``: see the input of named linears whenever their weight is used, through the
  module's own forward or through ``F.linear(x, module.weight, ...)`` called by the model
  itself (Swin V2, EVA and BEiT add the q/v biases that way): the weight is swapped for a
  tensor that reports the input of every ``F.linear`` it takes part in.
- ``accumulate_hessians``: ``H = (2/N) sum x x^T`` in float64 for named linears, through taps.
- ``enter_block``: a block on the accelerator with its inputs and its (discovered) groups of linears.
- ``discover_groups``: a block's linears in call order, grouped by shared input (q/k/v;
  gate/up), leaving out linears whose input does not depend on the block's input.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fqbench.models.adapter import Block


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


class _Tap(torch.Tensor):
    """A weight that reports the input of every ``F.linear`` it is the weight of."""

    @staticmethod
    def __new__(cls, data: torch.Tensor, report: Callable[[torch.Tensor], None]):
        tap = torch.Tensor._make_subclass(cls, data, False)
        tap._report = report
        return tap

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            if isinstance(weight, _Tap):
                weight._report(args[0] if args else kwargs["input"])
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)


@contextlib.contextmanager
def tap_linears(block: nn.Module, names: Sequence[str], report: Callable[[str, torch.Tensor], None]):
    """Within the context, ``report(name, x)`` for the input ``x`` of every use of the named linears' weights."""
    swapped = []
    try:
        for name in names:
            module = block.get_submodule(name)
            weight = module._parameters.get("weight")
            if weight is None:
                raise ValueError(f"{name} has no weight parameter to capture its inputs through "
                                 f"({type(module).__name__}); it is not a linear layer")
            swapped.append((module, weight))
            module._parameters["weight"] = _Tap(weight.data, lambda x, name=name: report(name, x))
        yield
    finally:
        for module, weight in swapped:
            module._parameters["weight"] = weight


def accumulate_hessians(block: nn.Module, names: Sequence[str], inputs: BlockInputs,
                        kwargs_for: Callable[[dict], dict] = lambda kw: kw) -> dict[str, torch.Tensor]:
    """Run the block on all samples and return ``(2/N) sum x x^T`` (float64) for each named linear."""
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(names, 0)

    def add(name, x):
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        if name not in sums:
            sums[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
        sums[name].addmm_(x.T, x)
        counts[name] += x.shape[0]

    with tap_linears(block, names, add):
        run_block(block, BlockInputs(inputs.args, [kwargs_for(kw) for kw in inputs.kwargs]))
    missing = [n for n in names if counts[n] == 0]
    if missing:
        raise RuntimeError(f"linears {missing} were never called by their block; check the model layout")
    return {n: sums[n].mul_(2.0 / counts[n]) for n in names}


def linear_names(block: nn.Module) -> list[str]:
    """Every linear layer (a module with a 2-D weight parameter) inside the block."""
    return [name for name, module in block.named_modules()
            if isinstance(module, nn.Linear) or (hasattr(module, "in_features") and hasattr(module, "out_features")
                                                 and getattr(module, "weight", None) is not None
                                                 and isinstance(module._parameters.get("weight"), torch.Tensor))]


def enter_block(block: Block, index: int, inputs: BlockInputs, device,
                block_kwargs: Callable[[int, dict], dict]) -> tuple[Block, BlockInputs, torch.device]:
    """Move block ``index`` to ``device`` and give it its inputs (keyword arguments as the adapter says) and
    its groups of linears (discovered when the layout does not name them); returns where it came from."""
    home = next(block.module.parameters()).device
    block.module.to(device)
    block_inputs = BlockInputs(inputs.args, [block_kwargs(index, kw) for kw in inputs.kwargs])
    if block.groups is None:
        block = block.with_groups(discover_groups(block.module, block_inputs.args[0], block_inputs.kwargs[0]))
    return block, block_inputs, home


def discover_groups(block: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple[str, ...], ...]:
    """The block's linears in the order they are first called on one sample, consecutive calls on the
    same input tensor forming one group (quantized together, as q/k/v); linears whose input does not
    depend on the block's input (e.g. a position-bias MLP on fixed coordinates) are left out."""
    names = linear_names(block)
    calls: list[tuple[str, tuple]] = []

    def report(name, x):
        if x.requires_grad and all(name != seen for seen, _ in calls):
            calls.append((name, (x.data_ptr(), tuple(x.shape), tuple(x.stride()))))

    hidden = args[0].detach().clone().requires_grad_(True)
    frozen = [p for p in block.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        with tap_linears(block, names, report), torch.enable_grad():
            block(hidden, *args[1:], **kwargs)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    groups: list[list[str]] = []
    previous = None
    for name, key in calls:
        if groups and key == previous:
            groups[-1].append(name)
        else:
            groups.append([name])
        previous = key
    if not groups:
        raise ValueError("no linear layer of this block is called on its input; nothing to quantize")
    return tuple(tuple(group) for group in groups)


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
