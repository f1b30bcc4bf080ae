"""Saving a quantized model as a packed checkpoint, and loading it back from the files alone.

A checkpoint is a directory with two files:

- ``model.safetensors``: every tensor of the model that is not a quantized weight
  (embeddings, norms, biases, heads) at the dtype it was evaluated in, each tensor
  shared by tied weights once; and for every quantized linear ``<name>`` its packed
  tensors ``<name>.quantized.*`` (``fqbench.packing.format``);
- ``config.json``: the model's own config (Hugging Face's, or timm's
  ``architecture``/``model_args``) with a ``quantization_config`` entry: the format
  version, the fqbench version and git sha, the method and its options, the dtype,
  tied weights, model-level bits, per quantized layer its metadata, the activation
  quantizers that are modules of their own (e.g. on attention probabilities) and the
  module attributes the quantized forward needs (``fused_attn: false``).

Loading rebuilds the architecture from ``config.json`` and fills it from
``model.safetensors``, nothing else:

    save_quantized(model, layers, "out/packed", method=method)
    model = load_quantized("out/packed")                 # "dequantized": bit-identical to the evaluated model
    model = load_quantized("out/packed", mode="packed")  # weights stay packed (fqbench.packing.modules)

``dequantized`` puts ``layer.weight()`` into every nn.Linear exactly as the engine
does (layers with activation quantizers become ``QuantLinear``), so outputs are
bit-identical to the fake-quantized model when the weights are computed on the same
kind of device as during quantization (``device=``); ``packed`` makes every quantized
linear a ``QuantLinear`` whose weight keeps its codes bit-packed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

import fqbench
from fqbench.methods import registered_methods
from fqbench.models.adapter import replace_module
from fqbench.packing.format import (
    FORMAT_VERSION, QUANTIZER_SLOTS, READABLE_VERSIONS, PackedFormatError, layer_module, pack_layer, unpack_layer,
    upgrade_layer,
)
from fqbench.packing.models import build_model, describe_model
from fqbench.packing.checksums import checksum_metadata, verify_checksums
from fqbench.packing.names import CONFIG_NAME, INFIX, QUANT_METHOD, WEIGHTS_NAME
from fqbench.packing.safetensors_file import METADATA
from fqbench.quantized import ActivationQuantizer, QuantizedWeight, QuantLinear, quantizer_from_state
from fqbench.quantized.base import StateError, sub_state
from fqbench.umask import apply_umask

MODES = ("dequantized", "packed", "kernel")
# Module attributes that change a module's forward without being part of the model's config
# (timm attention's fused path hides the probabilities from their quantizer): recorded when they
# differ from a freshly built model, and set again on load.
FORWARD_ATTRIBUTES = ("fused_attn",)


# --- saving ------------------------------------------------------------------------------


def save_quantized(model: nn.Module, layers: dict[str, QuantizedWeight], directory: str | os.PathLike, *,
                   method, timm_name: str | None = None, timm_kwargs: dict | None = None,
                   device: str | torch.device = "cpu", overwrite: bool = False,
                   write_extra: Callable[[Path], None] | None = None) -> Path:
    """Write ``model`` (quantized by the engine) with its quantized ``layers`` packed.

    ``layers``: the engine's ``{full_name: QuantizedWeight}`` (``keep_layers=True``): each one is the
    fake-quantized weight of an ``nn.Linear`` or the weight of a ``QuantLinear`` (whose activation
    quantizers are stored with it). ``method``: the ``Method`` (or its registered name). timm models need
    the ``timm_kwargs`` they were created with (``timm_name`` defaults to the model's architecture).
    Every layer is checked to be the one in the model: its weight is recomputed on ``device`` (use the
    quantization device) and must equal the model's. ``write_extra(tmp_dir)`` adds files (e.g. a
    tokenizer) before the directory appears.
    """
    directory = Path(directory)
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} exists; choose another directory or pass overwrite=True")
    method_name, method_config = _method_record(method)
    library, model_config = describe_model(model, timm_name, timm_kwargs)
    dtype = _model_dtype(model)
    attn = getattr(getattr(model, "config", None), "_attn_implementation", None)

    tensors, aliases = _regular_tensors(model, layers)
    metas = {}
    for name, layer in layers.items():
        module = _check_layer_in_model(model, name, layer, device)
        quantizers = {slot: getattr(module, slot) for slot in QUANTIZER_SLOTS
                      if isinstance(module, QuantLinear) and getattr(module, slot) is not None}
        layer_tensors, metas[name] = pack_layer(layer, quantizers)
        # the dtype a fake-quantized nn.Linear holds its weight in (a QuantLinear computes it)
        metas[name]["weight_dtype"] = None if isinstance(module, QuantLinear) else _dtype_name(module.weight.dtype)
        tensors.update({f"{name}.{INFIX}.{key}": t for key, t in layer_tensors.items()})
    skeleton = build_model(library, model_config, dtype, attn, device="meta")
    attributes = _forward_attributes(model, skeleton)
    standalone = {path: q.meta() for path, q in _standalone_quantizers(model).items()}
    _prepare(skeleton, attributes, standalone, {k: v for k, v in tensors.items() if not _is_quantized_key(k, metas)})
    _check_coverage(skeleton, {k: t for k, t in tensors.items() if not _is_quantized_key(k, metas)}, metas, aliases)

    weights = {name: m["shape"][0] * m["shape"][1] for name, m in metas.items()}
    total = sum(weights.values())
    config = dict(model_config)
    config["quantization_config"] = {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "fqbench_version": fqbench.__version__,
        "fqbench_git_sha": _git_sha(),
        "torch_version": torch.__version__,
        "method": method_name,
        "method_config": method_config,
        "model_library": library,
        "dtype": _dtype_name(dtype),
        "attn_implementation": attn,
        "tied_tensors": aliases,
        "buffer_dtypes": _recomputed_buffer_dtypes(model),
        "module_attributes": attributes,
        "activation_quantizers": standalone,
        "bits_per_weight": sum(m["bits_per_weight"] * weights[n] for n, m in metas.items()) / total if total else None,
        "nominal_bits": sum(m["nominal_bits"] * weights[n] for n, m in metas.items()) / total if total else None,
        "layers": metas,
    }
    _write_directory(directory, tensors, config, overwrite, write_extra)
    return directory


def _method_record(method) -> tuple[str, dict]:
    if isinstance(method, str):
        name, config = method, {}
    else:
        name, config = method.name, asdict(method.config) if is_dataclass(method.config) else {}
    methods = registered_methods()
    if name not in methods:
        raise ValueError(f"unknown method {name!r}; registered methods: {', '.join(sorted(methods))}")
    return name, config


def _model_dtype(model: nn.Module) -> torch.dtype:
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def _regular_tensors(model: nn.Module, layers: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The model's tensors other than quantized layers', each storage once; and ``{alias: stored name}``."""
    state = model.state_dict()
    skip = set()
    for name in layers:
        module = _submodule(model, name)
        if isinstance(module, nn.Linear):
            skip.add(f"{name}.weight")
        elif isinstance(module, QuantLinear):
            skip.update(k for k in state if k.startswith(f"{name}.") and k != f"{name}.bias")
        else:
            raise ValueError(f"{name} is a {type(module).__name__}; quantized layers must be nn.Linear "
                             f"(fake-quantized) or QuantLinear modules")
    stored: dict[tuple, str] = {}
    tensors, aliases = {}, {}
    for key, t in state.items():
        if key in skip:
            continue
        identity = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()),
                    t.dtype)
        if identity in stored:
            aliases[key] = stored[identity]
            continue
        stored[identity] = key
        tensors[key] = t.detach().cpu().contiguous()
    return tensors, aliases


