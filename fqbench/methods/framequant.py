"""FrameQuant (Adepu et al., ICML 2024): GPTQ on tight-fusion-frame coefficients.

``D = A_out W A_in^T`` is clipped per row to ``mean +- clip_sigma * std`` and
quantized by the GPTQ solver with the frame-space Hessian ``A_in H A_in^T``;
``W_hat = A_out^T D_hat A_in``. With ``redundancy_sides="input"`` only the
input side is redundant (the output side is an orthogonal r = 1 frame), which
costs ``bits * r`` instead of ``bits * r^2`` per weight.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fqbench.frames.operator import FrameOperator
from fqbench.methods.pipeline import Transforms, grid_quantizer, quantize_weight
from fqbench.methods.registry import LayerMethod, register_method
from fqbench.quant.grids import GridSpec, check_bits
from fqbench.quant.solver import SolverOptions
from fqbench.quantized.activations import check_act_bits
from fqbench.seeding import derive_seed

REDUNDANCY_SIDES = ("both", "input")


@dataclass
class FrameQuantConfig:
    bits: int = 2
    redundancy: float = 1.0
    redundancy_sides: str = "both"
    clip_sigma: float | None = 2.0  # None: no clipping and a min-max grid (ablation "GPTQ + TFF")
    zero_point: str = "integer"  # "integer" as the reference, or "float" for a centred grid
    frame_block: int = 8  # the reference's l_den: complex block length of the frame
    rotation: str = "auto"
    hessian_reg: float = 0.01
    denoise: bool = False
    act_bits: int | None = None
    seed: int = 0
    solver: SolverOptions = field(default_factory=SolverOptions)

    def __post_init__(self):
        check_bits(self.bits)
        if not (self.redundancy >= 1.0 and self.redundancy < float("inf")):
            raise ValueError(f"redundancy={self.redundancy!r}: a frame needs redundancy >= 1 (1.0 = no redundancy)")
        if self.redundancy_sides not in REDUNDANCY_SIDES:
            raise ValueError(f"redundancy_sides={self.redundancy_sides!r}; choose one of {REDUNDANCY_SIDES}")
        if self.act_bits is not None:
            check_act_bits(self.act_bits)

    def grid(self) -> GridSpec:
        if self.clip_sigma is None:
            return GridSpec(self.bits, "minmax")
        return GridSpec(self.bits, "sigma", clip_sigma=self.clip_sigma, zero_point=self.zero_point)


@register_method("framequant")
class FrameQuant(LayerMethod):
    Config = FrameQuantConfig

    @property
    def nominal_bits(self) -> float:
        # The paper quotes bits * r ("2.2 bits" at r = 1.1); bits_per_weight is the honest figure.
        return self.config.bits * self.config.redundancy

    def _quantize(self, W, H, seed):
        c = self.config
        out_redundancy = c.redundancy if c.redundancy_sides == "both" else 1.0
        transforms = Transforms(
            in_op=FrameOperator(W.shape[1], c.redundancy, c.frame_block, c.rotation, derive_seed(seed, "in")),
            out_op=FrameOperator(W.shape[0], out_redundancy, c.frame_block, c.rotation, derive_seed(seed, "out")),
            hessian_reg=c.hessian_reg,
            denoise=c.denoise,
            act_bits=c.act_bits,
        )
        return quantize_weight(W, H, grid_quantizer(c.grid(), c.solver), c.solver, c.clip_sigma, transforms)
