"""One quantized layer <-> the tensors and metadata a packed checkpoint stores for it.

Tensors of a layer (names relative to ``<linear>.quantized.``), every one of them
counted by the layer's ``storage()``:

- ``codes``: the integer codes bit-packed at ``bits`` bits (``fqbench.packing.bits``);
- ``scale``: float16, ``(rows, groups)``; QuIP's shared grid stores ``(groups,)``;
- ``zero``: integer zero points inside the code range, packed at ``bits`` bits;
  other zero points as int16 (integers) or float16; absent for QuIP's grid (fixed
  at ``maxq / 2``);
- ``group_index``: only when groups are not contiguous (act-order), packed at
  ``ceil(log2 groups)`` bits;
- transformed layers (FrameQuant, QuIP) add ``input_scale`` (float16, QuIP's
  rescaling) and, per side, ``in_op.spec`` / ``out_op.spec`` (int32: dim, block,
  rotation kind, seed) and ``in_op.redundancy`` / ``out_op.redundancy`` (float64,
  the requested redundancy, NaN for a rotation without a frame). Frames and
  rotations are regenerated from these; nothing dense is stored;
- ``weight`` for a full-precision (``fp``) layer, in its own dtype.

The metadata (JSON, in ``config.json``) holds the layer kind, shapes and flags, plus
a readable description of each frame (effective redundancy, padded dimension,
coefficients) that is checked against the regenerated operator on load.
"""

from __future__ import annotations

import math

import torch

from fqbench.frames.operator import FrameOperator, OperatorSpec
from fqbench.frames.rotation import KINDS as ROTATION_KINDS
from fqbench.methods.layers import DenseLayer, GridLayer, QuantizedLayer, TransformedLayer
from fqbench.packing.bits import pack_bits, packed_shape, unpack_bits

# Stable ids of rotation kinds in the file format (never renumber; append new kinds).
ROTATION_IDS = {"auto": 0, "hadamard": 1, "kronecker": 2, "orthogonal": 3, "block_hadamard": 4, "identity": 5}
assert set(ROTATION_KINDS) <= set(ROTATION_IDS), "every rotation kind needs a format id in ROTATION_IDS"
ROTATION_NAMES = {v: k for k, v in ROTATION_IDS.items()}

LAYER_KINDS = ("grid", "transformed", "dense")


class PackedFormatError(ValueError):
    """A packed checkpoint (or a layer to pack) does not match what the format needs."""


# --- packing -----------------------------------------------------------------------------


