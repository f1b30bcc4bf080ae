"""Round-to-nearest on GPTQ's per-row (or per-group) asymmetric min-max grid."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fqbench.methods.layers import GridLayer
from fqbench.methods.registry import Method, register_method
from fqbench.quant.grids import GridSpec, check_bits


@dataclass(frozen=True)
class RTNConfig:
    bits: int = 4
    groupsize: int = -1
    symmetric: bool = False
    mse: bool = False

    def __post_init__(self):
        check_bits(self.bits)
        if self.groupsize == 0 or self.groupsize < -1:
            raise ValueError(f"groupsize={self.groupsize}: use -1 for one group per row, or a positive group size")

    def grid(self) -> GridSpec:
        return GridSpec(self.bits, "minmax", symmetric=self.symmetric, mse=self.mse)


@register_method("rtn")
class RoundToNearest(Method):
    Config = RTNConfig

    def _quantize(self, W, H, seed):
        grid = self.config.grid()
        W = W.float()
        cols = W.shape[1]
        size = self.config.groupsize if self.config.groupsize > 0 else cols
        fitted = [grid.fit(W[:, g:g + size]) for g in range(0, cols, size)]
        codes = torch.cat([f.encode(W[:, i * size:(i + 1) * size]) for i, f in enumerate(fitted)], dim=1)
        scale = torch.stack([f.scale for f in fitted], dim=1)
        zero = torch.stack([f.zero for f in fitted], dim=1)
        group_index = torch.arange(cols, device=W.device) // size
        return GridLayer(codes, scale, zero, group_index, grid.bits, grid.integer_zero)
