"""The shared layer-quantization pipeline behind GPTQ, QuIP and FrameQuant.

    rescale (QuIP) -> normalise rows (optional) -> normalise H -> transform (rotations / frames)
    -> clip (fixed, or searched per layer) -> GPTQ solver (with any column quantizer: scalar
    grids, codebooks) -> optional Wiener gain -> quantized weight

Each method is a choice of these steps; there is no second copy of any of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from fqbench.frames.operator import FrameOperator
from fqbench.quant.grids import FLOAT16_MAX, FLOAT16_MIN_NORMAL, GridSpec, clip_rows
from fqbench.quant.quantizer import ColumnQuantizer, GridQuantizer
from fqbench.quant.solver import SolverOptions, SolverResult, factor_hessian, gptq_solve
from fqbench.quantized import GridWeight, QuantizedWeight, TransformedWeight
from fqbench.quantized.activations import PerTokenQuantizer


@dataclass(frozen=True)
class Transforms:
    """Incoherence processing around the solver: operators for both sides and the QuIP steps."""

    in_op: FrameOperator
    out_op: FrameOperator
    rescale: bool = False  # QuIP's diagonal rescaling (diag H / diag W^T W)^(1/4)
    normalize_rows: bool = False  # divide each output row by its RMS before the output transform (stored float16)
    hessian_reg: float = 0.01  # H <- H * n / tr(H) + hessian_reg * I before transforming
    denoise: bool = False  # fold a per-row Wiener gain into the scales
    act_bits: int | None = None  # per-token quantization of transformed inputs at inference


@dataclass(frozen=True)
class ClipSearch:
    """``clip_sigma=auto``: per layer, the clip threshold of least proxy error ``tr(dD H dD^T)``.

    Every threshold is rounded to nearest first (cheap: one grid per row over all columns, the
    solver's groups ignored); the ``shortlist`` thresholds of least rounding error (weighted by
    the Hessian's diagonal, which ranked thresholds as the full Hessian did on real layers) and
    the ``reference`` threshold are solved with GPTQ, and the solution of least proxy error wins:
    ``tr(dW H_d dW^T)`` for the damped Hessian ``H_d`` the solver factors (its own loss, free)
    plus the clipped-off part's share (the error counts against the unclipped weights). Solving
    the reference makes the search never worse than it on that calibration proxy.
    """

    thresholds: tuple[float | None, ...]  # standard deviations; None: no clip
    grid_for: Callable[[float | None], GridSpec]  # the grid that goes with a threshold
    reference: float | None = 2.0
    shortlist: int = 2


def grid_quantizer(grid: GridSpec, solver: SolverOptions) -> GridQuantizer:
    """Scalar grids, per row or per group of the solver's ``groupsize`` columns."""
    return GridQuantizer(grid, solver.groupsize, solver.static_groups)


def quantize_weight(W: torch.Tensor, H: torch.Tensor, quantizer: ColumnQuantizer | None, solver: SolverOptions,
                    clip_sigma: float | None | ClipSearch = None, transforms: Transforms | None = None
                    ) -> QuantizedWeight:
    """Quantize ``W`` with ``quantizer`` after clipping at ``clip_sigma``; with a ``ClipSearch`` the
    threshold is searched per layer and the search brings its own grids (``quantizer`` is None)."""
    if (quantizer is None) != isinstance(clip_sigma, ClipSearch):
        raise ValueError("pass a quantizer with a fixed clip_sigma, or a ClipSearch (which has its own grids) without one")
    H = H.to(W.device, torch.float64)
    if transforms is None:
        result, chosen = _solve(W.to(torch.float64), H, quantizer, solver, clip_sigma)
        layer = result.weight
        layer.info.update(damping=result.damping, hinv_dtype=str(result.hinv_dtype), **chosen)
        return layer

    input_scale = output_scale = None
    if transforms.rescale:
        W, H, input_scale = _rescale(W.to(torch.float64), H)
    if transforms.normalize_rows:
        W, output_scale = _normalize_rows(W)
    if transforms.hessian_reg is not None:
        n = H.shape[0]
        H = H * (n / torch.trace(H).clamp(min=1e-30))
        H.diagonal().add_(transforms.hessian_reg)
    in_op, out_op = transforms.in_op, transforms.out_op
    # Transforms run at the solver's float32 precision: H was accumulated and
    # normalised in float64, and an orthogonal transform does not amplify rounding.
    D = out_op.analysis(in_op.analysis(W.float()).T).T
    H_frame = in_op.analysis(in_op.analysis(H.float()).T)
    result, chosen = _solve(D, H_frame, quantizer, solver, clip_sigma)
    inner = result.weight
    if transforms.denoise:
        _apply_wiener_gain(inner, D, H_frame)
    coefficient_quantizer = None if transforms.act_bits is None else PerTokenQuantizer(transforms.act_bits)
    layer = TransformedWeight(inner, in_op, out_op, input_scale, coefficient_quantizer, output_scale)
    layer.info.update(
        damping=result.damping,
        hinv_dtype=str(result.hinv_dtype),
        in_transform=in_op.describe(),
        out_transform=out_op.describe(),
        **chosen,
    )
    return layer


def _solve(W: torch.Tensor, H: torch.Tensor, quantizer: ColumnQuantizer | None, solver: SolverOptions,
           clip_sigma: float | None | ClipSearch) -> tuple[SolverResult, dict]:
    """The solver's result on the clipped weights, and what a clip search chose (for the layer's info)."""
    if not isinstance(clip_sigma, ClipSearch):
        return gptq_solve(_clip(W, clip_sigma), H, quantizer, solver), {}
    search = clip_sigma
    W = W.float()
    H_diagonal = torch.diagonal(H).to(torch.float64)

    def rounding_error(sigma):
        clipped = _clip(W, sigma)
        grid = search.grid_for(sigma).fit(clipped)
        dequantized = grid.decode(grid.encode(clipped))
        return float(((W - dequantized).to(torch.float64).square().sum(dim=0) * H_diagonal).sum())

    ranked = sorted(search.thresholds, key=rounding_error)
    factor = factor_hessian(H, solver)
    solved = {}
    for sigma in dict.fromkeys([*ranked[:search.shortlist], search.reference]):  # in order, once each
        clipped = _clip(W, sigma)
        result = gptq_solve(clipped, H, grid_quantizer(search.grid_for(sigma), solver), solver, factor)
        # tr((W - W_hat) H_d (W - W_hat)^T) with W - W_hat = (W - clipped) + (clipped - W_hat):
        error = result.loss + _clip_error(W - clipped, clipped - result.dequantized, H, result.damping)
        solved[sigma] = (error, result)
    best = min(solved, key=lambda sigma: solved[sigma][0])
    chosen = {"clip_sigma": "none" if best is None else best,
              "clip_error_vs_reference": solved[best][0] / solved[search.reference][0]}
    return solved[best][1], chosen


def _clip_error(C: torch.Tensor, E: torch.Tensor, H: torch.Tensor, damping: float) -> float:
    """``tr(C H_d (C + 2 E)^T)`` for the clipped-off part ``C`` and the solver's error ``E``, with
    ``H_d = H + damping * mean(diag H) * I``. ``C`` is sparse (only the tails beyond the clip), so the
    product costs a fraction of a dense one."""
    if not bool(C.any()):
        return 0.0
    C = C.to(torch.float64)
    CH = torch.sparse.mm(C.to_sparse(), H.to(torch.float64))
    CH += C * (damping * float(torch.diagonal(H).mean()))
    return float((CH * (C + 2 * E.to(torch.float64))).sum())


def _clip(W: torch.Tensor, sigma: float | None) -> torch.Tensor:
    return W if sigma is None else clip_rows(W, sigma)


def _normalize_rows(W: torch.Tensor):
    """``W <- diag(1/s) W`` with ``s`` the RMS of each row, rounded to float16 first (what is stored).

    A rotation or frame on the output side spreads the rounding error evenly over all rows;
    dividing each row by its RMS first makes that error relative to each row's size, as a
    per-row grid's error is (on stories260K this is what attention's q/k projections need).
    """
    s = W.square().mean(dim=1).sqrt().clamp(FLOAT16_MIN_NORMAL, FLOAT16_MAX).half()
    return W / s.to(W.dtype)[:, None], s


def _rescale(W: torch.Tensor, H: torch.Tensor):
    """QuIP's rescaling ``W <- W diag(s)``, ``H <- diag(s)^-1 H diag(s)^-1``.

    ``s = (diag H / diag W^T W)^(1/4)`` balances weight and activation magnitude per
    input channel. The stored inverse ``1/s`` is rounded to float16 first and the
    exact inverse of that rounded value is used here, so dequantization is exact.
    """
    diag_h = torch.diag(H).clamp(min=1e-8)
    diag_w = W.square().sum(dim=0).clamp(min=1e-8)
    s = (diag_h / diag_w).pow(0.25)
    inv_s = (1 / s).half().double()
    s = 1 / inv_s
    return W * s, H / s[:, None] / s[None, :], inv_s.float()


def _apply_wiener_gain(inner: QuantizedWeight, D: torch.Tensor, H_frame: torch.Tensor) -> None:
    """Scale each row of ``D_hat`` by its linear MMSE gain (a diagonal Wiener filter).

    Output coefficient i of the layer is ``z_i = D_i c`` for frame-space inputs
    ``c``; the quantized layer gives ``z_hat_i = D_hat_i c``. The gain minimising
    ``E (z_i - g z_hat_i)^2`` is ``E[z_i z_hat_i] / E[z_hat_i^2]``, with the
    expectations taken under the calibration statistics ``H_frame``. With noise
    independent of the signal it is the textbook ``sx^2 / (sx^2 + sn^2)`` (paper
    Appendix I); measuring the cross term instead also accounts for the clipping
    and the solver's error feedback, which are not independent of the weights.
    The gain is folded into the float16 scales, so it costs nothing to store.
    """
    if not isinstance(inner, GridWeight) or inner.scale_rows != inner.out_features:
        raise ValueError("denoise folds a Wiener gain into per-row grid scales; this quantizer has none")
    D_hat = inner.weight().to(H_frame.dtype)
    projected = D_hat @ H_frame
    cross = (projected * D.to(H_frame.dtype)).sum(dim=1)
    power = (projected * D_hat).sum(dim=1)
    gain = torch.where(power > 0, cross / power, torch.ones_like(power))
    inner.scale.copy_((inner.scale.float() * gain[:, None].float()).to(inner.scale.dtype))
