"""QuIP (Chee et al. 2023): incoherence processing around LDLQ, and "QuIP with our clip".

Rescale input channels by ``(diag H / diag W^T W)^(1/4)``, normalise H, rotate
both sides with seeded random orthogonal matrices (Kronecker products of two
small Haar-random factors as in the paper; ``rotation="hadamard"`` gives
quip-sharp's randomized Hadamard), round with LDLQ (the GPTQ solver) on QuIP's
grid, and undo everything. ``quip_clip`` replaces the grid with FrameQuant's
per-row 2-sigma clip and grid (paper Tables 1-2).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fqbench.frames.operator import FrameOperator
from fqbench.methods.pipeline import Transforms, grid_quantizer, quantize_weight
from fqbench.methods.registry import LayerMethod, register_method
from fqbench.quant.grids import GridSpec, check_bits
from fqbench.quant.solver import SolverOptions
from fqbench.seeding import derive_seed


@dataclass
class QuIPConfig:
    bits: int = 2
    rotation: str = "kronecker"
    rescale: bool = True
    hessian_reg: float = 0.01
    seed: int = 0
    solver: SolverOptions = field(default_factory=SolverOptions)

    def __post_init__(self):
        check_bits(self.bits)

    def grid(self) -> GridSpec:
        return GridSpec(self.bits, "quip")


@dataclass
class QuIPClipConfig(QuIPConfig):
    clip_sigma: float = 2.0
    zero_point: str = "integer"

    def grid(self) -> GridSpec:
        return GridSpec(self.bits, "sigma", clip_sigma=self.clip_sigma, zero_point=self.zero_point)


def _quantize_quip(config: QuIPConfig, W, H, seed, clip_sigma):
    transforms = Transforms(
        in_op=FrameOperator(W.shape[1], None, rotation=config.rotation, seed=derive_seed(seed, "in")),
        out_op=FrameOperator(W.shape[0], None, rotation=config.rotation, seed=derive_seed(seed, "out")),
        rescale=config.rescale,
        hessian_reg=config.hessian_reg,
    )
    return quantize_weight(W, H, grid_quantizer(config.grid(), config.solver), config.solver, clip_sigma, transforms)


@register_method("quip")
class QuIP(LayerMethod):
    Config = QuIPConfig

    def _quantize(self, W, H, seed):
        return _quantize_quip(self.config, W, H, seed, clip_sigma=None)


@register_method("quip_clip")
class QuIPClip(LayerMethod):
    Config = QuIPClipConfig

    def _quantize(self, W, H, seed):
        return _quantize_quip(self.config, W, H, seed, clip_sigma=self.config.clip_sigma)
