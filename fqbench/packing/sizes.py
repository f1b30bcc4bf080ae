"""Sizes of a packed checkpoint, measured from its files (paper Table 6).

    sizes = checkpoint_sizes("out/packed")
    sizes["bytes"], sizes["fp16_bytes"], sizes["bits_per_weight"]

- ``bytes``: what the checkpoint takes on disk (``model.safetensors`` + ``config.json``);
- ``fp16_bytes``: the exact size of the same model as an FP16 safetensors file
  (every floating-point tensor at 16 bits, quantized weights as dense ``(out, in)``
  matrices, tied tensors once), as ``save_pretrained`` would write the original;
- ``bits_per_weight``: the bytes of the quantized layers' tensors, times 8, over
  their number of original weights: the honest figure, read off the files. It
  equals the engine's ``bits_per_weight`` (``accounting_bits_per_weight``) up to
  the padding of each packed tensor to whole bytes;
- ``overhead_bytes``: the safetensors header and ``config.json``, reported apart;
  ``other_tensor_bytes``: the tensors that stay in full precision (embeddings,
  norms, biases, heads).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fqbench.packing.checkpoint import read_checkpoint_config
from fqbench.packing.names import CONFIG_NAME, INFIX, WEIGHTS_NAME
from fqbench.packing.safetensors_file import file_size, read_header, tensor_bytes

_FLOAT_CODES = {"F16", "BF16", "F32", "F64"}
_INT_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
               "I64": torch.int64}


def checkpoint_sizes(directory: str | os.PathLike) -> dict:
    directory = Path(directory)
    _, qc = read_checkpoint_config(directory)
    weights_path, config_path = directory / WEIGHTS_NAME, directory / CONFIG_NAME
    header = read_header(weights_path)
    header.pop("__metadata__", None)
    layers = qc["layers"]

    payload = dict.fromkeys(layers, 0)
    other_bytes = other_params = 0
    fp16_tensors: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    marker = f".{INFIX}."
    for name, entry in header.items():
        if marker in name:
            payload[name[: name.index(marker)]] += tensor_bytes(entry)
            continue
        other_bytes += tensor_bytes(entry)
        numel = 1
        for n in entry["shape"]:
            numel *= n
        other_params += numel
        dtype = torch.float16 if entry["dtype"] in _FLOAT_CODES else _INT_DTYPES[entry["dtype"]]
        fp16_tensors[name] = (tuple(entry["shape"]), dtype)
    weights = {name: meta["shape"][0] * meta["shape"][1] for name, meta in layers.items()}
    for name, meta in layers.items():
        fp16_tensors[f"{name}.weight"] = (tuple(meta["shape"]), torch.float16)

    quantized_weights = sum(weights.values())
    payload_bytes = sum(payload.values())
    safetensors_bytes = weights_path.stat().st_size
    config_bytes = config_path.stat().st_size
    total = safetensors_bytes + config_bytes
    fp16 = file_size(fp16_tensors)
    per_layer = {name: 8 * payload[name] / weights[name] for name in layers}
    return {
        "bytes": total,
        "safetensors_bytes": safetensors_bytes,
        "config_bytes": config_bytes,
        "overhead_bytes": safetensors_bytes - payload_bytes - other_bytes + config_bytes,
        "quantized_payload_bytes": payload_bytes,
        "other_tensor_bytes": other_bytes,
        "quantized_weights": quantized_weights,
        "parameters": quantized_weights + other_params,
        "bits_per_weight": 8 * payload_bytes / quantized_weights if quantized_weights else float("nan"),
        "accounting_bits_per_weight": qc.get("bits_per_weight"),
        "nominal_bits": qc.get("nominal_bits"),
        "model_bits_per_parameter": 8 * total / (quantized_weights + other_params),
        "fp16_bytes": fp16,
        "compression_vs_fp16": fp16 / total,
        "layer_bits_per_weight": per_layer,
    }
