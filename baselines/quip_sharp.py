"""QuIP# (Tseng et al., ICML 2024) without fine-tuning: randomized Hadamard incoherence on both sides,
BlockLDLQ (the GPTQ solver over groups of eight columns) and the E8P12 lattice codebook.

    W -> H normalised (+ hessian_reg I) -> D = (H_out S_out) W (H_in S_in)^T -> BlockLDLQ with
    codewords of E8P12 (2 bits: 16 bits per 8 weights), or E8P12 plus a residual stage (3 and 4 bits)
    -> codebook weight inside the two Hadamard operators

Incoherence uses the seeded K * 2^m Hadamard transforms of ``fqbench.frames`` (random signs, no dense
random orthogonal); a dimension that is not K * 2^m for a constructible K is refused, as the
reference refuses it. The scale is one per matrix, ``RMS(D) / rms_ratio`` (the reference's
``opt_scale``: 1.03 at 2 and 4 bits, 0.98 at 3; its example script overrides 2 bits to 0.9).
Not done here: the reference's optional low-rank correction and its greedy refinement passes
after LDLQ (``quip_tune_iters``), and fine-tuning.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fqbench.frames.hadamard import SUPPORTED_ORDERS, hadamard_factor
from fqbench.frames.operator import FrameOperator
from fqbench.methods.pipeline import Transforms, quantize_weight
from fqbench.methods.registry import LayerMethod, register_method
from fqbench.quant.codebook import CODEBOOK_FOR_BITS, vector_codebook
from fqbench.quant.quantizer import CodebookQuantizer
from fqbench.quant.solver import SolverOptions
from fqbench.seeding import derive_seed


@dataclass
class QuIPSharpConfig:
    bits: int = 2  # 2: E8P12; 3: E8P12 + E8 ball residual; 4: E8P12 + E8P12 residual
    rms_ratio: float | None = None  # scale = RMS(D) / rms_ratio; None: the codebook's (QuIP#'s opt_scale)
    rescale: bool = False  # QuIP's diagonal rescaling before the transforms (the reference's --rescale_WH)
    hessian_reg: float = 0.01
    seed: int = 0
    solver: SolverOptions = field(default_factory=SolverOptions)

    def __post_init__(self):
        if self.bits not in CODEBOOK_FOR_BITS:
            raise ValueError(f"bits={self.bits!r}: QuIP# has codebooks for {sorted(CODEBOOK_FOR_BITS)} bits")
        if self.rms_ratio is not None and not self.rms_ratio > 0:
            raise ValueError(f"rms_ratio={self.rms_ratio} must be positive (or null for the codebook's own)")
        if self.solver.act_order or self.solver.groupsize != -1 or self.solver.static_groups:
            raise ValueError("QuIP# quantizes groups of eight consecutive columns with one scale per matrix: "
                             "use method.solver.act_order=false, groupsize=-1, static_groups=false")

    def codebook(self):
        return vector_codebook(CODEBOOK_FOR_BITS[self.bits])


@register_method("quip_sharp")
class QuIPSharp(LayerMethod):
    Config = QuIPSharpConfig

    def _quantize(self, W, H, seed):
        c = self.config
        for side, dim in (("out", W.shape[0]), ("in", W.shape[1])):
            if hadamard_factor(dim) is None:
                raise ValueError(
                    f"QuIP# needs Hadamard transforms of both dimensions, but the {side} dimension {dim} of this "
                    f"{W.shape[0]}x{W.shape[1]} layer is not K * 2^m with K in {list(SUPPORTED_ORDERS)}; "
                    "quantize this model with quip (Kronecker rotations) instead")
        transforms = Transforms(
            in_op=FrameOperator(W.shape[1], None, rotation="hadamard", seed=derive_seed(seed, "in")),
            out_op=FrameOperator(W.shape[0], None, rotation="hadamard", seed=derive_seed(seed, "out")),
            rescale=c.rescale,
            hessian_reg=c.hessian_reg,
        )
        return quantize_weight(W, H, CodebookQuantizer(c.codebook(), c.rms_ratio), c.solver, None, transforms)