def _standalone_quantizers(model: nn.Module) -> dict[str, ActivationQuantizer]:
    """Activation quantizers that are modules of the model in their own right (not inside a QuantLinear)."""
    inside = {id(m) for module in model.modules() if isinstance(module, QuantLinear) for m in module.modules()}
    return {path: module for path, module in model.named_modules()
            if isinstance(module, ActivationQuantizer) and id(module) not in inside}


def _forward_attributes(model: nn.Module, skeleton: nn.Module) -> dict[str, dict]:
    """``{module path: {attribute: value}}`` where the model's forward flags differ from a freshly built model."""
    changed: dict[str, dict] = {}
    modules = dict(model.named_modules())
    for path, fresh in skeleton.named_modules():
        for attr in FORWARD_ATTRIBUTES:
            if hasattr(fresh, attr) and path in modules and getattr(modules[path], attr, None) != getattr(fresh, attr):
                changed.setdefault(path, {})[attr] = getattr(modules[path], attr)
    return changed


def _prepare(model: nn.Module, attributes: dict, quantizers: dict, regular: dict[str, torch.Tensor]) -> None:
    """Set the recorded forward attributes and install the standalone activation quantizers (their stored
    tensors are regular tensors of the model: ``<path>.<parameter>``)."""
    for path, values in attributes.items():
        module = _submodule(model, path)
        for attr, value in values.items():
            if attr not in FORWARD_ATTRIBUTES:
                raise PackedFormatError(f"config.json sets {path}.{attr}, which is not a recorded forward attribute")
            setattr(module, attr, value)
    for path, meta in quantizers.items():
        try:
            quantizer = quantizer_from_state(sub_state(regular, path), meta, path)
        except StateError as error:
            raise PackedFormatError(str(error)) from error
        device = next((t.device for t in model.parameters()), torch.device("cpu"))
        replace_module(model, path, quantizer.to(device))


