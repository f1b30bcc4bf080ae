"""The one model-adapter protocol, for language and vision models alike.

An adapter says where a model's blocks are (in forward order), which linears of a block are
quantized and in which groups (true-sequential order; the GPTQModel ``module_tree`` idea, as
data), how one calibration sample is fed to the model, and which modules stay in full
precision. The engine (``fqbench.engine``) needs nothing else:

    adapter.blocks(model)            -> [Block(name, module, groups)]
    adapter.run(model, sample, dev)  -> feeds one sample (block inputs and keyword arguments are
                                        captured at the first block, replayed for every block)
    adapter.block_kwargs(i, kwargs)  -> the keyword arguments block i receives (default: as captured)
    adapter.full_precision           -> module names left at full precision (recorded with each run)

``Block.groups`` may be None: the engine then discovers the block's linears from one forward pass
(``fqbench.engine.capture.discover_groups``), which also sees weights used through ``F.linear``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn


@dataclass(frozen=True)
class Block:
    name: str  # dotted path from the model root
    module: nn.Module
    groups: tuple[tuple[str, ...], ...] | None  # linear names relative to the block, in quantization order

    def linears(self) -> list[str]:
        if self.groups is None:
            raise ValueError(f"{self.name}: its linears are discovered from a forward pass; resolve its groups first")
        return [name for group in self.groups for name in group]

    def with_groups(self, groups: tuple[tuple[str, ...], ...]) -> "Block":
        return Block(self.name, self.module, groups)


class ModelAdapter(Protocol):
    name: str
    full_precision: tuple[str, ...]

    def blocks(self, model: nn.Module) -> list[Block]: ...

    def run(self, model: nn.Module, sample: Any, device: torch.device) -> Any: ...

    def block_kwargs(self, index: int, kwargs: dict) -> dict: ...


@dataclass(frozen=True)
class Layout:
    """Blocks in one ModuleList, each with the same groups of linears."""

    blocks: str  # dotted path of the ModuleList of blocks
    groups: tuple[tuple[str, ...], ...] | None

    def find_blocks(self, model: nn.Module) -> list[Block]:
        container = model.get_submodule(self.blocks)
        blocks = [Block(f"{self.blocks}.{i}", block, self.groups) for i, block in enumerate(container)]
        check_blocks(blocks, type(model).__name__)
        return blocks


def check_blocks(blocks: list[Block], model_name: str) -> None:
    for block in blocks:
        if block.groups is None:
            continue
        missing = [n for n in block.linears() if not is_linear(find_module(block.module, n))]
        if missing:
            raise ValueError(f"{block.name}: expected nn.Linear modules {missing}; the layout does not match this "
                             f"model ({model_name})")


def is_linear(module) -> bool:
    """An nn.Linear, or a module standing in for one (a quantized linear layer)."""
    return isinstance(module, nn.Linear) or (
        isinstance(module, nn.Module) and hasattr(module, "in_features") and hasattr(module, "out_features"))


def replace_module(parent: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the dotted path ``name`` below ``parent``."""
    owner, _, attr = name.rpartition(".")
    setattr(parent.get_submodule(owner) if owner else parent, attr, new)


def find_module(module: nn.Module, name: str):
    try:
        return module.get_submodule(name)
    except AttributeError:
        return None
