"""The one GPTQ solver: Hessian-aware column-by-column rounding with error feedback.

It serves GPTQ, QuIP's LDLQ (the same algorithm), FrameQuant (run on the
frame coefficients with the frame-space Hessian) and QuIP#'s BlockLDLQ (groups of
columns quantized jointly): the quantizer is a parameter (``fqbench.quant.quantizer``). Algorithm (Frantar et al.,
OPTQ): with ``U`` the upper Cholesky factor of ``H^-1``, quantize column ``i``,
spread its error ``(w - q) / U[i, i]`` over the later columns of the block with
``U[i, i:]``, and apply the block's accumulated error to the remaining columns
in one matrix product (lazy batch update).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from fqbench.quant.quantizer import ColumnQuantizer
from fqbench.quantized import QuantizedWeight

log = logging.getLogger(__name__)

DAMPING_ESCALATION = (1.0, 10.0, 100.0, 1000.0)


class SingularHessianError(RuntimeError):
    """The Hessian stayed singular even after escalating the damping."""


@dataclass
class SolverOptions:
    """GPTQ options shared by every method that runs the solver."""

    blocksize: int = 128
    percdamp: float = 0.01
    act_order: bool = False
    groupsize: int = -1
    static_groups: bool = False

    def __post_init__(self):
        if self.blocksize < 1:
            raise ValueError(f"blocksize={self.blocksize} must be >= 1")
        if not 0 <= self.percdamp < float("inf"):
            raise ValueError(f"percdamp={self.percdamp} must be a non-negative fraction of the mean Hessian diagonal")
        if self.groupsize == 0 or self.groupsize < -1:
            raise ValueError(f"groupsize={self.groupsize}: use -1 for one group per row, or a positive group size")
        if self.groupsize > 0 and self.blocksize % self.groupsize and self.groupsize % self.blocksize:
            raise ValueError(
                f"groupsize={self.groupsize} and blocksize={self.blocksize}: one must divide the other "
                "so that every group is fitted on up-to-date weights"
            )



@dataclass
class SolverResult:
    weight: QuantizedWeight  # in original column order
    dequantized: torch.Tensor  # (rows, cols) float32, original column order
    damping: float  # relative damping actually used (fraction of the mean diagonal)
    hinv_dtype: torch.dtype  # dtype the inverse Cholesky factor was computed in
    loss: float  # tr(dW H_d dW^T) with H_d the damped Hessian the solver factored (free: the squared scaled errors)


def inverse_cholesky(H: torch.Tensor, percdamp: float, dtype=torch.float32):
    """Upper Cholesky factor of ``(H + damp I)^-1``, escalating damping, then precision, on failure.

    Returns ``(U, relative_damping, dtype_used)``. Every fallback is logged; if all
    fail, raises ``SingularHessianError`` naming what was tried.
    """
    mean_diag = torch.diag(H).mean().item()
    floor = max(percdamp, 1e-4)
    schedule = [percdamp] + [floor * f for f in DAMPING_ESCALATION[1:]]
    dtypes = [dtype] if dtype == torch.float64 else [dtype, torch.float64]
    for work_dtype in dtypes:
        for rel in schedule:
            Hd = H.to(work_dtype).clone()
            Hd.diagonal().add_(rel * mean_diag)
            L, info = torch.linalg.cholesky_ex(Hd)
            if info.item() == 0:
                U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
                if info.item() == 0 and torch.isfinite(U).all():
                    if rel != percdamp or work_dtype != dtype:
                        log.warning(
                            "Cholesky fallback: used damping %.3g x mean diag in %s (requested %.3g in %s)",
                            rel, work_dtype, percdamp, dtype,
                        )
                    return U, rel, work_dtype
    raise SingularHessianError(
        f"Hessian ({H.shape[0]}x{H.shape[1]}) is not positive definite even with damping up to "
        f"{schedule[-1]:.3g} x mean diagonal in float64; use more calibration data or a larger percdamp"
    )


@dataclass
class HessianFactor:
    """What the solver derives from ``H`` alone, so that several solves on one Hessian factor it once."""

    U: torch.Tensor  # upper Cholesky factor of (H_d)^-1 in solve order, float32
    damping: float
    dtype: torch.dtype
    perm: torch.Tensor | None  # act-order permutation
    dead: torch.Tensor  # inputs that are never active (zero diagonal): their columns are zeroed


def factor_hessian(H: torch.Tensor, options: SolverOptions = SolverOptions()) -> HessianFactor:
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    perm = torch.argsort(torch.diag(H), descending=True) if options.act_order else None
    if perm is not None:
        H = H[perm][:, perm]
    U, damping, dtype = inverse_cholesky(H, options.percdamp)
    return HessianFactor(U.to(torch.float32), damping, dtype, perm, dead)


def gptq_solve(W: torch.Tensor, H: torch.Tensor, quantizer: ColumnQuantizer,
               options: SolverOptions = SolverOptions(), factor: HessianFactor | None = None) -> SolverResult:
    """Quantize ``W`` (rows, cols) with ``quantizer`` minimising ``tr(dW H dW^T)``, ``quantizer.width``
    columns at a time (``factor``: ``factor_hessian(H, options)`` when already computed).

    One column (scalar grids): its error ``(w - q) / U[i, i]`` updates the later columns with
    ``U[i, i+1:]``. A group of ``g`` columns quantized jointly (a vector codebook): the error
    ``E = U_bb^-T (w_b - q_b)`` (a triangular solve with the group's g x g block of U) updates
    the later columns with ``U[b, later]`` (BlockLDLQ; with g = 1 it is the scalar rule). When the
    columns are not a multiple of g, the last group is narrower.

    ``W - Q = U^T E`` for the scaled errors ``E`` and ``U H_d U^T = I``, so the proxy loss
    ``tr(dW H_d dW^T)`` is ``||E||^2``, summed as the solve goes.
    """
    rows, cols = W.shape
    width = quantizer.width
    if options.blocksize % width:
        raise ValueError(f"a quantizer of {width} columns at a time needs the blocksize ({options.blocksize}) "
                         f"to be a multiple of {width}")
    factor = factor_hessian(H, options) if factor is None else factor
    W = W.to(torch.float32).clone()
    perm = factor.perm
    quantizer.prepare(W, perm, factor.dead.to(W.device))
    W[:, factor.dead] = 0
    if perm is not None:
        W = W[:, perm]
    U, damping, hinv_dtype = factor.U.to(W.device), factor.damping, factor.dtype

    # Work on W^T so that a column of W is a contiguous row: the per-column
    # reads, writes and rank-one updates then stream through memory.
    WT = W.T.contiguous()
    del W
    QT = torch.empty_like(WT)
    loss = 0.0

    for i1 in range(0, cols, options.blocksize):
        i2 = min(i1 + options.blocksize, cols)
        W1 = WT[i1:i2]  # a view: updated in place
        Err1 = torch.empty_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(0, i2 - i1, width):
            dq = quantizer.quantize(WT, i1 + i)
            QT[i1 + i:i1 + i + width] = dq
            if width == 1:
                err = (W1[i] - dq[0]) / U1[i, i]
                W1[i + 1:].addr_(U1[i, i + 1:], err, alpha=-1)
                Err1[i] = err
            else:
                j = min(i + width, i2 - i1)
                err = torch.linalg.solve_triangular(U1[i:j, i:j].T, W1[i:j] - dq, upper=False)
                W1[j:].addmm_(U1[i:j, j:].T, err, alpha=-1)
                Err1[i:j] = err
        WT[i2:].addmm_(U[i1:i2, i2:].T, Err1, alpha=-1)
        loss += float(Err1.to(torch.float64).square().sum())

    Q = QT.T
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return SolverResult(quantizer.finish(), Q.contiguous(), damping, hinv_dtype, loss)
