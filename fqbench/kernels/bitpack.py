"""Bit packing of non-negative integers at exactly ``bits`` bits per value.

Layout (bit planes in groups of eight): the values, flattened in row-major
order, are cut into groups of 8 (the last group zero-padded); a group of eight
``b``-bit values becomes ``b`` bytes, byte ``i`` holding bit ``i`` of the eight
values (bit ``j`` of byte ``i`` is bit ``i`` of value ``j``). The packed tensor is
``(ceil(n / 8), b)`` uint8, so ``n`` values take ``ceil(n / 8) * b`` bytes: never
more than ``b`` bytes above ``n * b / 8``, for every width and every shape.

Why bit planes: every width from 1 to 16 gets the same layout with no waste (3-bit
codes included), and a byte of one plane covers eight consecutive columns, which
is what the table-lookup matmul in ``fqbench.kernels.lut`` indexes by.

Width 8 is the identity: one byte per value, shape ``(n,)``.
"""

from __future__ import annotations

import torch

MAX_BITS = 16
GROUP = 8  # values per group: one byte of every bit plane


def check_width(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"cannot pack at {bits!r} bits: use an integer width from 1 to {MAX_BITS}")


def packed_shape(count: int, bits: int) -> tuple[int, ...]:
    """The shape of ``count`` values packed at ``bits`` bits."""
    check_width(bits)
    if bits == 8:
        return (count,)
    return (-(-count // GROUP), bits)


def packed_bytes(count: int, bits: int) -> int:
    shape = packed_shape(count, bits)
    return shape[0] * (shape[1] if len(shape) > 1 else 1)


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer ``values`` (any shape, each in ``[0, 2**bits)``) into uint8 bit planes."""
    check_width(bits)
    if values.is_floating_point() or values.is_complex():
        if not torch.equal(values, values.round()):
            raise ValueError("pack_bits needs integer values; got non-integral floating-point values")
    flat = values.detach().reshape(-1).cpu().to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(
            f"values span [{int(flat.min())}, {int(flat.max())}], outside the {bits}-bit range [0, {2**bits - 1}]"
        )
    if bits == 8:
        return flat.to(torch.uint8)
    groups = -(-flat.numel() // GROUP)
    padded = torch.zeros(groups * GROUP, dtype=torch.int64)
    padded[: flat.numel()] = flat
    planes = (padded.view(groups, 1, GROUP) >> torch.arange(bits).view(1, bits, 1)) & 1
    return (planes << torch.arange(GROUP)).sum(dim=-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The ``count`` values of ``packed``, flat: uint8 for widths up to 8, int32 above."""
    expected = packed_shape(count, bits)
    if packed.dtype != torch.uint8 or tuple(packed.shape) != expected:
        raise ValueError(
            f"packed {count} values at {bits} bits must be uint8 of shape {expected}, "
            f"got {packed.dtype} of shape {tuple(packed.shape)}"
        )
    if bits == 8:
        return packed.reshape(-1)
    out_dtype = torch.uint8 if bits <= 8 else torch.int32
    shifts = torch.arange(GROUP, dtype=torch.uint8, device=packed.device)
    planes = (packed.unsqueeze(-1) >> shifts) & 1  # (groups, bits, 8)
    weights = torch.arange(bits, device=packed.device).view(1, bits, 1)
    values = (planes.to(out_dtype) << weights.to(out_dtype)).sum(dim=1, dtype=out_dtype)
    return values.reshape(-1)[:count]
