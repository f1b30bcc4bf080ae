"""Uniform quantization grids, one affine quantizer for every method.

Every grid is a per-row affine map: a weight ``w`` in row ``i`` gets the integer
code ``q = clamp(round(w / scale_i + zero_i), 0, 2^bits - 1)`` and the value
``scale_i * (q - zero_i)``. The grid kinds differ only in how ``scale`` and
``zero`` are fitted to a block of columns:

- ``minmax``: GPTQ's asymmetric min-max grid; the range always contains 0, so
  zero is representable; ``symmetric`` centres it on 0 and ``mse`` searches a
  shrink of the range that minimises the |error|^2.4 (GPTQ's options);
- ``sigma``: FrameQuant's grid, ``mean +- clip_sigma * std`` per row. With
  ``zero_point="integer"`` the zero point is rounded to an integer as in the
  reference implementation (at 2 bits this shifts the four levels off centre);
  ``zero_point="float"`` keeps the grid centred on the row mean;
- ``quip``: QuIP's grid: ``2^bits`` evenly spaced levels on ``[-s, s]`` with
  ``s = 2.4 * RMS`` over the whole block (one scale shared by all rows);
- ``lloyd``: the uniform grid of least squared error per row: Lloyd's algorithm
  restricted to evenly spaced levels (round to the grid, then refit scale and
  zero point by least squares; neither step increases the error), started from
  the best of the min-max grid and centred sigma grids (``clip_sigma``, and the
  optimum for a Gaussian row). ``zero_point="integer"``
  then rounds the zero point and refits the scale alone (a zero point costs
  ``bits`` instead of 16 bits per row).

Scales (and float zero points) are rounded to ``scale_dtype`` when fitted:
float16 by default, what a packed model stores, so the fake-quantized and the
packed model agree exactly and the bit accounting is honest; ``float32`` keeps
them as computed, as the reference implementations do (reference-exact mode:
packed models then store 32-bit scales and count them).

Codes of an integer zero point are ``round(w / scale) + zero`` (as IST-DASLab's
GPTQ computes them); a float zero point is added before rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GRID_KINDS = ("minmax", "sigma", "quip", "lloyd")
ZERO_POINTS = ("integer", "float")
SCALE_DTYPES = ("float16", "float32")

FLOAT16_MIN_NORMAL = 2.0**-14
FLOAT16_MAX = 65504.0


def check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits={bits!r} is not supported: use an integer from 1 to 8")


@dataclass(frozen=True)
class GridSpec:
    """How to fit a grid; ``fit`` turns it into an ``AffineGrid`` for given weights."""

    bits: int
    kind: str = "minmax"
    symmetric: bool = False
    mse: bool = False
    clip_sigma: float = 2.0
    zero_point: str = "integer"
    scale_dtype: str = "float16"

    def __post_init__(self):
        check_bits(self.bits)
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"unknown scale_dtype {self.scale_dtype!r}; choose one of {SCALE_DTYPES}")
        if self.kind not in GRID_KINDS:
            raise ValueError(f"unknown grid kind {self.kind!r}; choose one of {GRID_KINDS}")
        if self.zero_point not in ZERO_POINTS:
            raise ValueError(f"unknown zero_point {self.zero_point!r}; choose one of {ZERO_POINTS}")
        if not (self.clip_sigma > 0 and self.clip_sigma < float("inf")):
            raise ValueError(f"clip_sigma={self.clip_sigma!r} must be a positive finite number of standard deviations")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    @property
    def integer_zero(self) -> bool:
        """Whether zero points are integers (stored at ``bits`` bits) rather than float16."""
        if self.kind == "minmax":
            return not self.symmetric
        if self.kind in ("sigma", "lloyd"):
            return self.zero_point == "integer"
        return False

    @property
    def shared_scale(self) -> bool:
        """QuIP's grid has one scale (and a fixed zero) for the whole matrix."""
        return self.kind == "quip"

    def fit(self, w: torch.Tensor) -> "AffineGrid":
        """Fit per-row scale and zero to ``w`` (rows, cols)."""
        w = w.float()
        if self.kind == "minmax":
            scale, zero = _fit_minmax(w, self.maxq, self.symmetric, self.mse)
        elif self.kind == "sigma":
            scale, zero = _fit_sigma(w, self.maxq, self.clip_sigma, self.zero_point == "integer")
        elif self.kind == "lloyd":
            scale, zero = _fit_lloyd(w, self.maxq, self.clip_sigma, self.zero_point == "integer")
        else:
            scale, zero = _fit_quip(w, self.maxq)
        if self.scale_dtype == "float16":
            scale, zero = _to_float16_grid(scale, zero, self.integer_zero)
        return AffineGrid(scale, zero, self.maxq, self.integer_zero)


