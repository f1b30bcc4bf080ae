"""A ``FrameOperator`` as a few batched matmuls, for GPU inference (DESIGN.md §7).

For the randomized Hadamard rotation (size K * 2^p) the analysis ``A x = F H diag(s) P x / sqrt(d)``
is regrouped on the padded vector seen as a (rows, tail) tile, ``H = H_lead ⊗ H_tail``:

1. multiply by the scaled signs ``s / sqrt(d)`` (elementwise; random signs are not a Kronecker product);
2. the lead Hadamard factors (each at most 128, or H_K itself up to 256) as broadcast matmuls
   (``fqbench.frames.hadamard.kron_apply``);
3. one matmul per tile row with ``G_r = H_tail^T · blockdiag(frame blocks of row r)``: the last Hadamard
   factor and the frame blocks folded into one small dense matrix. When every row has the same
   blocks (r = 1.0: all phases are 1) it is one shared matrix and one plain matmul, else one
   ``torch.bmm`` over the rows.

Small dimensions (padded <= 128, or up to 1024 without a power-of-two tail that holds whole frame
blocks) fold everything, signs included, into one dense matrix. Otherwise, when no tail holds whole
frame blocks (e.g. 172 * 4 with 16-wide blocks), the Hadamard runs as factors and the frame as its own
batched matmul over the blocks. Other rotation kinds run ``FrameOperator``'s own methods (``describe()``
says which path a transform takes).

The tail matrices depend on the structure (padded dim, frame plan, tail), not on the seed, so the
operators of every layer with the same shape share one copy per device and dtype; a transform's own
parameters are its signs. Everything is built once in float64 on the CPU and cast.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fqbench.frames.hadamard import hadamard_factor, hadamard_matrix, kron_apply
from fqbench.frames.operator import FrameOperator, OperatorSpec
from fqbench.frames.tff import BlockFrame, FramePlan

MAX_LEAD_FACTOR = 128  # larger Sylvester factors are split: a matmul by b x b costs b per element
MAX_MERGED_FACTOR = 256  # H_K absorbs small Sylvester factors up to this: one kernel fewer (13824: 216, not 108 x 2)
# Tried largest first; the folded tail costs (tail * redundancy) per element. A rotation alone
# (block width 1) always finds one: its padded dim is K <= 256 (folded whole) or has a factor 2.
TAILS = (64, 32, 16, 8, 4, 2)
FOLD_ALL_UP_TO = 128  # padded dims this small are one dense matrix
FOLD_ALL_FALLBACK_UP_TO = 1024  # ... and up to this without a tail holding whole frame blocks


def canonical_device(device) -> torch.device:
    """``cuda`` and ``cuda:0`` are the same device but different cache keys: always name the index."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


@dataclass(frozen=True, eq=False)
class Structure:
    """How a Hadamard ``FrameOperator`` is evaluated; see the module docstring.

    ``lead``: the orders of the dense Hadamard factors applied first (their Kronecker product with
    ``H_tail`` is ``H_padded``). Then rows of ``tail_in`` reals map to ``tail_out`` coefficients
    through ``tail_matrices(...)`` (R = padded / tail_in matrices, or one when ``shared``).
    ``signs_folded``: the scaled signs are inside the one tail matrix (``fold_all``: no lead, R = 1).
    """

    dim: int
    padded_dim: int
    num_coefficients: int
    mode: str  # "folded", "fold_all" or "separate"
    lead: tuple[int, ...]
    tail_in: int
    tail_out: int
    shared: bool
    plan: FramePlan | None
    scaled_signs: torch.Tensor  # float64 s / sqrt(padded), (padded,)

    @property
    def signs_folded(self) -> bool:
        return self.mode == "fold_all"

    @property
    def tail_key(self) -> tuple:
        return self.padded_dim, self.plan, self.mode, self.tail_in

    def tail_matrices(self) -> torch.Tensor:
        """Float64 (R or 1, tail_in, tail_out); with the signs folded in for ``fold_all``."""
        matrices, _ = _tail_matrices(*self.tail_key)
        return self.scaled_signs.view(1, -1, 1) * matrices if self.signs_folded else matrices

    def describe(self) -> str:
        lead = " x ".join(map(str, self.lead)) or "none"
        rows = self.padded_dim // self.tail_in
        tail = (f"one {self.tail_in}x{self.tail_out} matrix" if self.shared
                else f"{rows} matrices {self.tail_in}x{self.tail_out} (bmm)")
        signs = "signs folded in" if self.signs_folded else "signs separate"
        pad = f", zero-padded {self.dim} -> {self.padded_dim}" if self.padded_dim != self.dim else ""
        return f"fast {self.mode}: Hadamard lead factors [{lead}], tail {tail}, {signs}{pad}"


