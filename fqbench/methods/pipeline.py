"""The shared layer-quantization pipeline behind GPTQ, QuIP and FrameQuant.

    rescale (QuIP) -> normalise H -> transform (rotations / frames) -> clip -> GPTQ solver
    (with any column quantizer: scalar grids, codebooks) -> optional Wiener gain -> quantized weight

Each method is a choice of these steps; there is no second copy of any of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fqbench.frames.operator import FrameOperator
from fqbench.quant.grids import GridSpec, clip_rows
from fqbench.quant.quantizer import ColumnQuantizer, GridQuantizer
from fqbench.quant.solver import SolverOptions, gptq_solve
from fqbench.quantized import GridWeight, QuantizedWeight, TransformedWeight
from fqbench.quantized.activations import PerTokenQuantizer


@dataclass(frozen=True)
class Transforms:
    """Incoherence processing around the solver: operators for both sides and the QuIP steps."""

    in_op: FrameOperator
    out_op: FrameOperator
    rescale: bool = False  # QuIP's diagonal rescaling (diag H / diag W^T W)^(1/4)
    hessian_reg: float = 0.01  # H <- H * n / tr(H) + hessian_reg * I before transforming
    denoise: bool = False  # fold a per-row Wiener gain into the scales
    act_bits: int | None = None  # per-token quantization of transformed inputs at inference


def grid_quantizer(grid: GridSpec, solver: SolverOptions) -> GridQuantizer:
    """Scalar grids, per row or per group of the solver's ``groupsize`` columns."""
    return GridQuantizer(grid, solver.groupsize, solver.static_groups)


def quantize_weight(W: torch.Tensor, H: torch.Tensor, quantizer: ColumnQuantizer, solver: SolverOptions,
                    clip_sigma: float | None = None, transforms: Transforms | None = None) -> QuantizedWeight:
    H = H.to(W.device, torch.float64)
    if transforms is None:
        result = gptq_solve(_clip(W.to(torch.float64), clip_sigma), H, quantizer, solver)
        layer = result.weight
        layer.info.update(damping=result.damping, hinv_dtype=str(result.hinv_dtype))
        return layer

    input_scale = None
    if transforms.rescale:
        W, H, input_scale = _rescale(W.to(torch.float64), H)
    if transforms.hessian_reg is not None:
        n = H.shape[0]
        H = H * (n / torch.trace(H).clamp(min=1e-30))
        H.diagonal().add_(transforms.hessian_reg)
    in_op, out_op = transforms.in_op, transforms.out_op
    # Transforms run at the solver's float32 precision: H was accumulated and
    # normalised in float64, and an orthogonal transform does not amplify rounding.
    D = out_op.analysis(in_op.analysis(W.float()).T).T
    H_frame = in_op.analysis(in_op.analysis(H.float()).T)
    result = gptq_solve(_clip(D, clip_sigma), H_frame, quantizer, solver)
    inner = result.weight
    if transforms.denoise:
        _apply_wiener_gain(inner, D, H_frame)
    coefficient_quantizer = None if transforms.act_bits is None else PerTokenQuantizer(transforms.act_bits)
    layer = TransformedWeight(inner, in_op, out_op, input_scale, coefficient_quantizer)
    layer.info.update(
        damping=result.damping,
        hinv_dtype=str(result.hinv_dtype),
        in_transform=in_op.describe(),
        out_transform=out_op.describe(),
    )
    return layer


def _clip(W: torch.Tensor, sigma: float | None) -> torch.Tensor:
    return W if sigma is None else clip_rows(W, sigma)


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
