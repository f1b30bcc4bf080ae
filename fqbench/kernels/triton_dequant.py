"""One Triton kernel that turns packed codes into the dense ``W_hat.T`` for a cuBLAS prefill.

Reads the int32 layout of ``fqbench.kernels.packed_matrix`` (gemlite's) once and writes (K, N) in
float16/bfloat16: one pass over the weights, against the several elementwise passes of the torch
dequantization. Two zero conventions, as gemlite stores them: ``fma`` (``w = code * scale + zero``
with ``zero = -z * scale`` precomputed) and plain (``w = (code - zero) * scale``).

Imports triton at module import: import this module only where triton exists (CUDA, or the
interpreter with ``TRITON_INTERPRET=1`` for tests on the CPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_WORDS = 8  # int32 rows per program: 128 rows of W_hat.T at 2 bits, 64 at 4
BLOCK_N = 128


@triton.jit
def _dequantize_kernel(packed_ptr, scale_ptr, zero_ptr, out_ptr, words, n, k, group_size,
                       BITS: tl.constexpr, PER_WORD: tl.constexpr, FMA: tl.constexpr,
                       BLOCK_WORDS: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    word_rows = pid_k * BLOCK_WORDS + tl.arange(0, BLOCK_WORDS)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    in_mask = (word_rows[:, None] < words) & (cols[None, :] < n)
    packed = tl.load(packed_ptr + word_rows[:, None] * n + cols[None, :], mask=in_mask, other=0)
    shifts = tl.arange(0, PER_WORD) * BITS
    codes = (packed[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)
    codes = tl.reshape(codes, (BLOCK_WORDS * PER_WORD, BLOCK_N)).to(tl.float32)
    rows = pid_k * BLOCK_WORDS * PER_WORD + tl.arange(0, BLOCK_WORDS * PER_WORD)
    mask = (rows[:, None] < k) & (cols[None, :] < n)
    meta = (rows // group_size)[:, None] * n + cols[None, :]
    scale = tl.load(scale_ptr + meta, mask=mask, other=0).to(tl.float32)
    zero = tl.load(zero_ptr + meta, mask=mask, other=0).to(tl.float32)
    if FMA:
        w = codes * scale + zero
    else:
        w = (codes - zero) * scale
    tl.store(out_ptr + rows[:, None] * n + cols[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_packed(packed: torch.Tensor, bits: int, scale_t: torch.Tensor, zero_t: torch.Tensor,
                      in_features: int, group_size: int, *, fma: bool, dtype: torch.dtype) -> torch.Tensor:
    """``W_hat.T`` (in_features, N) from int32 ``packed`` (K / per_word, N) and (G, N) scales and zeros."""
    words, n = packed.shape
    for name, t in (("packed", packed), ("scale_t", scale_t), ("zero_t", zero_t)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    out = torch.empty(in_features, n, device=packed.device, dtype=dtype)
    grid = (triton.cdiv(words, BLOCK_WORDS), triton.cdiv(n, BLOCK_N))
    _dequantize_kernel[grid](packed, scale_t, zero_t, out, words, n, in_features, group_size,
                             BITS=bits, PER_WORD=32 // bits, FMA=fma, BLOCK_WORDS=BLOCK_WORDS, BLOCK_N=BLOCK_N)
    return out
