"""The one GPTQ solver: Hessian-aware column-by-column rounding with error feedback.

It serves GPTQ, QuIP's LDLQ (the same algorithm) and FrameQuant (run on the
frame coefficients with the frame-space Hessian). Algorithm (Frantar et al.,
OPTQ): with ``U`` the upper Cholesky factor of ``H^-1``, quantize column ``i``,
spread its error ``(w - q) / U[i, i]`` over the later columns of the block with
``U[i, i:]``, and apply the block's accumulated error to the remaining columns
in one matrix product (lazy batch update).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import torch

from fqbench.quant.grids import AffineGrid, GridSpec

log = logging.getLogger(__name__)

DAMPING_ESCALATION = (1.0, 10.0, 100.0, 1000.0)


class SingularHessianError(RuntimeError):
    """The Hessian stayed singular even after escalating the damping."""


@dataclass(frozen=True)
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

    @classmethod
    def from_config(cls, config) -> "SolverOptions":
        """The solver options of a method config that inherits these fields."""
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})


@dataclass
class SolverResult:
    codes: torch.Tensor  # (rows, cols) uint8, original column order
    scale: torch.Tensor  # (rows, groups) float32
    zero: torch.Tensor  # (rows, groups) float32
    group_index: torch.Tensor  # (cols,) int64: the group of every original column
    dequantized: torch.Tensor  # (rows, cols) float32
    damping: float  # relative damping actually used (fraction of the mean diagonal)
    hinv_dtype: torch.dtype  # dtype the inverse Cholesky factor was computed in


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


def gptq_solve(W: torch.Tensor, H: torch.Tensor, grid: GridSpec, options: SolverOptions = SolverOptions()) -> SolverResult:
    """Quantize ``W`` (rows, cols) on ``grid`` minimising ``tr(dW H dW^T)`` column by column."""
    rows, cols = W.shape
    W = W.to(torch.float32).clone()
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    groupsize = options.groupsize if options.groupsize > 0 else cols
    num_groups = math.ceil(cols / groupsize)
    static_grids = None
    if options.static_groups and options.groupsize > 0:
        static_grids = [grid.fit(W[:, g * groupsize:(g + 1) * groupsize]) for g in range(num_groups)]

    perm = None
    if options.act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]

    U, damping, hinv_dtype = inverse_cholesky(H, options.percdamp)
    U = U.to(W.device, torch.float32)
    del H

    # Work on W^T so that a column of W is a contiguous row: the per-column
    # reads, writes and rank-one updates then stream through memory.
    WT = W.T.contiguous()
    del W
    QT = torch.empty_like(WT)
    codesT = torch.empty(cols, rows, dtype=torch.uint8, device=WT.device)
    scale = torch.empty(rows, num_groups, device=WT.device)
    zero = torch.empty(rows, num_groups, device=WT.device)
    position_group = torch.empty(cols, dtype=torch.long)
    current: AffineGrid | None = None
    current_group = -1

    for i1 in range(0, cols, options.blocksize):
        i2 = min(i1 + options.blocksize, cols)
        W1 = WT[i1:i2]  # a view: updated in place
        Err1 = torch.empty_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if static_grids is not None:
                g = (perm[col].item() if perm is not None else col) // groupsize
            else:
                g = col // groupsize
            if g != current_group:
                if static_grids is not None:
                    current = static_grids[g]
                else:
                    # Fitted on up-to-date weights: the block's rows already carry its updates.
                    current = grid.fit(WT[col:col + groupsize].T)
                scale[:, g] = current.scale
                zero[:, g] = current.zero
                current_group = g
            position_group[col] = g

            w = W1[i]
            q = current.encode(w)
            dq = current.decode(q)
            codesT[col] = q.to(torch.uint8)
            QT[col] = dq
            err = (w - dq) / U1[i, i]
            W1[i + 1:].addr_(U1[i, i + 1:], err, alpha=-1)
            Err1[i] = err
        WT[i2:].addmm_(U[i1:i2, i2:].T, Err1, alpha=-1)

    codes, Q = codesT.T, QT.T
    group_index = position_group.to(Q.device)
    if perm is not None:
        inverse = torch.argsort(perm)
        codes, Q = codes[:, inverse], Q[:, inverse]
        group_index = group_index[inverse.to(group_index.device)]
    return SolverResult(codes.contiguous(), scale, zero, group_index, Q.contiguous(), damping, hinv_dtype)
