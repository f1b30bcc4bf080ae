"""Integer codes on affine grids: ``W_hat = scale * (codes - zero)``, per row or per group of columns.

Stored tensors (names relative to the weight), each counted at the bits it costs:

- ``codes``: bit-packed at ``bits`` bits per weight (``fqbench.kernels.bitpack``);
- ``scale``: ``(scale_rows, groups)`` in ``scale_dtype`` (float16, or float32 in reference-exact
  mode); ``scale_rows`` is the number of rows (one grid per row), 1 (QuIP's grid: one scale
  for the whole matrix) or a divisor of the rows (one scale per block of rows, e.g. q/k/v);
- ``zero``: integer zero points inside the code range, packed at ``bits`` bits; other integer
  zero points as int16; float zero points in ``scale_dtype``; absent when implied by the grid
  (``zero_value``: QuIP's ``maxq / 2``, a symmetric grid's ``2^(bits-1)``);
- ``group_index``: only when the groups are not contiguous (act-order with dynamic groups),
  packed at ``ceil(log2 groups)`` bits per column.

In the ``plain`` layout the codes are one uint8 per weight; in the ``packed`` layout they stay
bit-packed in memory and a few rows of activations are multiplied by table lookup on the packed
bytes (``fqbench.kernels.lut``); many rows decode the weights first (bit-identical to plain). In the
``kernel`` layout the codes live in an inference kernel's format for a device and dtype
(``fqbench.kernels.select``: gemlite's Triton GEMV/GEMM on a GPU where it can run, else the
pure-PyTorch matrix over the same int32 layout); it computes in that dtype (float16 by default), so
it equals the plain layout within float16 rounding.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from fqbench.kernels.lut import decode_codes, lut_matmul, lut_supported
from fqbench.quantized.base import (
    QuantizedWeight, StateError, Stored, check_layout, dtype_bits, dtype_name, dtype_named, index_bits,
    register_weight_kind,
)
from fqbench.kernels.bitpack import pack_bits, packed_shape, unpack_bits

log = logging.getLogger(__name__)

ZERO_STORAGE = ("packed", "int16", "float16", "float32", "implied")
SCALE_DTYPES = {"float16": torch.float16, "float32": torch.float32}

# Up to this many rows of activations, the table-lookup kernel beats decoding the
# weights (measured with python -m fqbench.bench inference, docs/benchmarks/inference.md).
LUT_ROWS = 16


@register_weight_kind("grid")
class GridWeight(QuantizedWeight):
    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                 group_index: torch.Tensor | None, *, bits: int, shape: tuple[int, int], zero_storage: str,
                 zero_value: float | None = None, integer_zero: bool = True, layout: str = "plain",
                 lut_rows: int = LUT_ROWS, kernel: torch.nn.Module | None = None):
        """Codes in ``layout`` (plain: (rows, cols) uint8; packed: bit planes; kernel: None, held by ``kernel``),
        ``scale`` (scale_rows, groups) in its stored dtype, ``zero`` (rows, groups) holding its stored values
        exactly (None when implied), ``group_index`` (cols,) or None for contiguous groups. Use
        ``GridWeight.fit`` from solver output."""
        rows, cols = shape
        super().__init__(rows, cols)
        check_layout(layout)
        if zero_storage not in ZERO_STORAGE:
            raise StateError(f"unknown zero-point storage {zero_storage!r}; known: {ZERO_STORAGE}")
        if (zero is None) != (zero_storage == "implied"):
            raise StateError("zero points are either stored or implied by zero_value, not both")
        if rows % scale.shape[0]:
            raise StateError(f"{scale.shape[0]} scale rows do not divide {rows} weight rows")
        self.bits = bits
        self.zero_storage = zero_storage
        self.zero_value = zero_value
        self.integer_zero = integer_zero
        self._layout = layout
        self.lut_rows = lut_rows
        if (kernel is not None) != (layout == "kernel"):
            raise StateError("a kernel holds the codes exactly in the kernel layout")
        self.kernel = kernel
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)
        self.register_buffer("group_index", group_index)

    @classmethod
    def fit(cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_index: torch.Tensor, *,
            bits: int, integer_zero: bool, shared_scale: bool = False, scale_rows: int | None = None,
            zero_value: float | None = None, scale_dtype: torch.dtype = torch.float16) -> "GridWeight":
        """From a quantizer's output: codes (rows, cols), per-row ``scale`` and ``zero`` (rows, groups) in
        float32, ``group_index`` (cols,). ``shared_scale``: QuIP's grid (one scale for all rows, zero at
        ``maxq / 2``); ``scale_rows``/``zero_value``: one scale per block of rows and an implied zero.
        Raises when the parameters are not exactly what storage keeps (the quantizer must round them)."""
        rows, cols = codes.shape
        groups = scale.shape[1]
        if shared_scale:
            scale_rows, zero_value = 1, (2**bits - 1) / 2
        scale_rows = rows if scale_rows is None else scale_rows
        if rows % scale_rows:
            raise StateError(f"scale_rows={scale_rows} does not divide the {rows} rows")
        blocked = scale.view(scale_rows, rows // scale_rows, groups)
        if not bool((blocked == blocked[:, :1]).all()):
            raise StateError(f"rows sharing a scale (scale_rows={scale_rows}) have different scales")
        stored_scale = _exact(blocked[:, 0], scale_dtype, "scale")
        if zero_value is not None:
            if not bool((zero == zero_value).all()):
                raise StateError(f"a grid with an implied zero point needs every zero equal to {zero_value}")
            stored_zero, storage = None, "implied"
        else:
            stored_zero, storage = _zero_storage(zero, bits, integer_zero, scale_dtype)
        index = None if _contiguous(group_index, cols, groups) else group_index.long()
        return cls(codes.to(torch.uint8), stored_scale, stored_zero, index, bits=bits, shape=(rows, cols),
                   zero_storage=storage, zero_value=zero_value, integer_zero=integer_zero)

    # --- geometry -----------------------------------------------------------------------

    @property
    def groups(self) -> int:
        return self.scale.shape[1]

    @property
    def group_size(self) -> int:
        return math.ceil(self.in_features / self.groups)

    @property
    def scale_rows(self) -> int:
        return self.scale.shape[0]

    @property
    def layout(self) -> str:
        return self._layout

    def column_groups(self) -> torch.Tensor:
        if self.group_index is not None:
            return self.group_index
        return torch.arange(self.in_features, device=self.scale.device) // self.group_size

    # --- values -------------------------------------------------------------------------

    def code_values(self) -> torch.Tensor:
        """The (rows, cols) codes as uint8, whatever the layout."""
        if self._layout == "plain":
            return self.codes
        if self._layout == "kernel":
            return self.kernel.codes()
        return unpack_bits(self.codes, self.bits, self.out_features * self.in_features).view(
            self.out_features, self.in_features)

    def _row_scale_zero(self):
        """Scale (rows or 1, groups) and zero (rows, groups) or a number, in float32."""
        scale = self.scale.float()
        if self.scale_rows not in (1, self.out_features):
            scale = scale.repeat_interleave(self.out_features // self.scale_rows, dim=0)
        zero = self.zero_value if self.zero is None else self.zero.float()
        return scale, zero

    def weight(self) -> torch.Tensor:
        if self._layout == "kernel":
            return self.kernel.dequantize().T.float()
        if self._layout == "plain":
            weight = self.codes.float()
        else:
            weight = decode_codes(self.codes, self.bits, self.out_features, self.in_features)
        scale, zero = self._row_scale_zero()
        # In place on the fresh float codes: (codes - zero) * scale with no second (rows, cols) buffer.
        if self.groups == 1:
            return weight.sub_(zero).mul_(scale)
        if self.group_index is None and self.in_features % self.group_size == 0:
            grouped = weight.view(self.out_features, self.groups, self.group_size)
            grouped.sub_(zero if self.zero is None else zero.unsqueeze(-1)).mul_(scale.unsqueeze(-1))
            return weight
        index = self.column_groups()
        if self.zero is not None:
            weight.sub_(zero.index_select(1, index))
        else:
            weight.sub_(zero)
        return weight.mul_(scale.index_select(1, index))

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self._layout == "kernel":
            y = self.kernel(x.to(self.kernel.dtype)).to(x.dtype)
            return y if bias is None else y + bias.to(y.dtype)
        if self._layout == "packed" and self.lut_ok and x.numel() // self.in_features <= self.lut_rows:
            y = self._lut_forward(x)
            return y if bias is None else y + bias.to(y.dtype)
        return super().forward(x, bias)

    @property
    def lut_ok(self) -> bool:
        """Whether the table-lookup kernel handles this weight's layout (contiguous groups of whole bytes)."""
        return self.group_index is None and lut_supported(self.bits, self.in_features, self.group_size)

    def _lut_forward(self, x: torch.Tensor) -> torch.Tensor:
        cols = self.in_features
        flat = x.reshape(-1, cols)
        partial = lut_matmul(flat, self.codes, self.bits, self.out_features, cols, self.group_size)  # (n, rows, groups)
        scale, zero = self._row_scale_zero()
        group_sums = flat.float().view(flat.shape[0], self.groups, self.group_size).sum(-1)  # (n, groups)
        y = (scale * (partial - zero * group_sums.unsqueeze(1))).sum(-1)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def with_layout(self, layout: str, *, device=None, dtype: torch.dtype = torch.float16) -> "GridWeight":
        check_layout(layout)
        if layout == self._layout and layout != "kernel":
            return self
        kernel, codes = None, None
        if layout == "kernel":
            problem = self.kernel_problem()
            if problem is not None:
                log.warning("%s: no kernel layout (%s); kept bit-packed (CPU kernels)", self.extra_repr(), problem)
                return self.with_layout("packed")
            kernel = self._kernel_matrix(self.scale.device if device is None else device, dtype)
        elif layout == "packed":
            codes = pack_bits(self.code_values(), self.bits).to(self.scale.device)
        else:
            codes = self.code_values()
        clone = GridWeight(codes, self.scale, self.zero, self.group_index, bits=self.bits,
                           shape=(self.out_features, self.in_features), zero_storage=self.zero_storage,
                           zero_value=self.zero_value, integer_zero=self.integer_zero, layout=layout,
                           lut_rows=self.lut_rows, kernel=kernel)
        _copy_identity(self, clone)
        return clone if device is None else clone.to(device)

    def kernel_problem(self) -> str | None:
        """Why this weight has no kernel layout, or None."""
        from fqbench.kernels.packed_matrix import SUPPORTED_BITS

        if self.bits not in SUPPORTED_BITS:
            return f"{self.bits}-bit codes (kernels take {SUPPORTED_BITS})"
        if self.group_index is not None:
            return "act-order groups that are not contiguous"
        if self.in_features % self.group_size:
            return f"groups of {self.group_size} columns do not divide {self.in_features}"
        return None

    def _kernel_matrix(self, device, dtype: torch.dtype):
        from fqbench.kernels.packed_matrix import QuantizedWeights
        from fqbench.kernels.select import build_matrix

        scale, zero = self._row_scale_zero()
        scale = scale.expand(self.out_features, self.groups)
        zero = torch.full_like(scale, zero) if self.zero is None else zero
        weights = QuantizedWeights(codes=self.code_values().to(device),
                                   scale=scale.to(device, torch.float16).contiguous(),
                                   zero=zero.to(device).contiguous(), bits=self.bits, group_size=self.group_size)
        return build_matrix(weights, device, dtype)

    # --- storage ------------------------------------------------------------------------

    def stored(self) -> dict[str, Stored]:
        rows, cols = self.out_features, self.in_features
        codes = self.codes if self._layout == "packed" else pack_bits(self.code_values(), self.bits)
        stored = {
            "codes": Stored(codes, rows * cols * self.bits),
            "scale": Stored(self.scale, self.scale.numel() * dtype_bits(self.scale.dtype)),
        }
        if self.zero_storage == "packed":
            stored["zero"] = Stored(pack_bits(self.zero, self.bits), self.zero.numel() * self.bits)
        elif self.zero is not None:
            stored["zero"] = Stored(self.zero, self.zero.numel() * dtype_bits(self.zero.dtype))
        if self.group_index is not None:
            width = index_bits(self.groups)
            stored["group_index"] = Stored(pack_bits(self.group_index, width), cols * width)
        return stored

    def meta(self) -> dict:
        return {"bits": self.bits, "groups": self.groups, "scale_rows": self.scale_rows,
                "scale_dtype": dtype_name(self.scale.dtype), "zero": self.zero_storage,
                "zero_value": self.zero_value, "integer_zero": self.integer_zero,
                "contiguous_groups": self.group_index is None}

    @classmethod
    def expected_tensors(cls, meta: dict) -> dict:
        bits, (rows, cols), groups = meta["bits"], meta["shape"], meta["groups"]
        scale_dtype = _scale_dtype(meta)
        expected = {"codes": (packed_shape(rows * cols, bits), torch.uint8),
                    "scale": ((meta["scale_rows"], groups), scale_dtype)}
        zero = meta["zero"]
        if zero == "packed":
            expected["zero"] = (packed_shape(rows * groups, bits), torch.uint8)
        elif zero in ("int16", "float16", "float32"):
            expected["zero"] = ((rows, groups), dtype_named(zero))
        elif zero != "implied":
            raise StateError(f"unknown zero-point storage {zero!r}")
        if not meta["contiguous_groups"]:
            expected["group_index"] = (packed_shape(cols, index_bits(groups)), torch.uint8)
        return expected

    @classmethod
    def from_state(cls, tensors: dict, meta: dict, layout: str = "plain") -> "GridWeight":
        bits, (rows, cols), groups = meta["bits"], meta["shape"], meta["groups"]
        codes = tensors["codes"]
        if layout == "plain":
            codes = unpack_bits(codes, bits, rows * cols).view(rows, cols)
        zero = tensors.get("zero")
        if meta["zero"] == "packed":
            zero = unpack_bits(zero, bits, rows * groups).view(rows, groups)
        group_index = None
        if not meta["contiguous_groups"]:
            group_index = unpack_bits(tensors["group_index"], index_bits(groups), cols).long()
            if int(group_index.max()) >= groups:
                raise StateError(f"group_index refers to group {int(group_index.max())} of {groups}")
        return cls(codes, tensors["scale"], zero, group_index, bits=bits, shape=(rows, cols),
                   zero_storage=meta["zero"], zero_value=meta.get("zero_value"),
                   integer_zero=meta["integer_zero"], layout=layout)


