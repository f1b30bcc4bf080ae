"""Sign, randomized Hadamard and block-frame analysis of a ``FrameOperator`` in one Triton kernel,
and the synthesis in another (CUDA; tested on the CPU through Triton's interpreter).

The padded vector is a (L, T) tile, ``H_padded = H_L ⊗ H_T`` with T = 16..128 a power of two holding
whole frame blocks (2m reals each) and L <= 256. The frame's block j is one common block times the
phase ``w^(j m kappa)`` on each complex coefficient kappa (``fqbench.frames.tff``), so its real and
imaginary coefficient rows are ``cos * re - sin * im`` and ``sin * re + cos * im`` of the common
block's ``re`` and ``im`` rows. Per vector and block of BM tile rows the analysis is

    Y = H_L[rows] @ (s ∘ X) / sqrt(L)          (tensor-core dot, signs exact in fp16)
    RE, IM = Y @ M_re, Y @ M_im, M = H_T^T (I ⊗ common rows^T) / sqrt(T)   (two dots)
    out_re, out_im = cos RE - sin IM, sin RE + cos IM   (phase tables, fp32)

written straight to the frame's coefficient order; the synthesis runs the transposes in reverse
order. Accumulation is fp32; the intermediate Y is rounded once to the input dtype. Programs split
the tile rows, so a single vector (batch-1 decode) still spreads over several SMs.

Only what ``triton_problem`` accepts runs here (Hadamard rotation with a frame, the tile fitting);
``FastTransform`` covers everything else. Imports triton at module import: import it lazily.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fqbench.frames.hadamard import hadamard_factor, hadamard_matrix
from fqbench.frames.operator import FrameOperator
from fqbench.kernels.fast_transform import canonical_device, frame_blocks_transposed

MAX_LEAD = 256
TAILS = (64, 128, 32, 16)  # preference order: 64 balances the two dots
ROW_BLOCK = 32


def _next_pow2(n: int, at_least: int = 16) -> int:
    return max(at_least, 1 << (n - 1).bit_length())


def _tile(op: FrameOperator) -> tuple[int, int] | str:
    """(L, T) for the operator, or why there is none."""
    if op.rotation.kind != "hadamard":
        return f"the rotation is {op.rotation.kind}, not hadamard"
    if op.plan is None:
        return "no frame (a rotation alone runs on FastTransform)"
    padded, width = op.padded_dim, 2 * op.plan.block
    order, power = hadamard_factor(padded)
    for tail in TAILS:
        if power % tail == 0 and tail % width == 0 and padded // tail <= MAX_LEAD:
            return padded // tail, tail
    return (f"no tile: padded dim {padded} = {order} x {power} has no power-of-two tail in {TAILS} holding whole "
            f"{width}-wide frame blocks with a lead of at most {MAX_LEAD}")


def _phases(op: FrameOperator, tail: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | str:
    """(common block (2m, 2k), cos and sin (num_blocks, k)) in float64, checked against the frame."""
    plan = op.plan
    m, k = plan.block, plan.subspaces
    blocks = frame_blocks_transposed(plan)  # (num_blocks, 2m, 2k)
    common = blocks[0]
    residue = (torch.arange(plan.num_blocks).unsqueeze(1) * m * torch.arange(k)) % k
    angle = 2 * math.pi * residue.to(torch.float64) / k
    cos, sin = torch.cos(angle), torch.sin(angle)
    re, im = common[:, :k], common[:, k:]
    predicted = torch.cat((cos.unsqueeze(1) * re - sin.unsqueeze(1) * im,
                           sin.unsqueeze(1) * re + cos.unsqueeze(1) * im), dim=2)
    error = float((predicted - blocks).abs().max())
    if error > 1e-10:
        return f"the frame blocks are not phase rotations of one block (max deviation {error:.2e})"
    return common, cos, sin


def triton_problem(op: FrameOperator) -> str | None:
    """Why the fused kernels cannot run this operator, or None."""
    tile = _tile(op)
    if isinstance(tile, str):
        return tile
    phases = _phases(op, tile[1])
    return phases if isinstance(phases, str) else None


@triton.jit
def _analysis_kernel(x_ptr, out_ptr, signs_ptr, lead_ptr, m_re_ptr, m_im_ptr, cos_ptr, sin_ptr,
                     dim, num_coefficients, lead_scale, tail_scale,
                     L: tl.constexpr, L_PAD: tl.constexpr, T: tl.constexpr, KC: tl.constexpr,
                     KC_PAD: tl.constexpr, SUB: tl.constexpr, PER_ROW: tl.constexpr, PHASES: tl.constexpr,
                     BM: tl.constexpr):
    vector = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, L_PAD)
    cols = tl.arange(0, T)
    index = rows[:, None] * T + cols[None, :]
    x = tl.load(x_ptr + vector * dim + index, mask=(rows[:, None] < L) & (index < dim), other=0.0)
    signs = tl.load(signs_ptr + index, mask=rows[:, None] < L, other=0.0)
    signed = x * signs
    kc = tl.arange(0, KC_PAD)
    m_re = tl.load(m_re_ptr + cols[:, None] * KC_PAD + kc[None, :])
    m_im = tl.load(m_im_ptr + cols[:, None] * KC_PAD + kc[None, :])
    block_rows = tl.program_id(1) * BM + tl.arange(0, BM)
    lead = tl.load(lead_ptr + block_rows[:, None] * L_PAD + rows[None, :])
    y = (tl.dot(lead, signed) * lead_scale).to(x.dtype)
    re = tl.dot(y, m_re) * tail_scale
    im = tl.dot(y, m_im) * tail_scale
    table = block_rows[:, None] * KC_PAD + kc[None, :]
    if PHASES:
        cos = tl.load(cos_ptr + table)
        sin = tl.load(sin_ptr + table)
        re, im = cos * re - sin * im, sin * re + cos * im
    block = block_rows[:, None] * PER_ROW + (kc // SUB)[None, :]
    position = vector * num_coefficients + block * (2 * SUB) + (kc % SUB)[None, :]
    mask = (block_rows[:, None] < L) & (kc[None, :] < KC)
    tl.store(out_ptr + position, re.to(x.dtype), mask=mask)
    tl.store(out_ptr + position + SUB, im.to(x.dtype), mask=mask)


@triton.jit
def _synthesis_kernel(c_ptr, out_ptr, signs_ptr, lead_ptr, m_re_ptr, m_im_ptr, cos_ptr, sin_ptr,
                      dim, num_coefficients, lead_scale, tail_scale,
                      L: tl.constexpr, L_PAD: tl.constexpr, T: tl.constexpr, KC: tl.constexpr,
                      KC_PAD: tl.constexpr, SUB: tl.constexpr, PER_ROW: tl.constexpr, PHASES: tl.constexpr,
                      BM: tl.constexpr):
    vector = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, L_PAD)
    cols = tl.arange(0, T)
    kc = tl.arange(0, KC_PAD)
    block = rows[:, None] * PER_ROW + (kc // SUB)[None, :]
    position = vector * num_coefficients + block * (2 * SUB) + (kc % SUB)[None, :]
    mask = (rows[:, None] < L) & (kc[None, :] < KC)
    c_re = tl.load(c_ptr + position, mask=mask, other=0.0)
    c_im = tl.load(c_ptr + position + SUB, mask=mask, other=0.0)
    dtype = c_re.dtype
    if PHASES:
        table = rows[:, None] * KC_PAD + kc[None, :]
        cos = tl.load(cos_ptr + table)
        sin = tl.load(sin_ptr + table)
        re = c_re.to(tl.float32)
        im = c_im.to(tl.float32)
        c_re, c_im = (cos * re + sin * im).to(dtype), (cos * im - sin * re).to(dtype)
    m_re_t = tl.load(m_re_ptr + kc[:, None] + cols[None, :] * KC_PAD)  # (KC_PAD, T): M_re transposed
    m_im_t = tl.load(m_im_ptr + kc[:, None] + cols[None, :] * KC_PAD)
    y = (tl.dot(c_im, m_im_t, tl.dot(c_re, m_re_t)) * tail_scale).to(dtype)  # (L_PAD, T), one accumulator
    block_rows = tl.program_id(1) * BM + tl.arange(0, BM)
    lead_t = tl.load(lead_ptr + rows[None, :] * L_PAD + block_rows[:, None])  # H_L^T[block_rows, :]
    x = tl.dot(lead_t, y) * lead_scale
    index = block_rows[:, None] * T + cols[None, :]
    signs = tl.load(signs_ptr + index, mask=block_rows[:, None] < L, other=0.0)
    tl.store(out_ptr + vector * dim + index, (x * signs).to(dtype), mask=(block_rows[:, None] < L) & (index < dim))


class TritonTransform:
    """``analysis``/``synthesis`` of one Hadamard ``FrameOperator`` through the fused kernels."""

    def __init__(self, op: FrameOperator, device, dtype: torch.dtype):
        problem = triton_problem(op)
        if problem:
            raise ValueError(f"the fused Triton transform cannot run this operator: {problem}")
        self.op = op
        self.device, self.dtype = canonical_device(device), dtype
        self.dim, self.padded_dim, self.num_coefficients = op.dim, op.padded_dim, op.num_coefficients
        self.lead_size, self.tail = _tile(op)
        common, cos, sin = _phases(op, self.tail)
        plan = op.plan
        width, sub = 2 * plan.block, plan.subspaces
        self.per_row = self.tail // width
        self.kc = self.per_row * sub
        self.kc_pad, self.lead_pad = _next_pow2(self.kc), _next_pow2(self.lead_size)
        self.row_block = min(ROW_BLOCK, self.lead_pad)
        # Whole (L_PAD, T) tiles live in registers; ptxas for sm_90 at L_PAD = 256: the analysis needs 248
        # registers a thread with 4 warps (108 with 8), the synthesis spills with 8 warps (none with 16).
        scale = max(1, self.lead_pad // 64)
        self.num_warps = {_analysis_kernel: min(8, 4 * scale), _synthesis_kernel: min(16, 4 * scale)}
        self.phases = bool((sin.abs() > 0).any())
        f64 = dict(dtype=torch.float64)
        lead = torch.zeros(self.lead_pad, self.lead_pad, **f64)
        lead[: self.lead_size, : self.lead_size] = hadamard_matrix(self.lead_size)
        h_tail_t = hadamard_matrix(self.tail).T.reshape(self.tail, self.per_row, width)
        m_re = torch.zeros(self.tail, self.kc_pad, **f64)
        m_im = torch.zeros(self.tail, self.kc_pad, **f64)
        m_re[:, : self.kc] = torch.einsum("tci,ik->tck", h_tail_t, common[:, :sub]).reshape(self.tail, self.kc)
        m_im[:, : self.kc] = torch.einsum("tci,ik->tck", h_tail_t, common[:, sub:]).reshape(self.tail, self.kc)
        tables = []
        for t in (cos, sin):  # (num_blocks, k) -> (lead_pad, kc_pad) by tile row and (block in row, kappa)
            table = torch.zeros(self.lead_pad, self.kc_pad, **f64)
            table[: self.lead_size, : self.kc] = t.reshape(self.lead_size, self.kc)
            tables.append(table)
        (scaled_signs,) = type(op.rotation).build(self.padded_dim, op.rotation.seed)
        on = dict(device=self.device, dtype=dtype)
        self.signs = torch.sign(scaled_signs).to(**on)
        self.lead = lead.to(**on)
        self.m_re, self.m_im = m_re.to(**on), m_im.to(**on)
        self.cos, self.sin = (t.to(device=self.device, dtype=torch.float32) for t in tables)
        self.lead_scale, self.tail_scale = self.lead_size**-0.5, self.tail**-0.5

    @classmethod
    def from_operator(cls, op: FrameOperator, device="cuda", dtype: torch.dtype = torch.float16) -> "TritonTransform":
        key = (op.spec, canonical_device(device), dtype)
        if key not in _TRANSFORMS:
            _TRANSFORMS[key] = cls(op, device, dtype)
        return _TRANSFORMS[key]

    def _launch(self, kernel, t: torch.Tensor, size_in: int, size_out: int) -> torch.Tensor:
        if t.shape[-1] != size_in:
            raise ValueError(f"expected a last dimension of {size_in}, got shape {tuple(t.shape)}")
        if t.dtype != self.dtype or canonical_device(t.device) != self.device:
            raise ValueError(f"this transform was built for {self.dtype} on {self.device}, got {t.dtype} on {t.device}")
        rows = t.reshape(-1, size_in).contiguous()
        out = torch.empty(rows.shape[0], size_out, device=t.device, dtype=t.dtype)
        grid = (rows.shape[0], self.lead_pad // self.row_block)
        kernel[grid](rows, out, self.signs, self.lead, self.m_re, self.m_im, self.cos, self.sin,
                     self.dim, self.num_coefficients, self.lead_scale, self.tail_scale,
                     L=self.lead_size, L_PAD=self.lead_pad, T=self.tail, KC=self.kc, KC_PAD=self.kc_pad,
                     SUB=self.op.plan.subspaces, PER_ROW=self.per_row, PHASES=self.phases, BM=self.row_block,
                     num_warps=self.num_warps[kernel])
        return out.view(*t.shape[:-1], size_out)

    def analysis(self, x: torch.Tensor) -> torch.Tensor:
        """``op.analysis(x)``: (..., dim) -> (..., num_coefficients)."""
        return self._launch(_analysis_kernel, x, self.dim, self.num_coefficients)

    def synthesis(self, c: torch.Tensor) -> torch.Tensor:
        """``op.synthesis(c)``: (..., num_coefficients) -> (..., dim)."""
        return self._launch(_synthesis_kernel, c, self.num_coefficients, self.dim)

    def resident_bytes(self) -> int:
        tensors = (self.signs, self.lead, self.m_re, self.m_im, self.cos, self.sin)
        return sum(t.numel() * t.element_size() for t in tensors)

    def describe(self) -> str:
        return (f"triton fused: tile {self.lead_size} (padded to {self.lead_pad}) x {self.tail}, "
                f"{self.per_row} frame blocks per tile row, phases {'on' if self.phases else 'off'}; "
                f"{self.op.describe()}; {self.dtype} on {self.device}")


_TRANSFORMS: dict = {}
