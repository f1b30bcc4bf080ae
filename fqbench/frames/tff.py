"""Tight fusion frames (Casazza, Fickus, Mixon, Wang, Zhou 2011) and the
block-diagonal frame that FrameQuant applies to a layer dimension.

A (k, l, n) tight fusion frame (TFF) is k subspaces of dimension l of C^n whose
orthogonal projections sum to (k*l/n) I. Here subspace kappa is returned as an
l x n matrix ``F[kappa]`` with orthogonal rows of squared norm ``n / (k*l)``,
i.e. an orthonormal basis scaled by ``r^(-1/2)``, r = k*l/n the redundancy.
That is the Parseval normalization: stacking the ``F[kappa]`` gives the
analysis operator A (k*l x n) with ``A^H A = sum_kappa F[kappa]^H F[kappa] = I``.
Multiply by ``sqrt(r)`` to get orthonormal bases.

Construction: Spectral Tetris builds an l x n unit-norm tight frame T, and
subspace kappa is spanned by the rows of ``T diag(w^(kappa*c))``, w = e^(2 pi i/k).
Real field: each complex entry a+ib becomes the block [[a, -b], [b, a]], so a
complex vector z of C^n is the real vector (Re z_0, Im z_0, Re z_1, ...) of
R^(2n), and a (k, l, n) complex TFF becomes a (k, 2l, 2n) real one.

For a layer the complex triple is (k, padded_dim/(2m), padded_dim/2) with n/l = m
an integer: T is l rows of m ones, and the real frame is block diagonal with
padded_dim/(2m) blocks of size 2k x 2m (see ``plan_frame`` and ``BlockFrame``).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

import torch

__all__ = [
    "tff_exists",
    "spectral_tetris",
    "tight_fusion_frame",
    "real_tight_fusion_frame",
    "FramePlan",
    "plan_frame",
    "BlockFrame",
]

# Block sizes tried when 2*block does not divide the dimension. Cost per vector
# is O(d*k) with k ~ m*r, so larger blocks are not worth it.
_DIVISOR_BLOCKS = range(2, 65)


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_triple(k: int, l: int, n: int) -> None:
    for name, value in (("k", k), ("l", l), ("n", n)):
        _check_positive_int(name, value)


def tff_exists(k: int, l: int, n: int) -> bool:
    """Whether a tight fusion frame of k subspaces of dimension l of C^n exists.

    The characterization of Casazza et al. (2011), the same over R and C:
    - l | n: exists iff k >= n/l;
    - otherwise reduce to l < n/2 with the spatial complement (k, n-l, n), then
      k >= ceil(n/l) + 2 exists, k <= ceil(n/l) does not (its Naimark complement
      would need l-dimensional subspaces of a space of dimension k*l - n < l), and
      k = ceil(n/l) + 1 exists iff the Naimark complement (k, l, k*l - n) does.
    The recursion strictly decreases n, so it ends.
    """
    _check_triple(k, l, n)
    if l > n:
        return False
    while n % l:
        if 2 * l > n:
            l = n - l
            continue
        ceil_ratio = -(-n // l)
        if k != ceil_ratio + 1:
            return k > ceil_ratio + 1
        n = k * l - n
    return k * l >= n


def spectral_tetris(l: int, n: int) -> torch.Tensor:
    """The Spectral Tetris unit-norm tight frame: a real float64 (l, n) matrix with
    unit-norm columns and orthogonal rows of squared norm n/l.

    Each row is filled left to right with ones; a fractional remainder x < 1 is
    placed as the 2x2 block [[sqrt(x/2), sqrt(x/2)], [sqrt((2-x)/2), -sqrt((2-x)/2)]]
    spanning this row and the next. Needs n/l to be an integer or at least 2 (else
    the next row cannot absorb the block's 2 - x).
    """
    _check_positive_int("l", l)
    _check_positive_int("n", n)
    ratio = Fraction(n, l)
    if ratio < 1 or (ratio.denominator != 1 and ratio < 2):
        raise ValueError(
            f"Spectral Tetris needs n/l to be an integer or at least 2, got (l, n) = ({l}, {n}), "
            f"n/l = {float(ratio):.4g}"
        )
    frame = torch.zeros(l, n, dtype=torch.float64)
    col = 0
    carried = Fraction(0)  # squared norm the previous row's 2x2 block put in this row
    for row in range(l):
        left = ratio - carried
        while left >= 1:
            frame[row, col] = 1.0
            col += 1
            left -= 1
        carried = Fraction(0)
        if left:
            # Exact fractions keep "left >= 1" and "left == 0" decisions free of rounding;
            # the last row always ends with left == 0, since every column carries norm 1.
            x = float(left)
            frame[row, col : col + 2] = math.sqrt(x / 2)
            frame[row + 1, col] = math.sqrt((2 - x) / 2)
            frame[row + 1, col + 1] = -math.sqrt((2 - x) / 2)
            col += 2
            carried = 2 - left
    return frame


def _smallest_existing_k(l: int, n: int) -> int:
    k = -(-n // l)
    while not tff_exists(k, l, n):
        k += 1
    return k


def tight_fusion_frame(k: int, l: int, n: int) -> torch.Tensor:
    """A (k, l, n) tight fusion frame of C^n: complex128 (k, l, n), Parseval
    normalized (see the module docstring): ``sum_kappa F[kappa]^H F[kappa] = I_n``.

    Raises ValueError when no such TFF exists, or when Spectral Tetris followed by
    modulation cannot build it; the message names the triple and a k that works.
    """
    _check_triple(k, l, n)
    if l > n:
        raise ValueError(f"no ({k}, {l}, {n}) tight fusion frame: subspace dimension l = {l} exceeds n = {n}")
    if not tff_exists(k, l, n):
        if k * l < n:
            why = f"k*l = {k * l} < n, need k >= n/l = {n / l:.4g}"
        else:
            why = "excluded by the characterization of Casazza et al. 2011"
        raise ValueError(
            f"no ({k}, {l}, {n}) tight fusion frame exists ({why}); "
            f"the smallest k that works for (l, n) = ({l}, {n}) is {_smallest_existing_k(l, n)}"
        )
    ratio = Fraction(n, l)
    if ratio.denominator != 1 and ratio < 2:
        raise ValueError(
            f"a ({k}, {l}, {n}) tight fusion frame exists but Spectral Tetris cannot build it: "
            f"n/l = {float(ratio):.4g} is neither an integer nor >= 2; use l <= n/2 or l dividing n"
        )
    tetris = spectral_tetris(l, n)
    # Modulated columns c and c' = c (mod k) must be orthogonal; spectral Tetris columns
    # that share a row are not (unless in one 2x2 block), so every row's support,
    # a contiguous run of columns, must fit in k.
    support = int((tetris != 0).sum(dim=1).max())
    if k < support:
        raise ValueError(
            f"a ({k}, {l}, {n}) tight fusion frame exists but Spectral Tetris with modulation needs "
            f"k >= {support} (the widest row of the (l, n) = ({l}, {n}) Spectral Tetris frame)"
        )
    kappa = torch.arange(k).unsqueeze(1)
    residue = (kappa * torch.arange(n)) % k  # integer residues keep the phases exact
    angle = 2 * math.pi * residue.to(torch.float64) / k
    modulation = torch.polar(torch.full_like(angle, k**-0.5), angle)
    return tetris.to(torch.complex128).unsqueeze(0) * modulation.unsqueeze(1)


def _realify(frame: torch.Tensor) -> torch.Tensor:
    """(..., l, n) complex -> (..., 2l, 2n) real: a+ib -> [[a, -b], [b, a]]."""
    a, b = frame.real, frame.imag
    rows_re = torch.stack((a, -b), dim=-1)
    rows_im = torch.stack((b, a), dim=-1)
    real = torch.stack((rows_re, rows_im), dim=-3)  # (..., l, 2, n, 2)
    *batch, l, _, n, _ = real.shape
    return real.reshape(*batch, 2 * l, 2 * n)


def real_tight_fusion_frame(k: int, l: int, n: int) -> torch.Tensor:
    """The (k, 2l, 2n) real tight fusion frame of R^(2n), float64, obtained from
    ``tight_fusion_frame(k, l, n)`` by the entrywise map a+ib -> [[a, -b], [b, a]];
    Parseval as well: ``sum_kappa F[kappa]^T F[kappa] = I_2n``."""
    return _realify(tight_fusion_frame(k, l, n))


@dataclass(frozen=True)
class FramePlan:
    """The block-diagonal TFF chosen for one layer dimension (see ``plan_frame``).

    Vectors are zero-padded from ``dim`` to ``padded_dim``, cut into
    ``num_blocks`` blocks of ``2*block`` reals (``block`` complex numbers), and each
    block is expanded into ``2*subspaces`` frame coefficients.
    """

    dim: int
    padded_dim: int
    block: int
    subspaces: int
    requested_redundancy: float

    def __post_init__(self) -> None:
        for name in ("dim", "padded_dim", "block", "subspaces"):
            _check_positive_int(name, getattr(self, name))
        if self.padded_dim < self.dim or self.padded_dim % (2 * self.block):
            raise ValueError(
                f"padded_dim must be a multiple of 2*block = {2 * self.block} and >= dim = {self.dim}, "
                f"got {self.padded_dim}"
            )
        if self.subspaces < self.block:
            raise ValueError(
                f"subspaces must be >= block = {self.block} for a Parseval frame, got {self.subspaces}"
            )

    @property
    def num_blocks(self) -> int:
        return self.padded_dim // (2 * self.block)

    @property
    def num_coefficients(self) -> int:
        return self.num_blocks * 2 * self.subspaces

    @property
    def effective_redundancy(self) -> float:
        """Frame coefficients per original coordinate: padding counts as cost."""
        return self.num_coefficients / self.dim

    def describe(self) -> str:
        padding = f", zero-padded {self.dim} -> {self.padded_dim}" if self.padded_dim > self.dim else ""
        return (
            f"TFF on d={self.dim}{padding}: {self.num_blocks} blocks of "
            f"{2 * self.subspaces}x{2 * self.block} (k={self.subspaces}, m={self.block}), "
            f"redundancy {self.effective_redundancy:.4g} (requested {self.requested_redundancy:.4g})"
        )


def _padded_plan(dim: int, redundancy: float, block: int) -> FramePlan:
    padded = -(-dim // (2 * block)) * (2 * block)
    return FramePlan(dim, padded, block, round(block * redundancy), redundancy)


def plan_frame(dim: int, redundancy: float, block: int = 8) -> FramePlan:
    """Choose the block-diagonal TFF for a layer dimension ``dim``.

    Block m has k = round(m * redundancy) subspaces (Python's round, as the
    reference implementation; k >= m since redundancy >= 1), i.e. the complex
    triple (k, padded_dim/(2m), padded_dim/2). The rule:
    1. 2*block divides dim: m = block, no padding (reference-compatible).
    2. dim even: among the divisors m' of dim/2 in 2..64, take the one whose
       round(m'*r)/m' is closest to r (ties: m' closest to ``block``, then the
       smaller), unless zero-padding dim to a multiple of 2*block gives an
       effective redundancy (padding included) strictly closer to r.
    3. dim odd: zero-pad to the next multiple of 2*block.
    E.g. dim=1000, r=1.1 -> m=10, k=11 (r_eff 1.1); dim=172, r=1.1 -> m=43,
    k=47; dim=11008 -> m=8. The plan's ``effective_redundancy`` is what was
    achieved; ``describe()`` says what was done.
    """
    _check_positive_int("dim", dim)
    _check_positive_int("block", block)
    if (
        isinstance(redundancy, bool)
        or not isinstance(redundancy, numbers.Real)
        or not math.isfinite(redundancy)
        or redundancy < 1
    ):
        raise ValueError(
            f"redundancy must be a finite number >= 1 (fewer coefficients than dimensions "
            f"cannot reconstruct), got {redundancy!r}"
        )
    redundancy = float(redundancy)
    padded = _padded_plan(dim, redundancy, block)
    if padded.padded_dim == dim or dim % 2:
        return padded
    target = Fraction(redundancy)
    divisors = [m for m in _DIVISOR_BLOCKS if (dim // 2) % m == 0]
    if not divisors:
        return padded

    def error(m: int) -> Fraction:
        return abs(Fraction(round(m * redundancy), m) - target)

    best = min(divisors, key=lambda m: (error(m), abs(m - block), m))
    padded_error = abs(Fraction(padded.num_coefficients, dim) - target)
    if padded_error < error(best):
        return padded
    return FramePlan(dim, dim, best, round(best * redundancy), redundancy)


@lru_cache(maxsize=None)
def _block_matrices(block: int, subspaces: int, num_blocks: int) -> torch.Tensor:
    """CPU float64 (num_blocks, 2k, 2m): the real diagonal blocks of the frame."""
    # Block j holds complex columns j*m .. j*m+m-1 of the (k, l, n) TFF: the (k, 1, m)
    # TFF times the phase w^(kappa*j*m). Rows ordered (Re kappa=0..k-1, Im kappa=0..k-1).
    common = _realify(tight_fusion_frame(subspaces, 1, block))  # (k, 2, 2m)
    re, im = common.unbind(1)
    residue = (torch.arange(num_blocks).unsqueeze(1) * block * torch.arange(subspaces)) % subspaces
    angle = (2 * math.pi * residue.to(torch.float64) / subspaces).unsqueeze(-1)
    cos, sin = torch.cos(angle), torch.sin(angle)
    return torch.cat((cos * re - sin * im, sin * re + cos * im), dim=1)


@lru_cache(maxsize=64)
def _cast_block_matrices(
    block: int, subspaces: int, num_blocks: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    return _block_matrices(block, subspaces, num_blocks).to(device=device, dtype=dtype)


class BlockFrame:
    """The block-diagonal real TFF of a ``FramePlan``: a Parseval frame of
    R^padded_dim with ``num_coefficients`` coefficients, analysis A and synthesis A^T
    (``A^T A = I``), acting on the last dimension.

    Coefficient ordering (block-major, as the reference implementation): block j
    (input reals ``[2*j*m, 2*(j+1)*m)``, interleaved (Re, Im) of complex coordinates
    j*m .. j*m+m-1) owns coefficients ``[2*j*k, 2*(j+1)*k)``; within a block,
    coefficient ``part*k + kappa`` is the real (part 0) or imaginary (part 1) part of
    the coefficient on subspace kappa. Equivalently, coefficient j*2k + part*k + kappa
    is row 2*j + part of ``real_tight_fusion_frame(k, num_blocks, padded_dim/2)[kappa]``.

    Applied as one batched matmul over the blocks: O(padded_dim * k) per vector.
    The blocks (num_blocks * 2k * 2m numbers) are built once in float64 on the CPU
    and cast to the input's device and dtype.
    """

    def __init__(self, plan: FramePlan):
        self.plan = plan

    def _blocks(self, like: torch.Tensor) -> torch.Tensor:
        p = self.plan
        return _cast_block_matrices(p.block, p.subspaces, p.num_blocks, like.device, like.dtype)

    def _apply(self, t: torch.Tensor, blocks: torch.Tensor, size_in: int, size_out: int) -> torch.Tensor:
        if t.shape[-1] != size_in:
            raise ValueError(f"expected a last dimension of {size_in}, got shape {tuple(t.shape)}")
        p = self.plan
        rows = t.reshape(-1, p.num_blocks, size_in // p.num_blocks)
        if p.subspaces == p.block:  # every phase is 1: all blocks are equal
            out = rows @ blocks[0]
        else:
            # One bmm with the blocks as the batch dimension beats a shared-block matmul
            # followed by elementwise phase rotations (fewer passes over memory).
            out = torch.bmm(rows.transpose(0, 1), blocks).transpose(0, 1)
        return out.reshape(*t.shape[:-1], size_out)

    def analysis(self, x: torch.Tensor) -> torch.Tensor:
        """(..., padded_dim) -> (..., num_coefficients)."""
        p = self.plan
        return self._apply(x, self._blocks(x).transpose(1, 2), p.padded_dim, p.num_coefficients)

    def synthesis(self, c: torch.Tensor) -> torch.Tensor:
        """(..., num_coefficients) -> (..., padded_dim): the adjoint of ``analysis``,
        and its left inverse."""
        p = self.plan
        return self._apply(c, self._blocks(c), p.num_coefficients, p.padded_dim)

    def matrix(self) -> torch.Tensor:
        """Dense float64 analysis operator (num_coefficients, padded_dim), for tests."""
        p = self.plan
        return torch.block_diag(*_block_matrices(p.block, p.subspaces, p.num_blocks))
