"""GPTQ (Frantar et al.), its mixed-precision form and its weight-space clipping ablation (paper Table 10).

With ``budget_bits`` each layer gets one of ``budget_bit_widths``, allocated so that the whole
model costs ``budget_bits`` honest bits per weight with the least summed output error (the
allocator FrameQuant's budget uses: ZeroQuant-style mixed precision, paper Table 4).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fqbench.methods.pipeline import grid_quantizer, quantize_weight
from fqbench.methods.registry import LayerMethod, register_method
from fqbench.quant.allocation import BitBudget
from fqbench.quant.grids import GridSpec, check_bits
from fqbench.quant.solver import SolverOptions


@dataclass
class GPTQConfig:
    bits: int = 4
    symmetric: bool = False
    mse: bool = False
    scale_dtype: str = "float16"  # float32: scales as IST-DASLab's GPTQ computes them (reference-exact mode)
    budget_bits: float | None = None  # honest bits per weight for the whole model (None: every layer at ``bits``)
    budget_bit_widths: list[int] = field(default_factory=lambda: [2, 3, 4])
    solver: SolverOptions = field(default_factory=SolverOptions)

    def __post_init__(self):
        check_bits(self.bits)
        self.grid()  # checks the grid options
        if self.budget_bits is not None:
            for bits in self.budget_bit_widths:
                check_bits(bits)
            self.bit_budget()  # checks the budget

    def grid(self) -> GridSpec:
        return GridSpec(self.bits, "minmax", symmetric=self.symmetric, mse=self.mse, scale_dtype=self.scale_dtype)

    def bit_budget(self) -> BitBudget | None:
        if self.budget_bits is None:
            return None
        return BitBudget(self.budget_bits, tuple({"bits": bits} for bits in self.budget_bit_widths))


@register_method("gptq")
class GPTQ(LayerMethod):
    Config = GPTQConfig

    @property
    def bit_budget(self) -> BitBudget | None:
        return self.config.bit_budget()

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