def _recomputed_buffer_dtypes(model: nn.Module) -> dict[str, str]:
    """Dtypes of the floating-point buffers that are not saved (e.g. rotary frequencies): the rebuilt model
    recomputes them, and must cast them as the evaluated model had them."""
    saved = set(model.state_dict())
    return {name: str(b.dtype).removeprefix("torch.") for name, b in model.named_buffers()
            if name not in saved and b.is_floating_point()}


def _check_layer_in_model(model: nn.Module, name: str, layer: QuantizedWeight, device) -> nn.Module:
    module = _submodule(model, name)
    if isinstance(module, QuantLinear):
        if module.quantized is not layer and not torch.equal(module.quantized.weight(), layer.weight()):
            raise ValueError(f"layer {name}: the QuantLinear in the model holds a different quantized weight")
        return module
    if (module.out_features, module.in_features) != (layer.out_features, layer.in_features):
        raise ValueError(f"layer {name}: quantized shape {(layer.out_features, layer.in_features)} differs from the "
                         f"model's linear {(module.out_features, module.in_features)}")
    with torch.no_grad():
        weight = layer.to(device).weight().to(module.weight.dtype).to(module.weight.device)
        layer.cpu()
    if not torch.equal(weight, module.weight):
        raise ValueError(f"layer {name}: the model's weight is not this layer's weight(); save the layers the engine "
                         f"returned for this model, and pass the device it quantized on (device=...)")
    return module


