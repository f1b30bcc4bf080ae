"""Quantized weights as plain tensors, their packed layout, and the pure-PyTorch matrix.

``QuantizedWeights`` is what every backend is built from: uint8 codes (N, K) in [0, 2^bits), float16
scales and zero points (N, G) over groups of ``group_size`` consecutive columns, an optional bias;
``W_hat = scale * (codes - zero)``. The packed layout is gemlite's (so a dequantizing kernel can read
either): ``32 / bits`` codes per int32 along K, the int32 matrix stored (K * bits / 32, N), code
``k = row * per_word + i`` at bits ``[i * bits, (i + 1) * bits)``. 3-bit codes are held in 4-bit
containers (``fqbench.kernels.container``); ``stored_bits`` stays 3 for the honest size.

``TorchPackedMatrix`` is the fallback backend: dequantize to the input's dtype, then one matmul.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

SUPPORTED_BITS = (2, 3, 4, 8)


def container_bits(bits: int) -> int:
    """Bits per code in memory: 3-bit codes run from 4-bit containers."""
    return 4 if bits == 3 else bits


@dataclass(frozen=True, eq=False)
class QuantizedWeights:
    codes: torch.Tensor  # uint8 (N, K)
    scale: torch.Tensor  # float16 (N, G)
    zero: torch.Tensor  # (N, G), any float or integer dtype
    bits: int
    group_size: int  # columns per group; K for one group per row
    bias: torch.Tensor | None = None  # (N,)

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits!r}")
        if self.codes.dim() != 2 or self.codes.dtype != torch.uint8:
            raise ValueError(f"codes must be a uint8 (out_features, in_features) matrix, got {self.codes.dtype} "
                             f"of shape {tuple(self.codes.shape)}")
        n, k = self.codes.shape
        if self.group_size < 1 or k % self.group_size:
            raise ValueError(f"group_size must divide in_features = {k}, got {self.group_size}")
        groups = k // self.group_size
        for name in ("scale", "zero"):
            if tuple(getattr(self, name).shape) != (n, groups):
                raise ValueError(f"{name} must have shape (out_features, groups) = ({n}, {groups}), "
                                 f"got {tuple(getattr(self, name).shape)}")
        if self.bias is not None and tuple(self.bias.shape) != (n,):
            raise ValueError(f"bias must have shape ({n},), got {tuple(self.bias.shape)}")
        if self.codes.numel() and int(self.codes.max()) >= 2**self.bits:
            raise ValueError(f"{self.bits}-bit codes must be < {2**self.bits}, got {int(self.codes.max())}")

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]

    def dense(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """``W_hat = scale * (codes - zero)`` (N, K), computed in float64 then cast: the reference."""
        expand = lambda t: t.double().repeat_interleave(self.group_size, dim=1)  # noqa: E731
        return (expand(self.scale) * (self.codes.double() - expand(self.zero))).to(dtype)

    def honest_bytes(self) -> float:
        """Codes at ``bits`` each plus scales, zeros and bias as held."""
        meta = [self.scale, self.zero] + ([] if self.bias is None else [self.bias])
        return self.codes.numel() * self.bits / 8 + sum(t.numel() * t.element_size() for t in meta)


def pack_over_k(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (N, K) -> int32 (ceil(K / per_word), N) in gemlite's layout (zero codes pad K)."""
    per_word = 32 // bits
    n, k = codes.shape
    padded = torch.nn.functional.pad(codes.to(torch.int32), (0, -k % per_word))
    words = padded.view(n, -1, per_word)
    packed = torch.zeros(words.shape[:2], dtype=torch.int32, device=codes.device)
    for i in range(per_word):  # int32 shifts wrap into the sign bit, which the unpacking masks off
        packed |= words[:, :, i] << (i * bits)
    return packed.T.contiguous()


def unpack_over_k(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 (K / per_word, N) -> int32 codes (K, N): the transpose of what ``pack_over_k`` took."""
    per_word = 32 // bits
    shifts = torch.arange(per_word, device=packed.device, dtype=torch.int32) * bits
    codes = (packed.unsqueeze(1) >> shifts.view(1, -1, 1)) & (2**bits - 1)
    return codes.reshape(-1, packed.shape[1])


class TorchPackedMatrix(nn.Module):
    """``x @ W_hat.T + bias`` with the codes packed; dequantizes on every call (no dense cache)."""

    backend = "torch"

    def __init__(self, weights: QuantizedWeights, device="cpu", dtype: torch.dtype = torch.float16):
        super().__init__()
        self.out_features, self.in_features = weights.out_features, weights.in_features
        self.bits, self.group_size, self.dtype = weights.bits, weights.group_size, dtype
        self.kernel_bits = container_bits(weights.bits)
        self.register_buffer("packed", pack_over_k(weights.codes.to(device), self.kernel_bits))
        self.register_buffer("scale_t", weights.scale.T.contiguous().to(device))  # (G, N) as stored
        self.register_buffer("zero_t", weights.zero.T.contiguous().to(device))
        self.register_buffer("bias", None if weights.bias is None else weights.bias.to(device=device, dtype=dtype))

    def dequantize(self) -> torch.Tensor:
        """``W_hat.T`` (K, N) in this matrix's dtype, computed in float32 (float64 for float64)."""
        work = torch.promote_types(self.dtype, torch.float32)
        codes = unpack_over_k(self.packed, self.kernel_bits)[: self.in_features].to(work)
        grouped = codes.view(-1, self.group_size, self.out_features)  # (G, group, N)
        w = (grouped - self.zero_t.to(work).unsqueeze(1)) * self.scale_t.to(work).unsqueeze(1)
        return w.view(self.in_features, self.out_features).to(self.dtype)

    def codes(self) -> torch.Tensor:
        """The (N, K) uint8 codes, unpacked from the layout."""
        return unpack_over_k(self.packed, self.kernel_bits)[: self.in_features].T.to(torch.uint8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_features, self.dtype)
        y = x @ self.dequantize()
        return y if self.bias is None else y + self.bias

    def resident_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def describe(self) -> str:
        return (f"torch {self.out_features}x{self.in_features}, {self.bits}-bit codes in {self.kernel_bits}-bit "
                f"containers, group {self.group_size}, dequantize + matmul in {self.dtype}")


def check_input(x: torch.Tensor, in_features: int, dtype: torch.dtype) -> None:
    if x.shape[-1] != in_features:
        raise ValueError(f"expected a last dimension of {in_features}, got shape {tuple(x.shape)}")
    if x.dtype != dtype:
        raise ValueError(f"this matrix computes in {dtype}, got input of {x.dtype}; cast the input "
                         f"or build the matrix with dtype={x.dtype}")