@dataclass
class AffineGrid:
    scale: torch.Tensor  # (rows,) float32, exactly representable in the spec's scale_dtype
    zero: torch.Tensor  # (rows,) float32
    maxq: int
    integer_zero: bool = True

    def encode(self, w: torch.Tensor) -> torch.Tensor:
        """Integer codes (as float) for ``w``: (rows,) or (rows, cols)."""
        scale, zero = self._broadcast(w)
        if self.integer_zero:
            return torch.clamp(torch.round(w / scale) + zero, 0, self.maxq)
        # Rounding after adding the zero point keeps codes integral for float zero points.
        return torch.clamp(torch.round(w / scale + zero), 0, self.maxq)

    def decode(self, q: torch.Tensor) -> torch.Tensor:
        scale, zero = self._broadcast(q)
        return scale * (q - zero)

    def _broadcast(self, t: torch.Tensor):
        if t.dim() == 1:
            return self.scale, self.zero
        return self.scale.unsqueeze(1), self.zero.unsqueeze(1)


def clip_rows(w: torch.Tensor, sigma: float) -> torch.Tensor:
    """Clamp each row to ``mean +- sigma * std`` (FrameQuant's clip, paper section 3)."""
    mean = w.mean(dim=1, keepdim=True)
    std = w.std(dim=1, keepdim=True) if w.shape[1] > 1 else torch.zeros_like(mean)
    return torch.clamp(w, mean - sigma * std, mean + sigma * std)


def _to_float16_grid(scale: torch.Tensor, zero: torch.Tensor, integer_zero: bool):
    scale = scale.clamp(FLOAT16_MIN_NORMAL, FLOAT16_MAX).half().float()
    zero = zero.round() if integer_zero else zero.clamp(-FLOAT16_MAX, FLOAT16_MAX).half().float()
    return scale, zero


def _fit_minmax(w: torch.Tensor, maxq: int, symmetric: bool, mse: bool):
    zeros = torch.zeros(w.shape[0], device=w.device)
    xmin = torch.minimum(w.min(dim=1).values, zeros)
    xmax = torch.maximum(w.max(dim=1).values, zeros)
    if symmetric:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    scale, zero = _minmax_params(xmin, xmax, maxq, symmetric)
    if mse:
        scale, zero = _shrink_search(w, xmin, xmax, maxq, symmetric, scale, zero)
    return scale, zero


def _minmax_params(xmin, xmax, maxq, symmetric):
    scale = (xmax - xmin) / maxq
    if symmetric:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale)
    return scale, zero


def _shrink_search(w, xmin, xmax, maxq, symmetric, scale, zero, steps=100, maxshrink=0.8, norm=2.4):
    """GPTQ's optional grid search: shrink the range while the |error|^2.4 drops."""
    best = torch.full_like(scale, float("inf"))
    for i in range(int(maxshrink * steps)):
        p = 1 - i / steps
        cand_scale, cand_zero = _minmax_params(p * xmin, p * xmax, maxq, symmetric)
        grid = AffineGrid(cand_scale, cand_zero, maxq, integer_zero=not symmetric)
        err = (grid.decode(grid.encode(w)) - w).abs().pow(norm).sum(dim=1)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, cand_scale, scale)
        zero = torch.where(better, cand_zero, zero)
    return scale, zero


