"""Seeded random orthogonal rotations of a feature dimension (DESIGN.md §2.2).

``rot = make_rotation(dim, kind, seed)`` is an orthogonal R (dim x dim);
``rot.apply(x)`` is ``x @ R.T`` and ``rot.apply_transpose(x)`` is ``x @ R``,
both on the last dim of x. Parameters are drawn from seeded CPU generators in
float64 and only cast to the input's dtype and device, so a rotation is the
same on every device.
"""

from __future__ import annotations

import abc
import functools
import math
import numbers

import torch

from fqbench.frames.hadamard import SUPPORTED_ORDERS, apply_hadamard, fwht, hadamard_factor, kron_apply
from fqbench.seeding import derive_seed

KINDS = ("auto", "hadamard", "kronecker", "orthogonal", "block_hadamard", "identity")


class Rotation(abc.ABC):
    """An orthogonal R acting on the last dim of row vectors; see make_rotation."""

    kind: str

    def __init__(self, dim: int, seed: int, params: tuple[torch.Tensor, ...]):
        self.dim = dim
        self.seed = seed
        self._params = params
        self._params_by_target: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, ...]] = {}

    @staticmethod
    @abc.abstractmethod
    def build(dim: int, seed: int) -> tuple[torch.Tensor, ...]:
        """The float64 CPU parameters of the rotation."""

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x @ R.T: R v for every row vector v."""
        return self._rotate(x, self._params_for(x), transpose=False)

    def apply_transpose(self, x: torch.Tensor) -> torch.Tensor:
        """x @ R: R^T v for every row vector v, the inverse of apply."""
        return self._rotate(x, self._params_for(x), transpose=True)

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Dense R on the CPU (dim x dim), for tests and small dims."""
        return self.apply_transpose(torch.eye(self.dim, dtype=torch.float64)).to(dtype)

    def __repr__(self) -> str:
        return f"Rotation(dim={self.dim}, kind={self.kind!r}, seed={self.seed})"

    @abc.abstractmethod
    def _rotate(self, x, params, transpose: bool) -> torch.Tensor:
        """x @ R.T (x @ R if transpose) given the parameters in x's dtype and device."""

    def _params_for(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Checks x and returns the parameters cast to its dtype and device."""
        if x.shape[-1:] != (self.dim,):
            raise ValueError(f"expected last dimension {self.dim}, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"rotations act on floating-point tensors, got {x.dtype}")
        target = (x.device, x.dtype)
        if target not in self._params_by_target:
            self._params_by_target[target] = tuple(
                p.to(device=x.device, dtype=x.dtype) for p in self._params
            )
        return self._params_by_target[target]


class HadamardRotation(Rotation):
    """R = H_d diag(s) / sqrt(d), H_d = H_K ⊗ H_{2^m}, s random signs."""

    kind = "hadamard"

    @staticmethod
    def build(dim, seed):
        return (_random_signs(dim, _generator(seed, "hadamard", "signs")) / math.sqrt(dim),)

    def _rotate(self, x, params, transpose):
        (scaled_signs,) = params
        if transpose:
            return apply_hadamard(x, transpose=True) * scaled_signs
        return apply_hadamard(x * scaled_signs)


class KroneckerRotation(Rotation):
    """R = Q1 ⊗ Q2, Haar-random Q1 (d1 x d1) and Q2 (d2 x d2), d1 the largest
    divisor of d with d1 <= sqrt(d): O(d (d1 + d2)) per vector. For prime d,
    d1 = 1 and R is the dense Haar-random Q2."""

    kind = "kronecker"

    @staticmethod
    def build(dim, seed):
        d1 = max(f for f in range(1, math.isqrt(dim) + 1) if dim % f == 0)
        right = _haar_orthogonal(dim // d1, _generator(seed, "kronecker", "right"))
        if d1 == 1:
            return (right,)
        return _haar_orthogonal(d1, _generator(seed, "kronecker", "left")), right

    def _rotate(self, x, params, transpose):
        return kron_apply(x, [q.T for q in params] if transpose else list(params))


class OrthogonalRotation(Rotation):
    """Dense Haar-random R."""

    kind = "orthogonal"

    @staticmethod
    def build(dim, seed):
        return (_haar_orthogonal(dim, _generator(seed, "orthogonal")),)

    def _rotate(self, x, params, transpose):
        (q,) = params
        return x @ q if transpose else x @ q.T


class BlockHadamardRotation(Rotation):
    """The FrameQuant reference's fallback, kept for comparison runs:
    R = I_{d/p} ⊗ (H_p diag(s) / sqrt(p)), p the largest power of two dividing
    d, the same signs s in every block."""

    kind = "block_hadamard"

    @staticmethod
    def build(dim, seed):
        block = dim & -dim
        return (_random_signs(block, _generator(seed, "block_hadamard", "signs")) / math.sqrt(block),)

    def _rotate(self, x, params, transpose):
        (scaled_signs,) = params
        blocks = x.reshape(*x.shape[:-1], -1, len(scaled_signs))
        if transpose:
            return (fwht(blocks) * scaled_signs).reshape(x.shape)
        return fwht(blocks * scaled_signs).reshape(x.shape)


class IdentityRotation(Rotation):
    kind = "identity"

    @staticmethod
    def build(dim, seed):
        return ()

    def _rotate(self, x, params, transpose):
        # A copy, like every other kind, so callers may modify the result in place.
        return x.clone()


_ROTATIONS = {
    cls.kind: cls
    for cls in (HadamardRotation, KroneckerRotation, OrthogonalRotation, BlockHadamardRotation, IdentityRotation)
}


def make_rotation(dim: int, kind: str = "auto", seed: int = 0) -> Rotation:
    """A seeded orthogonal rotation of a dim-dimensional feature space.

    kind: "hadamard" (randomized Hadamard, dim = K * 2^m, see
    fqbench.frames.hadamard), "kronecker", "orthogonal", "block_hadamard",
    "identity", or "auto": "hadamard" when dim allows it, else "kronecker".
    """
    if not isinstance(dim, numbers.Integral) or dim < 1:
        raise ValueError(f"rotation dimension must be a positive integer, got {dim!r}")
    dim = int(dim)
    if kind not in KINDS:
        raise ValueError(f"unknown rotation kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    if kind == "auto":
        kind = "hadamard" if hadamard_factor(dim) else "kronecker"
    elif kind == "hadamard" and hadamard_factor(dim) is None:
        raise ValueError(
            f"no Hadamard rotation of dimension {dim}: it is not K * 2^m with K in "
            f"{list(SUPPORTED_ORDERS)}; use kind='auto' or kind='kronecker'"
        )
    return _ROTATIONS[kind](dim, seed, _parameters(kind, dim, seed))


# Bounded because dense parameters take 8 d^2 bytes.
@functools.lru_cache(maxsize=32)
def _parameters(kind: str, dim: int, seed: int) -> tuple[torch.Tensor, ...]:
    return _ROTATIONS[kind].build(dim, seed)


def _generator(seed: int, *stream: str) -> torch.Generator:
    """A CPU generator for one random object; each object gets its own stream,
    so that e.g. the two Kronecker factors are independent."""
    return torch.Generator().manual_seed(derive_seed(seed, "rotation", *stream))


def _random_signs(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, (n,), generator=generator).to(torch.float64) * 2 - 1


def _haar_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    # QR fixes the signs of diag(r) by convention, which biases q; undoing it
    # makes q Haar-distributed (Mezzadri 2007).
    return q * torch.sign(torch.diagonal(r))
