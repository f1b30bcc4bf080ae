"""The safetensors container: reading a file's header without its data, and the exact
size a set of tensors takes as a safetensors file (for sizes of files never written).

Layout: 8 bytes (little-endian header length), the JSON header (``__metadata__`` and
per tensor dtype, shape and data offsets; tensors ordered by dtype, widest first,
then by name; padded with spaces to a multiple of 8 bytes), then the data.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

# safetensors' dtype order; tensors are laid out from the last (widest) to the first.
_DTYPE_ORDER = ("BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16",
                "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64")
_DTYPE_NAMES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.float16: "F16",
                torch.bfloat16: "BF16", torch.int32: "I32", torch.float32: "F32", torch.float64: "F64",
                torch.int64: "I64"}
_ITEM_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
               "F64": 8, "I64": 8, "U64": 8}
METADATA = {"format": "pt"}


def read_header(path: str | Path) -> dict[str, dict]:
    """``{name: {"dtype", "shape", "data_offsets"}}`` (and ``__metadata__``) of a safetensors file."""
    path = Path(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than 8 bytes)")
        (length,) = struct.unpack("<Q", prefix)
        if length > path.stat().st_size - 8:
            raise ValueError(f"{path} is truncated or not a safetensors file (header length {length})")
        try:
            return json.loads(f.read(length))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} has a corrupted safetensors header: {error}") from error


def data_offset(path: str | Path) -> int:
    """Where a safetensors file's data begins: after the 8-byte length and the header."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
    return 8 + length


def tensor_bytes(entry: dict) -> int:
    start, end = entry["data_offsets"]
    return end - start


def file_size(tensors: dict[str, tuple[tuple[int, ...], torch.dtype]], metadata: dict | None = METADATA) -> int:
    """Bytes of a safetensors file holding tensors of these shapes and dtypes (name -> (shape, dtype))."""
    entries = []
    for name, (shape, dtype) in tensors.items():
        code = _DTYPE_NAMES[dtype]
        numel = 1
        for n in shape:
            numel *= n
        entries.append((name, code, list(shape), numel * _ITEM_BYTES[code]))
    entries.sort(key=lambda e: (-_DTYPE_ORDER.index(e[1]), e[0]))
    header: dict = {} if metadata is None else {"__metadata__": metadata}
    offset = 0
    for name, code, shape, size in entries:
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    length = len(json.dumps(header, separators=(",", ":")).encode())
    return 8 + length + (-length) % 8 + offset