def _fit_sigma(w: torch.Tensor, maxq: int, sigma: float, integer_zero: bool):
    mean = w.mean(dim=1)
    std = w.std(dim=1) if w.shape[1] > 1 else torch.zeros_like(mean)
    scale = 2 * sigma * std / maxq
    # Levels are mean + scale * (q - maxq/2): the grid spans mean +- sigma * std.
    zero = maxq / 2 - mean / torch.where(scale > 0, scale, torch.ones_like(scale))
    constant = ~(std > 0)
    if constant.any():
        # A constant row has no spread to fit: fall back to min-max, which represents it exactly.
        mm_scale, mm_zero = _fit_minmax(w[constant], maxq, symmetric=False, mse=False)
        scale[constant], zero[constant] = mm_scale, mm_zero
    if integer_zero:
        zero = zero.round()
    return scale, zero


def _fit_quip(w: torch.Tensor, maxq: int):
    s = 2.4 * w.square().mean().sqrt() + 1e-16
    scale = torch.full((w.shape[0],), float(2 * s / maxq), device=w.device)
    zero = torch.full_like(scale, maxq / 2)
    return scale, zero


# The clip (outer level, in standard deviations) of the least-squared-error uniform quantizer of a
# Gaussian, by bit width (Max 1960: optimum steps 1.596, 0.996, 0.586, 0.335, 0.188, 0.104, 0.057, 0.031).
GAUSSIAN_OPTIMAL_CLIP = {1: 0.798, 2: 1.494, 3: 2.051, 4: 2.514, 5: 2.916, 6: 3.278, 7: 3.611, 8: 3.925}


LLOYD_TOLERANCE = 1e-2


def _fit_lloyd(w: torch.Tensor, maxq: int, sigma: float, integer_zero: bool, iterations: int = 10):
    """Per row, the evenly spaced grid ``scale * (q - zero)`` of least ``sum (w - w_hat)^2``.

    Starts from the best per row of the min-max grid, the centred ``sigma`` grid and the centred
    grid optimal for a Gaussian row, then alternates rounding to the grid with the least-squares
    fit of ``w ~ a q + b`` on the codes (``scale = a``, ``zero = -b / a``).
    Neither step raises the error, so the result is never worse than its start; it stops when an
    iteration lowers the total error by less than ``LLOYD_TOLERANCE``.
    """
    gaussian = GAUSSIAN_OPTIMAL_CLIP[int(maxq + 1).bit_length() - 1]
    starts = [_fit_minmax(w, maxq, symmetric=False, mse=False)]
    starts += [_fit_sigma(w, maxq, c, False) for c in dict.fromkeys((sigma, gaussian))]
    scale, zero = starts[0]
    error = _squared_error(w, scale, zero, maxq)
    for start_scale, start_zero in starts[1:]:
        start_error = _squared_error(w, start_scale, start_zero, maxq)
        better = start_error < error
        scale, zero = torch.where(better, start_scale, scale), torch.where(better, start_zero, zero)
        error = torch.where(better, start_error, error)
    previous = float(error.sum())
    q = AffineGrid(scale, zero, maxq, integer_zero=False).encode(w)
    for _ in range(iterations):
        q_centred = q - q.mean(dim=1, keepdim=True)
        variance = q_centred.square().sum(dim=1)
        fitted = (q_centred * w).sum(dim=1) / variance.clamp(min=1e-30)
        usable = (variance > 0) & (fitted > 0)  # rows on one code keep their grid
        offset = w.mean(dim=1) - fitted * q.mean(dim=1)
        scale = torch.where(usable, fitted, scale)
        zero = torch.where(usable, -offset / torch.where(usable, fitted, torch.ones_like(fitted)), zero)
        grid = AffineGrid(scale, zero, maxq, integer_zero=False)
        q = grid.encode(w)
        current = float((grid.decode(q) - w).square().sum())
        if current > previous * (1 - LLOYD_TOLERANCE):
            break  # converged: from a Gaussian-like start the iterations gain a fraction of a percent
        previous = current
    if integer_zero:
        zero = zero.round().clamp(0, maxq)
        for _ in range(iterations // 2):
            steps = AffineGrid(scale, zero, maxq, integer_zero=False).encode(w) - zero[:, None]
            power = steps.square().sum(dim=1)
            fitted = (steps * w).sum(dim=1) / power.clamp(min=1e-30)
            scale = torch.where((power > 0) & (fitted > 0), fitted, scale)
    return scale, zero


def _squared_error(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    grid = AffineGrid(scale, zero, maxq, integer_zero=False)
    return (grid.decode(grid.encode(w)) - w).square().sum(dim=1)