def _scale_dtype(meta: dict) -> torch.dtype:
    name = meta.get("scale_dtype", "float16")
    if name not in SCALE_DTYPES:
        raise StateError(f"unknown scale_dtype {name!r}; known: {', '.join(SCALE_DTYPES)}")
    return SCALE_DTYPES[name]


def _exact(t: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    stored = t.to(dtype)
    if not torch.equal(stored.float(), t.float()):
        raise StateError(f"{name} is not exactly representable in {dtype_name(dtype)}, so storing it would change "
                         f"the model; the quantizer must round its {name} to {dtype_name(dtype)} when fitting")
    return stored.contiguous()


def _zero_storage(zero: torch.Tensor, bits: int, integer_zero: bool, float_dtype: torch.dtype):
    """Integer zero points inside the code range pack at ``bits`` bits; other integers as int16; the rest as floats."""
    integral = bool((zero == zero.round()).all())
    if integer_zero and integral and bool(((zero >= 0) & (zero <= 2**bits - 1)).all()):
        return zero.to(torch.uint8), "packed"
    if integer_zero and integral and bool((zero.abs() <= torch.iinfo(torch.int16).max).all()):
        return zero.to(torch.int16), "int16"
    return _exact(zero, float_dtype, "zero"), dtype_name(float_dtype)


def _contiguous(group_index: torch.Tensor, cols: int, groups: int) -> bool:
    """True when the group of column c is c // groupsize, so no index needs storing."""
    if groups == 1:
        return True
    implied = torch.arange(cols, device=group_index.device) // math.ceil(cols / groups)
    return bool(torch.equal(implied, group_index))


def _copy_identity(source: QuantizedWeight, target: QuantizedWeight) -> None:
    target.method, target.nominal_bits, target.info = source.method, source.nominal_bits, dict(source.info)