def frame_blocks_transposed(plan: FramePlan) -> torch.Tensor:
    """The frame's diagonal blocks as (num_blocks, 2m, 2k) float64: block j maps the reals
    [2mj, 2m(j+1)) to the coefficients [2kj, 2k(j+1)) by ``y_j @ blocks[j]``. Read off the frame's own
    analysis of 2m comb vectors (a 1 at the same place in every block): no layout is assumed."""
    width = 2 * plan.block
    comb = torch.eye(width, dtype=torch.float64).repeat(1, plan.num_blocks)  # (2m, padded)
    out = BlockFrame(plan).analysis(comb)  # (2m, num_coefficients)
    return out.view(width, plan.num_blocks, 2 * plan.subspaces).transpose(0, 1).contiguous()


def _sylvester_split(size: int) -> list[int]:
    """Balanced powers of two, each <= MAX_LEAD_FACTOR, whose product is ``size`` (a power of two)."""
    bits = size.bit_length() - 1
    if bits == 0:
        return []
    count = -(-bits // (MAX_LEAD_FACTOR.bit_length() - 1))
    return [2 ** (bits // count + (i < bits % count)) for i in range(count)]


def _lead_orders(order: int, power: int) -> tuple[int, ...]:
    """Orders of dense factors whose Kronecker product is ``H_order ⊗ H_power`` (Sylvester ``power``):
    H_K merged with the first Sylvester factors while that stays <= MAX_MERGED_FACTOR, then the rest.
    ``hadamard_matrix(K * 2^a)`` is ``H_K ⊗ H_{2^a}`` and Sylvester factors multiply, so this is exact."""
    sizes = _sylvester_split(power)
    first = order
    while sizes and first * sizes[0] <= MAX_MERGED_FACTOR:
        first *= sizes.pop(0)
    return tuple([first] + sizes if first > 1 else sizes)


def _pick_tail(padded: int, power: int, block_width: int) -> tuple[str, int]:
    """(mode, tail size): see the module docstring."""
    tails = [t for t in TAILS if power % t == 0 and t % block_width == 0]
    if padded <= FOLD_ALL_UP_TO or (padded <= FOLD_ALL_FALLBACK_UP_TO and (not tails or tails[0] < 16)):
        return "fold_all", padded
    if tails:
        return "folded", tails[0]
    return "separate", block_width


@functools.lru_cache(maxsize=64)
def _tail_matrices(padded: int, plan: FramePlan | None, mode: str, tail: int) -> tuple[torch.Tensor, bool]:
    """Float64 tail matrices (R, tail, tail_out) of a structure, or (1, ...) when all R are equal."""
    blocks = None if plan is None else frame_blocks_transposed(plan)
    if mode == "separate":
        matrices = blocks
    else:
        h_tail = hadamard_matrix(tail).T
        if blocks is None:
            matrices = h_tail.unsqueeze(0)
        else:
            width = blocks.shape[1]
            per_row, rows = tail // width, padded // tail
            grouped = blocks.view(rows, per_row, width, blocks.shape[2])
            matrices = torch.einsum("tci,rcio->rtco", h_tail.reshape(tail, per_row, width), grouped)
            matrices = matrices.reshape(rows, tail, per_row * blocks.shape[2])
    shared = bool((matrices == matrices[:1]).all())
    return (matrices[:1] if shared else matrices).contiguous(), shared


def structure_of(op: FrameOperator) -> Structure | None:
    """The fast structure of a Hadamard operator, or None for other rotation kinds."""
    if op.rotation.kind != "hadamard":
        return None
    padded = op.padded_dim
    order, power = hadamard_factor(padded)  # power == padded when padded is a power of two
    block_width = 1 if op.plan is None else 2 * op.plan.block
    mode, tail = _pick_tail(padded, power, block_width)
    lead = {"fold_all": (), "folded": _lead_orders(order, power // tail) if mode == "folded" else (),
            "separate": _lead_orders(order, power)}[mode]
    matrices, shared = _tail_matrices(padded, op.plan, mode, tail)
    (scaled_signs,) = type(op.rotation).build(padded, op.rotation.seed)
    return Structure(op.dim, padded, op.num_coefficients, mode, lead, tail, matrices.shape[-1], shared,
                     op.plan, scaled_signs)


class FastTransform:
    """``analysis``/``synthesis`` of one ``FrameOperator`` on one device and dtype; build it with
    ``from_operator`` (cached: the same object for the same spec, device and dtype)."""

    def __init__(self, op: FrameOperator, device: torch.device, dtype: torch.dtype):
        self.op = op
        self.device, self.dtype = device, dtype
        self.dim, self.padded_dim, self.num_coefficients = op.dim, op.padded_dim, op.num_coefficients
        self.structure = s = structure_of(op)
        if s is None:
            return
        self.lead = [_hadamard_on(n, False, device, dtype) for n in s.lead]
        self.lead_transposed = [_hadamard_on(n, True, device, dtype) for n in s.lead]
        if s.signs_folded:  # seed-dependent: this transform's own copy
            self.tail = s.tail_matrices().to(device=device, dtype=dtype)
            self.tail_transposed = self.tail.transpose(1, 2).contiguous()
        else:  # shared by every operator of the same structure
            self.tail, self.tail_transposed = _tail_on(s.tail_key, device, dtype)
        self.scaled_signs = s.scaled_signs.to(device=device, dtype=dtype)

    @classmethod
    def from_operator(cls, op: FrameOperator, device="cpu", dtype: torch.dtype = torch.float32) -> "FastTransform":
        return _cached_transform(op.spec, canonical_device(device), dtype, op)

    # --- the two directions ---------------------------------------------------------------

    def analysis(self, x: torch.Tensor) -> torch.Tensor:
        """``op.analysis(x)``: (..., dim) -> (..., num_coefficients)."""
        self._check(x, self.dim)
        if self.structure is None:
            return self.op.analysis(x)
        lead_shape = x.shape[:-1]
        rows = x.reshape(-1, self.dim)
        if self.padded_dim != self.dim:
            rows = F.pad(rows, (0, self.padded_dim - self.dim))
        if not self.structure.signs_folded:
            rows = rows * self.scaled_signs
        if self.lead:
            rows = kron_apply(rows, self.lead)
        out = self._tail(rows, self.tail)
        return out.reshape(*lead_shape, self.num_coefficients)

    def synthesis(self, c: torch.Tensor) -> torch.Tensor:
        """``op.synthesis(c)``: (..., num_coefficients) -> (..., dim)."""
        self._check(c, self.num_coefficients)
        if self.structure is None:
            return self.op.synthesis(c)
        lead_shape = c.shape[:-1]
        rows = self._tail(c.reshape(-1, self.num_coefficients), self.tail_transposed)
        if self.lead:
            rows = kron_apply(rows, self.lead_transposed)
        if not self.structure.signs_folded:
            rows = rows * self.scaled_signs
        return rows[:, : self.dim].reshape(*lead_shape, self.dim)

    @staticmethod
    def _tail(rows: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
        """Row r of every (n, R * size_in) vector times matrices[r] (or the one shared matrix)."""
        n = rows.shape[0]
        count, size_in, size_out = matrices.shape
        if count == 1:
            return (rows.reshape(-1, size_in) @ matrices[0]).reshape(n, -1)
        tiles = rows.reshape(n, count, size_in).transpose(0, 1)  # (R, n, size_in)
        return torch.bmm(tiles, matrices).transpose(0, 1).reshape(n, count * size_out)

    def _check(self, t: torch.Tensor, size: int) -> None:
        if t.shape[-1] != size:
            raise ValueError(f"expected a last dimension of {size}, got shape {tuple(t.shape)}")
        if t.dtype != self.dtype or canonical_device(t.device) != self.device:
            raise ValueError(f"this transform was built for {self.dtype} on {self.device}, got {t.dtype} on "
                             f"{t.device}; use FastTransform.from_operator(op, device, dtype) for that target")

    # --- reporting ---------------------------------------------------------------------------

    def resident_bytes(self) -> int:
        """Bytes of the tensors this transform uses (shared ones counted in full)."""
        if self.structure is None:
            return 0
        tensors = {id(t): t for t in [*self.lead, *self.lead_transposed, self.tail, self.tail_transposed,
                                      self.scaled_signs]}
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def describe(self) -> str:
        if self.structure is None:
            return (f"fallback: the {self.op.rotation.kind} rotation runs FrameOperator's own methods "
                    f"({self.op.describe()})")
        return f"{self.structure.describe()}; {self.op.describe()}; {self.dtype} on {self.device}"


@functools.lru_cache(maxsize=64)
def _hadamard_on(order: int, transpose: bool, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    h = hadamard_matrix(order)
    return (h.T if transpose else h).contiguous().to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=64)
def _tail_on(key: tuple, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    matrices, _ = _tail_matrices(*key)
    return matrices.to(device=device, dtype=dtype), matrices.transpose(1, 2).contiguous().to(device=device, dtype=dtype)


_TRANSFORMS: dict[tuple[OperatorSpec, torch.device, torch.dtype], FastTransform] = {}
_MAX_TRANSFORMS = 4096  # a 70B model has 80 blocks x 7 linears x 2 sides


def _cached_transform(spec: OperatorSpec, device: torch.device, dtype: torch.dtype,
                      op: FrameOperator) -> FastTransform:
    key = (spec, device, dtype)
    if key not in _TRANSFORMS:
        if len(_TRANSFORMS) >= _MAX_TRANSFORMS:
            _TRANSFORMS.pop(next(iter(_TRANSFORMS)))
        _TRANSFORMS[key] = FastTransform(op, device, dtype)
    return _TRANSFORMS[key]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64: the relative error every kernel check reports."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(torch.finfo(torch.float64).tiny))
