"""Round-to-nearest on GPTQ's per-row (or per-group) asymmetric min-max grid."""

from __future__ import annotations

from dataclasses import dataclass

from fqbench.methods.registry import LayerMethod, register_method
from fqbench.quant.grids import GridSpec, check_bits
from fqbench.quant.quantizer import GridQuantizer, round_to_nearest


@dataclass
class RTNConfig:
    bits: int = 4
    groupsize: int = -1
    symmetric: bool = False
    mse: bool = False
    scale_dtype: str = "float16"  # float32: scales as the reference computes them (reference-exact mode)

    def __post_init__(self):
        check_bits(self.bits)
        if self.groupsize == 0 or self.groupsize < -1:
            raise ValueError(f"groupsize={self.groupsize}: use -1 for one group per row, or a positive group size")

    def grid(self) -> GridSpec:
        return GridSpec(self.bits, "minmax", symmetric=self.symmetric, mse=self.mse, scale_dtype=self.scale_dtype)


@register_method("rtn")
class RoundToNearest(LayerMethod):
    Config = RTNConfig

    def _quantize(self, W, H, seed):
        return round_to_nearest(W.float(), GridQuantizer(self.config.grid(), self.config.groupsize))