def _write_directory(directory: Path, tensors: dict, config: dict, overwrite: bool, write_extra=None) -> None:
    """Write into a temporary sibling and rename it into place: never a half-written checkpoint."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp-"))
    try:
        save_file(tensors, tmp / WEIGHTS_NAME, metadata={**METADATA, **checksum_metadata(tensors)})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, default=_json_default) + "\n")
        if write_extra is not None:
            write_extra(tmp)
        for path in [tmp, *tmp.rglob("*")]:  # mkdtemp and safetensors make them private
            apply_umask(path)
        if directory.exists():
            if not overwrite:
                raise FileExistsError(f"{directory} exists; pass overwrite=True to replace it")
            old = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.old-"))
            os.replace(directory, old / "replaced")
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _json_default(value):
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if isinstance(value, (tuple, set)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _git_sha() -> str | None:
    from fqbench.records import git_sha

    return git_sha()


# --- loading -----------------------------------------------------------------------------


def read_checkpoint_config(directory: str | os.PathLike) -> tuple[dict, dict]:
    """``(model config, quantization_config)`` of a packed checkpoint, validated."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; is {directory} a packed checkpoint written by fqbench?")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise PackedFormatError(f"{path} is not valid JSON: {error}") from error
    qc = config.pop("quantization_config", None)
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        raise PackedFormatError(f"{path} has no fqbench quantization_config (quant_method={QUANT_METHOD!r}); "
                                f"it is not a packed checkpoint written by fqbench")
    version = qc.get("format_version")
    if version not in READABLE_VERSIONS:
        raise PackedFormatError(f"{path}: format_version {version!r} is not readable by fqbench "
                                f"{fqbench.__version__}, which reads versions {READABLE_VERSIONS}"
                                + ("; upgrade fqbench" if isinstance(version, int) and version > FORMAT_VERSION else ""))
    methods = registered_methods()
    method = qc.get("method")
    if method not in methods:
        raise PackedFormatError(f"{path}: unknown method {method!r} in quantization_config; this fqbench knows "
                                f"{', '.join(sorted(methods))}")
    for key in ("model_library", "dtype", "layers"):
        if key not in qc:
            raise PackedFormatError(f"{path}: quantization_config lacks {key!r}")
    return config, qc


