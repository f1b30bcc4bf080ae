"""FrameQuant (Adepu et al., ICML 2024): GPTQ on tight-fusion-frame coefficients.

``D = A_out W A_in^T`` is clipped per row to ``mean +- clip_sigma * std`` and
quantized by the GPTQ solver with the frame-space Hessian ``A_in H A_in^T``;
``W_hat = A_out^T D_hat A_in``. With ``redundancy_sides="input"`` only the
input side is redundant (the output side is an orthogonal r = 1 frame), which
costs ``bits * r`` instead of ``bits * r^2`` per weight.

Beyond the paper: ``clip_sigma="auto"`` searches the clip per layer (``ClipSearch``), ``grid_fit="mse"``
fits each row's grid for least squared error, ``normalize_rows`` makes the output-side error
relative to each row's size, and ``budget_bits`` allocates bit widths and redundancies over the
layers so that the whole model costs a given number of honest bits per weight.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fqbench.frames.operator import FrameOperator
from fqbench.methods.pipeline import ClipSearch, Transforms, grid_quantizer, quantize_weight
from fqbench.methods.registry import LayerMethod, register_method
from fqbench.quant.allocation import BitBudget
from fqbench.quant.grids import ZERO_POINTS, GridSpec, check_bits
from fqbench.quant.solver import SolverOptions
from fqbench.quantized.activations import check_act_bits
from fqbench.seeding import derive_seed

REDUNDANCY_SIDES = ("both", "input")
GRID_FITS = ("sigma", "mse")
# clip_sigma=auto: the thresholds searched per layer (standard deviations; None: no clip). Above
# about 3 sigma a row's range is its extremes, which the unclipped min-max grid fits better.
CLIP_THRESHOLDS = (1.5, 2.0, 2.5, 3.0, None)
PAPER_CLIP = 2.0


@dataclass
class FrameQuantConfig:
    bits: int = 2
    redundancy: float = 1.0
    redundancy_sides: str = "both"
    # Standard deviations; None: no clipping and a min-max grid (ablation "GPTQ + TFF"); "auto": searched per
    # layer among CLIP_THRESHOLDS for least proxy error (never worse than the paper's 2 on calibration data).
    # Typed Any because OmegaConf 2.3 unions do not take ints for floats; __post_init__ checks the value.
    clip_sigma: Any = PAPER_CLIP
    zero_point: str = "integer"  # "integer" as the reference, or "float" for a centred grid
    grid_fit: str = "sigma"  # "sigma": mean +- clip_sigma * std (the paper); "mse": least squared error per row
    normalize_rows: bool = False  # divide output rows by their RMS before the output frame (16 bits per row)
    frame_block: int = 8  # the reference's l_den: complex block length of the frame
    rotation: str = "auto"
    hessian_reg: float = 0.01
    denoise: bool = False
    act_bits: int | None = None
    seed: int = 0
    # Honest bits per weight for the whole model (None: off): each layer gets the bit width and
    # redundancy (from the lists below) that minimise the summed output error within the budget.
    budget_bits: float | None = None
    budget_bit_widths: list[int] | None = None  # None: only ``bits``
    budget_redundancies: list[float] = field(default_factory=lambda: [1.0, 1.1, 1.25, 1.5])
    solver: SolverOptions = field(default_factory=SolverOptions)

    def __post_init__(self):
        check_bits(self.bits)
        self.clip_sigma = _parse_clip(self.clip_sigma)
        if self.zero_point not in ZERO_POINTS:
            raise ValueError(f"zero_point={self.zero_point!r}; choose one of {ZERO_POINTS}")
        if self.grid_fit not in GRID_FITS:
            raise ValueError(f"grid_fit={self.grid_fit!r}; choose one of {GRID_FITS}")
        if not (self.redundancy >= 1.0 and self.redundancy < float("inf")):
            raise ValueError(f"redundancy={self.redundancy!r}: a frame needs redundancy >= 1 (1.0 = no redundancy)")
        if self.redundancy_sides not in REDUNDANCY_SIDES:
            raise ValueError(f"redundancy_sides={self.redundancy_sides!r}; choose one of {REDUNDANCY_SIDES}")
        if self.act_bits is not None:
            check_act_bits(self.act_bits)
        if self.budget_bits is not None:
            for bits in self.budget_bit_widths or ():
                check_bits(bits)
            for redundancy in self.budget_redundancies:
                if not 1.0 <= redundancy < float("inf"):
                    raise ValueError(f"budget_redundancies: {redundancy!r} is not a redundancy >= 1")
            self.bit_budget()  # checks the budget

    def grid(self, clip_sigma: float | None) -> GridSpec:
        """The grid for coefficients clipped at ``clip_sigma`` (None: unclipped)."""
        if self.grid_fit == "mse":  # the sigma grid only starts the search
            return GridSpec(self.bits, "lloyd", clip_sigma=PAPER_CLIP if clip_sigma is None else clip_sigma,
                            zero_point=self.zero_point)
        if clip_sigma is None:
            return GridSpec(self.bits, "minmax")
        return GridSpec(self.bits, "sigma", clip_sigma=clip_sigma, zero_point=self.zero_point)

    def bit_budget(self) -> BitBudget | None:
        if self.budget_bits is None:
            return None
        return BitBudget(self.budget_bits, tuple({"bits": bits, "redundancy": redundancy}
                                                 for bits in (self.budget_bit_widths or [self.bits])
                                                 for redundancy in self.budget_redundancies))


def _parse_clip(value):
    """A number of standard deviations, None (no clip) or "auto"; strings from configs are parsed."""
    if value is None or value == "auto":
        return value
    if isinstance(value, str):
        if value.lower() in ("none", "null"):
            return None
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"clip_sigma={value!r}: use a number of standard deviations, null (no clip) "
                             "or auto (searched per layer)") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(f"clip_sigma={value!r} must be a positive finite number of standard deviations, "
                         "null (no clip) or auto")
    return float(value)


@register_method("framequant")
class FrameQuant(LayerMethod):
    Config = FrameQuantConfig

    @property
    def nominal_bits(self) -> float:
        # The paper quotes bits * r ("2.2 bits" at r = 1.1); bits_per_weight is the honest figure.
        return self.config.bits * self.config.redundancy

    @property
    def bit_budget(self) -> BitBudget | None:
        return self.config.bit_budget()

    def _quantize(self, W, H, seed):
        c = self.config
        out_redundancy = c.redundancy if c.redundancy_sides == "both" else 1.0
        transforms = Transforms(
            in_op=FrameOperator(W.shape[1], c.redundancy, c.frame_block, c.rotation, derive_seed(seed, "in")),
            out_op=FrameOperator(W.shape[0], out_redundancy, c.frame_block, c.rotation, derive_seed(seed, "out")),
            normalize_rows=c.normalize_rows,
            hessian_reg=c.hessian_reg,
            denoise=c.denoise,
            act_bits=c.act_bits,
        )
        if c.clip_sigma == "auto":
            search = ClipSearch(CLIP_THRESHOLDS, c.grid, PAPER_CLIP)
            return quantize_weight(W, H, None, c.solver, search, transforms)
        return quantize_weight(W, H, grid_quantizer(c.grid(c.clip_sigma), c.solver), c.solver, c.clip_sigma,
                               transforms)
