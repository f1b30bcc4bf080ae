"""Inference modules that keep quantized weights packed in memory.

- ``PackedMatrix``: ``x @ W_hat.T`` with ``W_hat = scale * (codes - zero)`` held as
  bit-packed codes, float16 scales and zero points as stored. Many rows of ``x``
  (prefill, evaluation): the weights are decoded on the fly exactly as
  ``GridLayer.weight()`` computes them and multiplied densely, so the result is
  bit-identical to the fake-quantized model. At most ``lut_rows`` rows (decoding):
  the table-lookup kernel works on the packed bytes directly, equal within float
  rounding.
- ``PackedLinear``: a GPTQ/RTN linear layer, ``PackedMatrix`` plus the bias.
- ``FrameLinear``: a FrameQuant (or QuIP) linear layer computing
  ``y = synthesis(D_hat @ analysis(x)) + b`` in frame space with the regenerated
  operators (randomized Hadamard and block-diagonal frame, no dense d x d matrix),
  ``D_hat`` a ``PackedMatrix``. Equal to ``x @ W_hat.T`` within float rounding;
  bit-identical to the fake-quantized model for layers that quantize activations
  (they run in frame space there too).

Nothing dense is cached: a module's memory is its packed buffers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fqbench.frames.operator import FrameOperator
from fqbench.methods.layers import BiasedLinear, QuantizedLayer, quantize_per_token
from fqbench.packing.format import check_tensors, grid_parameters, pack_layer, unpack_operators
from fqbench.packing.kernels import decode_codes, lut_matmul, lut_supported

# Up to this many rows of activations, the table-lookup kernel beats decoding the
# weights (measured with python -m fqbench.bench inference, docs/benchmarks/inference.md).
LUT_ROWS = 16


class PackedMatrix(nn.Module):
    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                 group_index: torch.Tensor | None, *, bits: int, rows: int, cols: int, lut_rows: int = LUT_ROWS):
        super().__init__()
        self.bits, self.rows, self.cols = bits, rows, cols
        self.groups = scale.shape[1]
        self.group_size = -(-cols // self.groups)
        self.lut_rows = lut_rows
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)  # float16 (rows, groups)
        self.register_buffer("zero", zero)  # (rows, groups): uint8, int16 or float16, as stored
        self.register_buffer("group_index", group_index)  # int32 (cols,), only for non-contiguous groups
        self.lut_ok = group_index is None and lut_supported(bits, cols, self.group_size)

    @classmethod
    def from_packed(cls, grid: dict, tensors: dict[str, torch.Tensor], **options) -> "PackedMatrix":
        """From a grid's stored tensors and metadata (``fqbench.packing.format``)."""
        scale, zero, group_index = grid_parameters(grid, tensors)
        rows, cols = grid["shape"]
        return cls(tensors["codes"], scale, zero, group_index, bits=grid["bits"], rows=rows, cols=cols, **options)

    def dequantize(self) -> torch.Tensor:
        """``W_hat`` in float32, computed exactly as ``GridLayer.weight()``: ``scale * (codes - zero)``."""
        weight = decode_codes(self.codes, self.bits, self.rows, self.cols)
        scale, zero = self.scale.float(), self.zero.float()
        if self.groups == 1:
            return weight.sub_(zero).mul_(scale)  # in place: the same values, no second (rows, cols) buffer
        if self.group_index is None and self.cols % self.group_size == 0:
            grouped = weight.view(self.rows, self.groups, self.group_size)
            grouped.sub_(zero.unsqueeze(-1)).mul_(scale.unsqueeze(-1))
            return weight
        index = self._column_groups()
        return weight.sub_(zero.index_select(1, index)).mul_(scale.index_select(1, index))

    def _column_groups(self) -> torch.Tensor:
        if self.group_index is not None:
            return self.group_index
        return torch.arange(self.cols, device=self.codes.device) // self.group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows_of_x = x.numel() // self.cols
        if self.lut_ok and rows_of_x <= self.lut_rows:
            return self._lut_forward(x)
        return F.linear(x, self.dequantize().to(x.dtype))

    def _lut_forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.cols)
        partial = lut_matmul(flat, self.codes, self.bits, self.rows, self.cols, self.group_size)  # (n, rows, groups)
        scale, zero = self.scale.float(), self.zero.float()
        group_sums = flat.float().view(flat.shape[0], self.groups, self.group_size).sum(-1)  # (n, groups)
        y = (scale * (partial - zero * group_sums.unsqueeze(1))).sum(-1)
        return y.to(x.dtype).view(*x.shape[:-1], self.rows)

    def extra_repr(self) -> str:
        return f"{self.rows}x{self.cols}, {self.bits} bits, {self.groups} group(s), lut={self.lut_ok}"


class PackedLinear(BiasedLinear):
    """A grid-quantized linear layer (GPTQ, RTN, GPTQ + clip) kept packed."""

    def __init__(self, matrix: PackedMatrix, bias: torch.Tensor | None):
        super().__init__(matrix.cols, matrix.rows, bias)
        self.matrix = matrix

    def weight_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.matrix(x)


class FrameLinear(BiasedLinear):
    """``y = A_out^T D_hat A_in diag(input_scale) x + b``, run in frame space with packed ``D_hat``."""

    def __init__(self, in_op: FrameOperator, matrix: PackedMatrix, out_op: FrameOperator,
                 input_scale: torch.Tensor | None, act_bits: int | None, bias: torch.Tensor | None):
        super().__init__(in_op.dim, out_op.dim, bias)
        self.in_op, self.out_op = in_op, out_op
        self.act_bits = act_bits
        self.matrix = matrix
        self.register_buffer("input_scale", None if input_scale is None else input_scale.float())

    def weight_map(self, x: torch.Tensor) -> torch.Tensor:
        # The same sequence of operations as TransformedLayer.forward, with D_hat packed.
        dtype = x.dtype
        x = x.float()
        if self.input_scale is not None:
            x = x * self.input_scale
        coefficients = self.in_op.analysis(x)
        if self.act_bits is not None:
            coefficients = quantize_per_token(coefficients, self.act_bits)
        return self.out_op.synthesis(self.matrix(coefficients)).to(dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, act_bits={self.act_bits}\n"
                f"  in_op: {self.in_op.describe()}\n  out_op: {self.out_op.describe()}")


def packed_module(name: str, meta: dict, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None,
                  **options) -> nn.Module:
    """The inference module for one stored layer (checked first): ``PackedLinear``,
    ``FrameLinear``, or an ``nn.Linear`` for a full-precision layer."""
    check_tensors(name, meta, tensors)
    kind = meta["kind"]
    if kind == "dense":
        out_features, in_features = meta["shape"]
        linear = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
        linear.weight = nn.Parameter(tensors["weight"], requires_grad=False)
        if bias is not None:
            linear.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return linear
    matrix = PackedMatrix.from_packed(meta["grid"], tensors, **options)
    if kind == "grid":
        return PackedLinear(matrix, bias)
    in_op, out_op = unpack_operators(name, meta, tensors)
    return FrameLinear(in_op, matrix, out_op, tensors.get("input_scale"), meta.get("act_bits"), bias)


def pack_module(layer: QuantizedLayer, bias: torch.Tensor | None = None, **options) -> nn.Module:
    """The inference module for a quantized layer, through the packed format."""
    tensors, meta = pack_layer(layer)
    return packed_module(layer.method or type(layer).__name__, meta, tensors, bias, **options)
