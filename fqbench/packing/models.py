"""Rebuilding a model's architecture from ``config.json`` alone: one entry per library.

- ``transformers``: the model's own config (``config.to_dict()``, as
  ``save_pretrained`` writes it); rebuilt with the class named in
  ``architectures`` through ``_from_config`` (the dtype and attention
  implementation of the evaluated model), without random initialization.
- ``timm``: ``{"architecture", "model_args", "num_classes", ...}`` as timm's own
  ``config.json``; rebuilt with ``timm.create_model(architecture, pretrained=False,
  **model_args)`` with the saved ``pretrained_cfg`` (preprocessing) as its overlay.

Weights are then filled in from the checkpoint; every parameter must be covered
(checked when saving, on a model built on the meta device, and again when loading).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

LIBRARIES = ("transformers", "timm")


def describe_model(model: nn.Module, timm_name: str | None = None, timm_kwargs: dict | None = None) -> tuple[str, dict]:
    """``(library, config)`` from which ``build_model`` recreates ``model``'s architecture."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        PreTrainedModel = ()
    if isinstance(model, PreTrainedModel):
        config = model.config.to_dict()
        config["architectures"] = [type(model).__name__]
        return "transformers", config
    pretrained_cfg = getattr(model, "pretrained_cfg", None)
    if timm_name is None and isinstance(pretrained_cfg, dict):
        timm_name = pretrained_cfg.get("architecture")
    if timm_name is None:
        raise ValueError(f"cannot describe a {type(model).__name__} for saving: it is neither a Hugging Face "
                         f"PreTrainedModel nor a timm model (pass timm_name= and timm_kwargs= for timm models)")
    # timm's own config.json keys. The pretrained_cfg carries the preprocessing (input size, mean, std, crop),
    # restored on load so that timm.data.resolve_model_data_config gives the evaluated model's transform.
    pretrained = {k: v for k, v in (pretrained_cfg or {}).items() if k not in ("file", "state_dict", "hf_hub_id")}
    config = {"architecture": timm_name, "model_args": dict(timm_kwargs or {}),
              "num_classes": getattr(model, "num_classes", None), "num_features": getattr(model, "num_features", None),
              "pretrained_cfg": pretrained}
    return "timm", config


def build_model(library: str, config: dict, dtype: torch.dtype, attn_implementation: str | None = None,
                device: str | torch.device = "cpu") -> nn.Module:
    """The architecture of a saved model, parameters uninitialized (to be loaded), in eval mode."""
    if library == "transformers":
        model = _build_transformers(config, dtype, attn_implementation, device)
    elif library == "timm":
        model = _build_timm(config, dtype, device)
    else:
        raise ValueError(f"unknown model library {library!r} in the quantization config; known: {', '.join(LIBRARIES)}")
    return model.eval()


def _build_transformers(config: dict, dtype, attn_implementation, device) -> nn.Module:
    import transformers

    architectures = config.get("architectures") or []
    if not architectures or not hasattr(transformers, architectures[0]):
        raise ValueError(f"config.json names architectures={architectures!r}; expected a transformers model class "
                         f"(e.g. LlamaForCausalLM) available in transformers {transformers.__version__}")
    cls = getattr(transformers, architectures[0])
    hf_config = transformers.AutoConfig.for_model(**config)
    options = {"dtype": dtype}
    if attn_implementation is not None:
        options["attn_implementation"] = attn_implementation
    with _no_init(), torch.device(device):
        return cls._from_config(hf_config, **options)


def _build_timm(config: dict, dtype, device) -> nn.Module:
    import timm

    name = config.get("architecture")
    if not name:
        raise ValueError("config.json of a timm model needs 'architecture' (the timm model name)")
    # JSON turned timm's tuples (input_size, mean, std) into lists
    overlay = {k: tuple(v) if isinstance(v, list) else v for k, v in (config.get("pretrained_cfg") or {}).items()}
    with torch.device(device):
        model = timm.create_model(name, pretrained=False, pretrained_cfg_overlay=overlay or None,
                                  **config.get("model_args", {}))
    return model.to(dtype)


@contextlib.contextmanager
def _no_init():
    """Skip random initialization (every parameter is loaded afterwards), when transformers allows it."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: initialize, then overwrite
        yield
        return
    with no_init_weights():
        yield