def pack_layer(layer: QuantizedLayer) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, meta)`` for one quantized layer; raises if the layer cannot be stored exactly."""
    layer = layer.cpu()
    if isinstance(layer, TransformedLayer):
        tensors, grid_meta = pack_grid(layer.inner)
        meta = {"kind": "transformed", "grid": grid_meta, "act_bits": layer.act_bits,
                "input_scale": layer.input_scale is not None}
        if layer.input_scale is not None:
            tensors["input_scale"] = _float16_exact(layer.input_scale, "input_scale")
        for side, op in (("in_op", layer.in_op), ("out_op", layer.out_op)):
            spec, redundancy = _pack_operator(op.spec)
            tensors[f"{side}.spec"], tensors[f"{side}.redundancy"] = spec, redundancy
            meta[side] = describe_operator(op)
    elif isinstance(layer, GridLayer):
        tensors, grid_meta = pack_grid(layer)
        meta = {"kind": "grid", "grid": grid_meta}
    elif isinstance(layer, DenseLayer):
        tensors = {"weight": layer.dense_weight.contiguous()}
        meta = {"kind": "dense", "dtype": str(layer.dense_weight.dtype).removeprefix("torch.")}
    else:
        raise PackedFormatError(f"cannot pack a {type(layer).__name__}: the packed format knows GridLayer, "
                                f"TransformedLayer and DenseLayer")
    meta.update(shape=[layer.out_features, layer.in_features], method=layer.method,
                nominal_bits=layer.nominal_bits, bits_per_weight=layer.bits_per_weight)
    return tensors, meta


def pack_grid(grid: GridLayer) -> tuple[dict[str, torch.Tensor], dict]:
    rows, cols = grid.codes.shape
    groups = grid.num_groups
    tensors = {"codes": pack_bits(grid.codes, grid.bits)}
    if grid.shared_scale:
        # One scale per group for every row (QuIP's grid), zero fixed at maxq / 2.
        if not bool((grid.scale == grid.scale[:1]).all()):
            raise PackedFormatError("a shared-scale grid has rows with different scales")
        if not bool((grid.zero == (2**grid.bits - 1) / 2).all()):
            raise PackedFormatError("a shared-scale grid must have its zero point at maxq / 2")
        tensors["scale"] = _float16_exact(grid.scale[0], "scale")
        zero = "implied"
    else:
        tensors["scale"] = _float16_exact(grid.scale, "scale")
        zero = _zero_storage(grid)
        if zero == "packed":
            tensors["zero"] = pack_bits(grid.zero, grid.bits)
        elif zero == "int16":
            tensors["zero"] = grid.zero.to(torch.int16)
        else:
            tensors["zero"] = _float16_exact(grid.zero, "zero")
    contiguous = grid.groups_are_contiguous()
    if not contiguous:
        tensors["group_index"] = pack_bits(grid.group_index, group_index_bits(groups))
    meta = {"bits": grid.bits, "shape": [rows, cols], "groups": groups, "integer_zero": grid.integer_zero,
            "shared_scale": grid.shared_scale, "zero": zero, "contiguous_groups": contiguous}
    return tensors, meta


def _zero_storage(grid: GridLayer) -> str:
    """How the zero points are stored, at the width ``GridLayer.zero_bits`` accounts for."""
    if grid.zero_bits == grid.bits:
        return "packed"
    integral = bool((grid.zero == grid.zero.round()).all())
    if grid.integer_zero and integral and bool((grid.zero.abs() <= torch.iinfo(torch.int16).max).all()):
        return "int16"
    return "float16"


def group_index_bits(groups: int) -> int:
    return max(1, math.ceil(math.log2(groups)))


def _float16_exact(t: torch.Tensor, name: str) -> torch.Tensor:
    half = t.to(torch.float16)
    if not torch.equal(half.float(), t.float()):
        raise PackedFormatError(f"{name} is not exactly representable in float16, so packing would change the "
                                f"model; the quantizer must round its {name} to float16 when fitting")
    return half.contiguous()


def _pack_operator(spec: OperatorSpec) -> tuple[torch.Tensor, torch.Tensor]:
    if spec.rotation not in ROTATION_IDS:
        raise PackedFormatError(f"rotation kind {spec.rotation!r} has no id in the packed format")
    words = torch.tensor([spec.dim, spec.block, ROTATION_IDS[spec.rotation], spec.seed], dtype=torch.int64)
    if int(words.abs().max()) > torch.iinfo(torch.int32).max:
        raise PackedFormatError(f"operator spec {spec} does not fit int32")
    redundancy = float("nan") if spec.redundancy is None else float(spec.redundancy)
    return words.to(torch.int32), torch.tensor([redundancy], dtype=torch.float64)


def describe_operator(op: FrameOperator) -> dict:
    """What a reader of ``config.json`` wants to know about a frame; checked on load."""
    return {"dim": op.dim, "redundancy": op.spec.redundancy, "effective_redundancy": op.effective_redundancy,
            "block": op.spec.block, "frame_block": None if op.plan is None else op.plan.block,
            "subspaces": None if op.plan is None else op.plan.subspaces, "padded_dim": op.padded_dim,
            "num_coefficients": op.num_coefficients, "rotation": op.rotation.kind, "seed": op.spec.seed}


# --- unpacking ---------------------------------------------------------------------------


def expected_tensors(meta: dict) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every tensor a layer with this metadata must have."""
    kind = meta.get("kind")
    if kind not in LAYER_KINDS:
        raise PackedFormatError(f"unknown layer kind {kind!r}; this version of fqbench reads {LAYER_KINDS}")
    if kind == "dense":
        return {"weight": (tuple(meta["shape"]), _dtype(meta["dtype"]))}
    grid = meta["grid"]
    bits, (rows, cols), groups = grid["bits"], grid["shape"], grid["groups"]
    expected = {"codes": (packed_shape(rows * cols, bits), torch.uint8)}
    expected["scale"] = ((groups,) if grid["shared_scale"] else (rows, groups), torch.float16)
    zero = grid["zero"]
    if zero == "packed":
        expected["zero"] = (packed_shape(rows * groups, bits), torch.uint8)
    elif zero in ("int16", "float16"):
        expected["zero"] = ((rows, groups), _dtype(zero))
    elif zero != "implied":
        raise PackedFormatError(f"unknown zero-point storage {zero!r}")
    if not grid["contiguous_groups"]:
        expected["group_index"] = (packed_shape(cols, group_index_bits(groups)), torch.uint8)
    if kind == "transformed":
        for side in ("in_op", "out_op"):
            expected[f"{side}.spec"] = ((4,), torch.int32)
            expected[f"{side}.redundancy"] = ((1,), torch.float64)
        if meta.get("input_scale"):
            expected["input_scale"] = ((meta["shape"][1],), torch.float16)
    return expected


