"""3-bit codes stored at 3 bits, run from 4-bit containers (DESIGN.md §7: no fast 3-bit kernel exists).

Storage: the row-major codes, zero-padded to a multiple of 8, every 8 codes in 3 bytes
(little-endian: code i of a group sits at bits [3i, 3i + 3) of the 24-bit word). The kernel gets
the same values one per 4-bit nibble (two per byte, the even column in the low nibble), so
``stored_bytes`` is the honest 3 bits per code and ``container_bytes`` what is resident on the GPU.
"""

from __future__ import annotations

import torch

CODES_PER_WORD = 8  # 8 codes x 3 bits = 3 bytes
_SHIFTS = torch.arange(CODES_PER_WORD, dtype=torch.int32) * 3


def pack_3bit(codes: torch.Tensor) -> torch.Tensor:
    """(rows, cols) integer codes in [0, 8) -> uint8 (ceil(rows * cols / 8) * 3,)."""
    _check_codes(codes, 3)
    flat = codes.reshape(-1).to(torch.int32)
    flat = torch.nn.functional.pad(flat, (0, -flat.numel() % CODES_PER_WORD))
    words = (flat.view(-1, CODES_PER_WORD) << _SHIFTS.to(flat.device)).sum(dim=1, dtype=torch.int32)
    parts = torch.stack([(words >> (8 * i)) & 0xFF for i in range(3)], dim=1)
    return parts.to(torch.uint8).reshape(-1)


def unpack_3bit(packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The inverse of ``pack_3bit``: uint8 codes of ``shape``."""
    rows, cols = shape
    count = rows * cols
    expected = -(-count // CODES_PER_WORD) * 3
    if packed.dtype != torch.uint8 or packed.shape != (expected,):
        raise ValueError(f"3-bit codes of shape {shape} are {expected} uint8 bytes, "
                         f"got {packed.dtype} of shape {tuple(packed.shape)}")
    bytes_ = packed.view(-1, 3).to(torch.int32)
    words = bytes_[:, 0] | (bytes_[:, 1] << 8) | (bytes_[:, 2] << 16)
    codes = (words.unsqueeze(1) >> _SHIFTS.to(packed.device)) & 0b111
    return codes.reshape(-1)[:count].to(torch.uint8).view(rows, cols)


def to_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(rows, cols) codes in [0, 16) -> uint8 (rows, ceil(cols / 2)), column 2j in the low nibble."""
    _check_codes(codes, 4)
    c = torch.nn.functional.pad(codes.to(torch.uint8), (0, codes.shape[1] % 2))
    return c[:, 0::2] | (c[:, 1::2] << 4)


def from_nibbles(nibbles: torch.Tensor, cols: int) -> torch.Tensor:
    """The inverse of ``to_nibbles``: uint8 (rows, cols)."""
    both = torch.stack((nibbles & 0xF, nibbles >> 4), dim=-1)
    return both.reshape(nibbles.shape[0], -1)[:, :cols]


class ThreeBitCodes:
    """A (rows, cols) code matrix held at 3 bits; ``codes()`` gives the values for a 4-bit kernel."""

    def __init__(self, codes: torch.Tensor):
        self.shape = tuple(codes.shape)
        self.packed = pack_3bit(codes)

    def codes(self) -> torch.Tensor:
        return unpack_3bit(self.packed, self.shape)

    @property
    def stored_bytes(self) -> int:
        return self.packed.numel()

    @property
    def container_bytes(self) -> int:
        """Bytes of the same codes in 4-bit containers (what a 4-bit kernel keeps resident)."""
        rows, cols = self.shape
        return rows * -(-cols // 2)


def _check_codes(codes: torch.Tensor, bits: int) -> None:
    if codes.dim() != 2:
        raise ValueError(f"codes must be a (rows, cols) matrix, got shape {tuple(codes.shape)}")
    if codes.is_floating_point() or codes.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2**bits):
        raise ValueError(f"{bits}-bit codes must lie in [0, {2**bits}), got [{int(codes.min())}, {int(codes.max())}]")
