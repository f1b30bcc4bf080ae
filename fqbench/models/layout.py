"""Architectures as data: the blocks of a model and the quantization order of their linears.

A ``Layout`` names the ``ModuleList`` (or several, for staged models such as
Swin) holding the blocks, and the groups of linear layers inside a block. Groups
are quantized in order; with true-sequential quantization the block is re-run
after each group so that the next group's Hessians see the quantized outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Block:
    name: str  # dotted path from the model root
    module: nn.Module
    groups: tuple[tuple[str, ...], ...]  # linear names relative to the block, in quantization order

    def linears(self) -> list[str]:
        return [name for group in self.groups for name in group]


@dataclass(frozen=True)
class Layout:
    blocks: str  # dotted path of the ModuleList of blocks
    groups: tuple[tuple[str, ...], ...]

    def find_blocks(self, model: nn.Module) -> list[Block]:
        container = model.get_submodule(self.blocks)
        blocks = [Block(f"{self.blocks}.{i}", block, self.groups) for i, block in enumerate(container)]
        for block in blocks:
            missing = [n for n in block.linears() if not is_linear(_get(block.module, n))]
            if missing:
                raise ValueError(f"{block.name}: expected nn.Linear modules {missing}; the layout does not match this model")
        return blocks


def is_linear(module) -> bool:
    """An nn.Linear, or a module standing in for one (a quantized or packed linear layer)."""
    return isinstance(module, nn.Linear) or (
        isinstance(module, nn.Module) and hasattr(module, "in_features") and hasattr(module, "out_features"))


def _get(module: nn.Module, name: str):
    try:
        return module.get_submodule(name)
    except AttributeError:
        return None
