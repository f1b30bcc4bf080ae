"""GPTQ (Frantar et al.) and its weight-space clipping ablation (paper Table 10)."""

from __future__ import annotations

from dataclasses import dataclass

from fqbench.methods.pipeline import quantize_weight
from fqbench.methods.registry import Method, register_method
from fqbench.quant.grids import GridSpec, check_bits
from fqbench.quant.solver import SolverOptions


@dataclass(frozen=True)
class GPTQConfig(SolverOptions):
    bits: int = 4
    symmetric: bool = False
    mse: bool = False

    def __post_init__(self):
        super().__post_init__()
        check_bits(self.bits)

    def grid(self) -> GridSpec:
        return GridSpec(self.bits, "minmax", symmetric=self.symmetric, mse=self.mse)


@register_method("gptq")
class GPTQ(Method):
    Config = GPTQConfig

    def _quantize(self, W, H, seed):
        return quantize_weight(W, H, self.config.grid(), SolverOptions.from_config(self.config))


@dataclass(frozen=True)
class GPTQClipConfig(SolverOptions):
    """GPTQ on ``W`` clipped per row to ``mean +- clip_sigma * std``, with FrameQuant's grid."""

    bits: int = 2
    clip_sigma: float = 2.0
    zero_point: str = "integer"

    def __post_init__(self):
        super().__post_init__()
        check_bits(self.bits)

    def grid(self) -> GridSpec:
        return GridSpec(self.bits, "sigma", clip_sigma=self.clip_sigma, zero_point=self.zero_point)


@register_method("gptq_clip")
class GPTQClip(Method):
    Config = GPTQClipConfig

    def _quantize(self, W, H, seed):
        c = self.config
        return quantize_weight(W, H, c.grid(), SolverOptions.from_config(c), clip_sigma=c.clip_sigma)