def check_tensors(name: str, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Raise a clear error when a layer's tensors are missing, extra or of the wrong shape or dtype."""
    expected = expected_tensors(meta)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise PackedFormatError(f"layer {name}: missing tensor(s) {', '.join(f'{name}.quantized.{m}' for m in missing)}; "
                                f"the checkpoint is incomplete or corrupted")
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        raise PackedFormatError(f"layer {name}: unexpected tensor(s) {unknown} for a {meta['kind']} layer")
    for key, (shape, dtype) in expected.items():
        t = tensors[key]
        if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
            raise PackedFormatError(f"layer {name}: tensor {key} should be {dtype} of shape {tuple(shape)}, "
                                    f"found {t.dtype} of shape {tuple(t.shape)}; the checkpoint is corrupted "
                                    f"or does not match its config.json")


def unpack_layer(name: str, meta: dict, tensors: dict[str, torch.Tensor]) -> QuantizedLayer:
    """Rebuild the exact ``QuantizedLayer`` from its stored tensors (checked first)."""
    check_tensors(name, meta, tensors)
    kind = meta["kind"]
    if kind == "dense":
        layer = DenseLayer(tensors["weight"])
    else:
        grid = unpack_grid(meta["grid"], tensors)
        if kind == "grid":
            layer = grid
        else:
            in_op, out_op = unpack_operators(name, meta, tensors)
            input_scale = tensors.get("input_scale")
            layer = TransformedLayer(grid, in_op, out_op, None if input_scale is None else input_scale.float(),
                                     meta.get("act_bits"))
    if [layer.out_features, layer.in_features] != list(meta["shape"]):
        raise PackedFormatError(f"layer {name}: rebuilt shape {[layer.out_features, layer.in_features]} "
                                f"differs from the recorded {meta['shape']}")
    layer.method = meta.get("method", "")
    layer.nominal_bits = meta.get("nominal_bits", float("nan"))
    return layer


def unpack_grid(grid: dict, tensors: dict[str, torch.Tensor]) -> GridLayer:
    bits, (rows, cols), groups = grid["bits"], grid["shape"], grid["groups"]
    codes = unpack_bits(tensors["codes"], bits, rows * cols).view(rows, cols)
    scale, zero, group_index = grid_parameters(grid, tensors)
    if group_index is None:
        group_index = torch.arange(cols) // math.ceil(cols / groups)
    return GridLayer(codes, scale.float(), zero.float(), group_index.long(), bits, grid["integer_zero"],
                     grid["shared_scale"])


def grid_parameters(grid: dict, tensors: dict[str, torch.Tensor]):
    """``(scale, zero, group_index)`` at their stored precision: scale and zero ``(rows, groups)``,
    group_index ``(cols,)`` int32, or None when the groups are contiguous."""
    bits, (rows, cols), groups = grid["bits"], grid["shape"], grid["groups"]
    scale = tensors["scale"]
    if grid["shared_scale"]:
        scale = scale.unsqueeze(0).expand(rows, groups).contiguous()
        zero = torch.full((rows, groups), (2**bits - 1) / 2, dtype=torch.float16, device=scale.device)
    elif grid["zero"] == "packed":
        zero = unpack_bits(tensors["zero"], bits, rows * groups).view(rows, groups)
    else:
        zero = tensors["zero"]
    group_index = None
    if not grid["contiguous_groups"]:
        group_index = unpack_bits(tensors["group_index"], group_index_bits(groups), cols).to(torch.int32)
        if int(group_index.max()) >= groups:
            raise PackedFormatError(f"group_index refers to group {int(group_index.max())} of {groups}")
    return scale, zero, group_index


def unpack_operators(name: str, meta: dict, tensors: dict[str, torch.Tensor]) -> tuple[FrameOperator, FrameOperator]:
    """The regenerated ``(in_op, out_op)`` of a transformed layer, checked against its codes."""
    in_op = _unpack_operator(name, "in_op", tensors, meta)
    out_op = _unpack_operator(name, "out_op", tensors, meta)
    coefficients = [out_op.num_coefficients, in_op.num_coefficients]
    if list(meta["grid"]["shape"]) != coefficients:
        raise PackedFormatError(f"layer {name}: the regenerated frames have {coefficients} coefficients but the "
                                f"codes are {meta['grid']['shape']}; the file was written by an "
                                f"incompatible frame construction")
    return in_op, out_op


def _unpack_operator(name: str, side: str, tensors: dict, meta: dict) -> FrameOperator:
    dim, block, rotation_id, seed = (int(v) for v in tensors[f"{side}.spec"])
    redundancy = float(tensors[f"{side}.redundancy"][0])
    if rotation_id not in ROTATION_NAMES:
        raise PackedFormatError(f"layer {name}: unknown rotation id {rotation_id} in {side}.spec")
    spec = OperatorSpec(dim, None if math.isnan(redundancy) else redundancy, block, ROTATION_NAMES[rotation_id], seed)
    op = FrameOperator.from_spec(spec)
    recorded = meta.get(side)
    if recorded is not None:
        rebuilt = describe_operator(op)
        differing = {k: (v, rebuilt[k]) for k, v in recorded.items() if k in rebuilt and rebuilt[k] != v}
        if differing:
            raise PackedFormatError(f"layer {name}: the regenerated {side} differs from config.json "
                                    f"(recorded, regenerated): {differing}")
    return op


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise PackedFormatError(f"unknown dtype {name!r}")
    return dtype
