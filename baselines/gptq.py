"""GPTQ (Frantar et al.) and its weight-space clipping ablation (paper Table 10)."""

from __future__ import annotations

from dataclasses import dataclass, field

from fqbench.methods.pipeline import grid_quantizer, quantize_weight
from fqbench.methods.registry import LayerMethod, register_method
from fqbench.quant.grids import GridSpec, check_bits
from fqbench.quant.solver import SolverOptions


@dataclass
class GPTQConfig:
    bits: int = 4
    symmetric: bool = False
    mse: bool = False
    scale_dtype: str = "float16"  # float32: scales as IST-DASLab's GPTQ computes them (reference-exact mode)
    solver: SolverOptions = field(default_factory=SolverOptions)

    def __post_init__(self):
        check_bits(self.bits)
        self.grid()  # checks the grid options

    def grid(self) -> GridSpec:
        return GridSpec(self.bits, "minmax", symmetric=self.symmetric, mse=self.mse, scale_dtype=self.scale_dtype)


@register_method("gptq")
class GPTQ(LayerMethod):
    Config = GPTQConfig

    def _quantize(self, W, H, seed):
        c = self.config
        return quantize_weight(W, H, grid_quantizer(c.grid(), c.solver), c.solver)


@dataclass
class GPTQClipConfig:
    """GPTQ on ``W`` clipped per row to ``mean +- clip_sigma * std``, with FrameQuant's grid."""

    bits: int = 2
    clip_sigma: float = 2.0
    zero_point: str = "integer"
    solver: SolverOptions = field(default_factory=SolverOptions)

    def __post_init__(self):
        check_bits(self.bits)

    def grid(self) -> GridSpec:
        return GridSpec(self.bits, "sigma", clip_sigma=self.clip_sigma, zero_point=self.zero_point)


@register_method("gptq_clip")
class GPTQClip(LayerMethod):
    Config = GPTQClipConfig

    def _quantize(self, W, H, seed):
        c = self.config
        return quantize_weight(W, H, grid_quantizer(c.grid(), c.solver), c.solver, clip_sigma=c.clip_sigma)
