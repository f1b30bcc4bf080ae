"""Pure-PyTorch kernels on bit-packed codes (the ``fqbench.kernels.bitpack`` layout).

Two ways to multiply by a packed ``(rows, cols)`` code matrix:

- ``decode_codes``: the codes as exact floating-point integers, for a dense
  matmul (prefill, evaluation). Two bit planes at a time are decoded with one
  lookup into a 65536 x 8 table of their values, so 2-bit codes take one
  gather per eight weights.
- ``lut_matmul``: ``x @ codes.T`` for a few rows of ``x`` (decoding), without
  ever materializing the weights. The 256 possible dot products of every eight
  consecutive inputs with eight bits are tabulated once per call (a table of
  ``cols / 8 * bits * 256`` numbers per row of x); then every packed byte selects
  its entry and ``embedding_bag`` sums them per output row (a fused gather and
  sum). The work is one lookup per packed byte: proportional to the stored bits,
  4x less than touching every 2-bit weight. Needs ``cols`` to be a multiple of 8
  (so no byte straddles two rows) and codes narrower than 8 bits.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from fqbench.kernels.bitpack import GROUP


@functools.lru_cache(maxsize=None)
def plane_tables(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(byte, pair)``: the 8 bits of every byte (256 x 8), and of every pair of bytes from
    two consecutive planes, weighted 1 and 2 (65536 x 8, indexed ``256 * low + high``)."""
    byte = ((torch.arange(256).unsqueeze(1) >> torch.arange(GROUP)) & 1).to(torch.float64)
    pair = (byte.view(256, 1, GROUP) + 2 * byte.view(1, 256, GROUP)).reshape(256 * 256, GROUP)
    return byte.to(device=device, dtype=dtype), pair.to(device=device, dtype=dtype)


def decode_codes(packed: torch.Tensor, bits: int, rows: int, cols: int,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ``(rows, cols)`` codes as floats of ``dtype`` (exact: small integers)."""
    if bits == 8:
        return packed.view(rows, cols).to(dtype)
    count = rows * cols
    planes = packed.view(-1, bits)
    byte, pair = plane_tables(packed.device, dtype)
    values = None
    for low in range(0, bits, 2):
        # Integer arithmetic stays in int32: mixed uint8/int32 operations take a slow path.
        index = planes[:, low].to(torch.int32)
        if low + 1 < bits:
            index.mul_(256).add_(planes[:, low + 1].to(torch.int32))
        part = F.embedding(index, pair if low + 1 < bits else byte)
        if values is None:
            values = part if low == 0 else part.mul_(2.0**low)
        else:
            values.add_(part, alpha=2.0**low)
    return values.view(-1)[:count].view(rows, cols)


def lut_supported(bits: int, cols: int, group_size: int) -> bool:
    """Whether ``lut_matmul`` handles this layout (groups of ``group_size`` columns)."""
    return bits < 8 and cols % GROUP == 0 and group_size % GROUP == 0 and cols % group_size == 0


def lut_matmul(x: torch.Tensor, packed: torch.Tensor, bits: int, rows: int, cols: int,
               group_size: int) -> torch.Tensor:
    """Per-group partial products ``(n, rows, cols // group_size)`` of ``x`` (n, cols) with the codes:
    entry ``[t, r, q]`` is ``x[t, cols of group q] @ codes[r, cols of group q]``, in float32."""
    n = x.shape[0]
    blocks = cols // GROUP
    byte, _ = plane_tables(x.device, torch.float32)
    # table[(g * bits + i) * 256 + v, t] = 2^i * (x[t, 8g:8g+8] . bits of v)
    dots = x.float().view(n, blocks, GROUP) @ byte.T  # (n, blocks, 256)
    weights = 2.0 ** torch.arange(bits, device=x.device, dtype=torch.float32)
    table = (dots.permute(1, 2, 0).unsqueeze(1) * weights.view(1, bits, 1, 1)).reshape(-1, n)
    offsets = _plane_offsets(blocks, bits, x.device)
    index = packed.view(rows, blocks, bits).to(torch.int32)  # (a mixed uint8 + int32 add is 20x slower)
    index += offsets
    per_bag = group_size // GROUP * bits
    sums = F.embedding_bag(index.view(-1, per_bag), table, mode="sum")  # (rows * groups, n)
    return sums.view(rows, cols // group_size, n).permute(2, 0, 1)


@functools.lru_cache(maxsize=64)
def _plane_offsets(blocks: int, bits: int, device: torch.device) -> torch.Tensor:
    return (torch.arange(blocks * bits, dtype=torch.int32, device=device) * 256).view(blocks, bits)
