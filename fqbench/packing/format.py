"""One quantized layer <-> the tensors and metadata a packed checkpoint stores for it, and the format's history.

A layer is a ``QuantLinear`` (or the ``QuantizedWeight`` the engine put into a fake-quantized
``nn.Linear``). Its tensors are named relative to ``<linear>.quantized.``:

- the weight's own tensors (``QuantizedWeight.state()``: each weight kind owns its layout;
  see ``fqbench.quantized.grid``, ``.transformed``, ``.dense``);
- ``input_quantizer.*`` / ``output_quantizer.*``: the layer's activation quantizers.

Its metadata (JSON, in ``config.json``) is the weight's metadata (``kind``, ``shape`` and the
kind's own keys) plus ``method``, ``nominal_bits``, ``bits_per_weight`` and the activation
quantizers' metadata. Loading dispatches on ``kind`` through ``fqbench.quantized.WEIGHT_KINDS``.

Format history: version 1 (fqbench before the one-quantized-layer redesign) stored the same
tensors, with a grid's metadata under ``grid`` (``shared_scale`` for QuIP's grid), a transformed
layer's inner grid tensors without the ``inner.`` prefix, and frame-space activation bits as
``act_bits``. ``upgrade_layer`` rewrites a version-1 layer into the current form.
"""

from __future__ import annotations

import torch

from fqbench.quantized import QuantizedWeight, QuantLinear, StateError, quantizer_from_state, weight_from_state
from fqbench.quantized.base import sub_state

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
QUANTIZER_SLOTS = ("input_quantizer", "output_quantizer")


class PackedFormatError(ValueError):
    """A packed checkpoint (or a layer to pack) does not match what the format needs."""


def pack_layer(weight: QuantizedWeight, quantizers: dict | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, meta)`` for one quantized layer and its activation quantizers (``{slot: quantizer}``)."""
    try:
        tensors, meta = weight.cpu().state()
    except StateError as error:
        raise PackedFormatError(f"cannot pack a {type(weight).__name__}: {error}") from error
    meta.update(method=weight.method, nominal_bits=weight.nominal_bits, bits_per_weight=weight.bits_per_weight)
    for slot in QUANTIZER_SLOTS:
        quantizer = (quantizers or {}).get(slot)
        meta[slot] = None if quantizer is None else quantizer.meta()
        if quantizer is not None:
            tensors.update({f"{slot}.{k}": v.tensor.detach().cpu().contiguous() for k, v in quantizer.stored().items()})
    return tensors, meta


def unpack_layer(name: str, meta: dict, tensors: dict[str, torch.Tensor], layout: str = "plain"):
    """``(weight, {slot: quantizer})`` rebuilt from a layer's stored tensors (checked first)."""
    weight_tensors = {k: v for k, v in tensors.items() if k.split(".", 1)[0] not in QUANTIZER_SLOTS}
    try:
        weight = weight_from_state(weight_tensors, meta, layout, name)
        quantizers = {slot: quantizer_from_state(sub_state(tensors, slot), meta[slot], f"{name}.{slot}")
                      for slot in QUANTIZER_SLOTS if meta.get(slot)}
    except StateError as error:
        raise PackedFormatError(str(error)) from error
    return weight, quantizers


def layer_module(weight: QuantizedWeight, quantizers: dict, bias: torch.Tensor | None) -> QuantLinear:
    return QuantLinear(weight, bias, **quantizers)


# --- format version 1 ----------------------------------------------------------------------------


def upgrade_layer(meta: dict, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """A version-1 layer's metadata and tensors in the current form."""
    kind = meta.get("kind")
    if kind == "dense":
        return {**meta, "input_quantizer": None, "output_quantizer": None}, tensors
    if kind not in ("grid", "transformed"):
        raise PackedFormatError(f"unknown layer kind {kind!r} in a format-1 checkpoint")
    common = {k: meta[k] for k in ("shape", "method", "nominal_bits", "bits_per_weight") if k in meta}
    grid = _upgrade_grid(meta["grid"])
    extras = {"input_quantizer": None, "output_quantizer": None}
    if kind == "grid":
        if grid["scale_rows"] == 1:
            tensors = {**tensors, "scale": tensors["scale"].reshape(1, -1)}
        return {**common, **grid, **extras}, tensors
    act_bits = meta.get("act_bits")
    upgraded = {**common, "kind": "transformed", "inner": grid, "in_op": meta.get("in_op"),
                "out_op": meta.get("out_op"), "input_scale": bool(meta.get("input_scale")),
                "coefficient_quantizer": None if act_bits is None else {"kind": "per_token", "bits": act_bits,
                                                                        "sizes": {}}, **extras}
    inner_names = ("codes", "scale", "zero", "group_index")
    renamed = {(f"inner.{k}" if k in inner_names else k): v for k, v in tensors.items()}
    if grid["scale_rows"] == 1 and "inner.scale" in renamed:
        renamed["inner.scale"] = renamed["inner.scale"].reshape(1, -1)
    return upgraded, renamed


def _upgrade_grid(grid: dict) -> dict:
    bits, (rows, _), shared = grid["bits"], grid["shape"], grid["shared_scale"]
    return {"kind": "grid", "shape": grid["shape"], "bits": bits, "groups": grid["groups"],
            "scale_rows": 1 if shared else rows, "scale_dtype": "float16", "zero": grid["zero"],
            "zero_value": (2**bits - 1) / 2 if shared else None, "integer_zero": grid["integer_zero"],
            "contiguous_groups": grid["contiguous_groups"]}