def load_quantized(directory: str | os.PathLike, *, mode: str = "dequantized", device: str | torch.device = "cpu",
                   verify: bool = True) -> nn.Module:
    """The model of a packed checkpoint, rebuilt from its config and tensors only, in eval mode on ``device``.

    ``mode="dequantized"``: nn.Linear weights hold ``layer.weight()`` (bit-identical to the evaluated
    fake-quantized model; layers with activation quantizers become ``QuantLinear``). ``mode="packed"``:
    every quantized linear becomes a ``QuantLinear`` whose weight keeps its codes packed. ``mode="kernel"``:
    the same with the weights in their kernel layout for ``device`` (gemlite on a GPU where it runs, in the
    model's float16/bfloat16; else the PyTorch kernel) and Kronecker-factored frame transforms. ``verify``
    checks every tensor against its stored sha256 (``PackedFormatError`` naming a corrupted tensor).
    Checkpoints of format version 1 are read too.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    directory = Path(directory)
    config, qc = read_checkpoint_config(directory)
    metas = qc["layers"]
    dtype = getattr(torch, qc["dtype"], None)
    if not isinstance(dtype, torch.dtype):
        raise PackedFormatError(f"unknown dtype {qc['dtype']!r} in quantization_config")
    tensors = _read_tensors(directory / WEIGHTS_NAME)
    if verify:
        verify_checksums(directory / WEIGHTS_NAME)
    model = build_model(qc["model_library"], config, dtype, qc.get("attn_implementation"))

    per_layer: dict[str, dict[str, torch.Tensor]] = {name: {} for name in metas}
    regular = {}
    for key, t in tensors.items():
        owner = _quantized_owner(key, metas)
        if owner is None:
            regular[key] = t
        else:
            per_layer[owner][key[len(owner) + len(INFIX) + 2:]] = t
    if qc["format_version"] == 1:
        for name in metas:
            metas[name], per_layer[name] = upgrade_layer(metas[name], per_layer[name])
    aliases = qc.get("tied_tensors", {})
    _prepare(model, qc.get("module_attributes", {}), qc.get("activation_quantizers", {}), regular)
    _check_coverage(model, regular, metas, aliases)
    _assign(model, regular, aliases)
    _cast_recomputed_buffers(model, qc.get("buffer_dtypes", {}))

    layout = {"dequantized": "plain", "packed": "packed", "kernel": "kernel"}[mode]
    kernel_dtype = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32
    for name, meta in metas.items():
        linear = _submodule(model, name)
        if not isinstance(linear, nn.Linear) or [linear.out_features, linear.in_features] != list(meta["shape"]):
            raise PackedFormatError(f"layer {name}: the model built from config.json has {linear} there, not a "
                                    f"linear layer of shape {meta['shape']}")
        weight, quantizers = unpack_layer(f"{name}.{INFIX}", meta, per_layer[name],
                                          "packed" if layout == "kernel" else layout)
        weight = weight.to(device)
        if layout == "kernel":
            weight = weight.with_layout("kernel", device=device, dtype=kernel_dtype)
        if layout != "plain" and weight.kind != "dense" or quantizers or weight.quantizes_activations:
            replace_module(model, name, layer_module(weight, {k: q.to(device) for k, q in quantizers.items()}, linear.bias))
        else:
            dtype = getattr(torch, meta.get("weight_dtype") or "", linear.weight.dtype)
            with torch.no_grad():
                linear.weight.data = weight.weight().to(dtype)
    return model.to(device).eval()


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; the packed checkpoint is incomplete")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise PackedFormatError(f"{path} is not a readable safetensors file ({error}); the checkpoint is corrupted") from error


def _quantized_owner(key: str, metas: dict) -> str | None:
    marker = f".{INFIX}."
    if marker not in key:
        return None
    owner = key[: key.index(marker)]
    if owner not in metas:
        raise PackedFormatError(f"tensor {key} belongs to a quantized layer {owner!r} that config.json does not list")
    return owner


def _is_quantized_key(key: str, metas: dict) -> bool:
    return _quantized_owner(key, metas) is not None


def _check_coverage(model: nn.Module, regular: dict[str, torch.Tensor], metas: dict, aliases: dict) -> None:
    """Every parameter and buffer of the rebuilt model is either stored, tied to a stored one, or a quantized weight."""
    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    quantized_weights = {f"{name}.weight" for name in metas}
    expected = set(state) - quantized_weights - set(aliases)
    missing = sorted(expected - set(regular))
    if missing:
        raise PackedFormatError(f"missing tensor(s) {missing[:8]}{' ...' if len(missing) > 8 else ''}: the checkpoint "
                                f"is incomplete or does not match the model its config.json describes")
    unexpected = sorted(set(regular) - expected)
    if unexpected:
        raise PackedFormatError(f"unexpected tensor(s) {unexpected[:8]}: they do not exist in the model built from "
                                f"config.json")
    wrong = [(k, tuple(regular[k].shape), state[k]) for k in sorted(expected) if tuple(regular[k].shape) != state[k]]
    if wrong:
        raise PackedFormatError(f"tensor(s) with the wrong shape (name, stored, expected): {wrong[:8]}")
    dangling = sorted(k for k, target in aliases.items() if target not in regular)
    if dangling:
        raise PackedFormatError(f"tied tensor(s) {dangling} refer to tensors that are not stored")


def _assign(model: nn.Module, regular: dict[str, torch.Tensor], aliases: dict) -> None:
    with torch.no_grad():
        for key, t in [*regular.items(), *((alias, regular[target]) for alias, target in aliases.items())]:
            owner, _, attr = key.rpartition(".")
            module = model.get_submodule(owner) if owner else model
            getattr(module, attr).data = t


def _cast_recomputed_buffers(model: nn.Module, dtypes: dict[str, str]) -> None:
    for name, dtype in dtypes.items():
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        if module._buffers.get(attr) is None:
            raise PackedFormatError(f"config.json lists buffer {name}, which the rebuilt model does not have")
        module._buffers[attr] = module._buffers[attr].to(getattr(torch, dtype))


def _submodule(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as error:
        raise PackedFormatError(f"the model has no module {name!r} ({error})") from error
