"""One registry for every method: a decorator, a dict, three tiers and one ``build_method``.

A method is a class with a ``Config`` dataclass (what Hydra composes and type-checks: it is
registered in Hydra's ConfigStore as ``method/<name>_schema``) and one of three tiers, which the
engine dispatches on explicitly (``fqbench.engine.quantize_model``):

- ``LayerMethod``: ``quantize(W, H)`` -> a ``QuantizedWeight``; sees one linear layer at a time; with a
  ``bit_budget`` (a ``budget_bits`` option) the engine first measures the method's options on every
  layer and then quantizes each layer with the option it was allocated (``for_layer``);
- ``BlockMethod``: ``quantize_block(block, inputs, context)``; sees a whole block with its captured
  inputs and full-precision outputs (block-wise reconstruction, fine-tuning, weight-and-activation
  methods whose activation quantizers are part of the stored model);
- ``ModelMethod``: ``quantize_model(model, adapter, batches, ...)``; calibrates on the whole model
  (the PTQ4ViT-style baseline).

The built-in methods register when first looked up (``registered_methods``); a method outside
the package registers when its module is imported, e.g. through its config's ``_target_``.
"""

from __future__ import annotations

import dataclasses
import importlib
import time
from typing import ClassVar

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fqbench.quant.allocation import BitBudget
from fqbench.quant.checks import validate_layer_inputs
from fqbench.quantized import QuantizedWeight

BUILTIN_MODULES = ("fqbench.methods.fp", "fqbench.methods.framequant",
                   "baselines.rtn", "baselines.gptq", "baselines.quip", "baselines.quip_sharp", "baselines.ptq4vit",
                   "baselines.repq")
TIERS = ("layer", "block", "model")
METHODS: dict[str, type["Method"]] = {}


def register_method(name: str):
    """Register a method class (a subclass of one tier) under ``name``, and its config schema with Hydra."""

    def decorate(cls):
        if name in METHODS and METHODS[name] is not cls:
            raise ValueError(f"method {name!r} is registered twice ({METHODS[name].__module__} and {cls.__module__})")
        if getattr(cls, "tier", None) not in TIERS:
            raise TypeError(f"{cls.__name__} must derive from LayerMethod, BlockMethod or ModelMethod")
        if not dataclasses.is_dataclass(cls.Config):
            raise TypeError(f"{cls.__name__}.Config must be a dataclass")
        cls.name = name
        METHODS[name] = cls
        from hydra.core.config_store import ConfigStore

        ConfigStore.instance().store(group="method", name=f"{name}_schema", node=_schema(cls.Config))
        return cls

    return decorate


def _schema(config_cls: type) -> type:
    """The config dataclass plus the ``_target_`` key its yaml names it by, for Hydra's type checks."""
    target = f"{config_cls.__module__}.{config_cls.__qualname__}"
    return dataclasses.make_dataclass(f"{config_cls.__name__}Schema", [("_target_", str, target)], bases=(config_cls,))


def registered_methods() -> dict[str, type["Method"]]:
    """Every registered method by name (the built-in ones are imported on first use)."""
    for module in BUILTIN_MODULES:
        importlib.import_module(module)
    return METHODS


class Method:
    """What every tier shares: a name, a config, and the bit width a paper would quote."""

    name: ClassVar[str] = ""
    tier: ClassVar[str] = ""
    Config: ClassVar[type] = type(None)

    def __init__(self, config=None):
        self.config = self.Config() if config is None else config

    @property
    def nominal_bits(self) -> float | None:
        """The bit width a paper would quote for this configuration (None: the stored precision)."""
        return float(self.config.bits)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


class LayerMethod(Method):
    """Sees one linear layer at a time: ``quantize(W, H)``."""

    tier = "layer"

    def quantize(self, W: torch.Tensor, H: torch.Tensor, *, seed: int | None = None) -> QuantizedWeight:
        """Quantize one linear layer: ``W`` (out, in), ``H`` = (2/N) sum x x^T (in, in).

        ``seed`` overrides the config's seed (the engine gives every layer its own).
        """
        validate_layer_inputs(W, H)
        start = time.perf_counter()
        layer = self._quantize(W.detach(), H.detach(), getattr(self.config, "seed", 0) if seed is None else seed)
        layer.method = self.name
        layer.nominal_bits = layer.bits_per_weight if self.nominal_bits is None else self.nominal_bits
        layer.info["seconds"] = time.perf_counter() - start
        return layer

    def _quantize(self, W: torch.Tensor, H: torch.Tensor, seed: int) -> QuantizedWeight:
        raise NotImplementedError

    @property
    def bit_budget(self) -> BitBudget | None:
        """Honest bits per weight for the whole model and the per-layer options to meet them with
        (None: every layer is quantized alike)."""
        return None

    def for_layer(self, options: dict) -> "LayerMethod":
        """This method with one layer's allocated options and no budget of its own (a method with a
        ``bit_budget`` has a ``budget_bits`` config option)."""
        return type(self)(dataclasses.replace(self.config, budget_bits=None, **options))


class BlockMethod(Method):
    """Sees a whole block: its captured inputs and full-precision outputs (``fqbench.engine.BlockContext``)."""

    tier = "block"

    def quantize_block(self, block, inputs, context) -> list:
        """Quantize ``block`` in place (replacing linears by ``QuantLinear`` where activations are quantized);
        return ``(records, layers)``: a ``LayerRecord`` and the ``QuantizedWeight`` of every quantized linear
        (layers keyed by full name, ``f"{block.name}.{linear}"``)."""
        raise NotImplementedError


class ModelMethod(Method):
    """Calibrates on the whole model (activations and gradients of every layer)."""

    tier = "model"

    def quantize_model(self, model, adapter, batches, *, device, seed: int = 0, progress: bool = True) -> list:
        """Quantize ``model`` in place; return ``(records, layers)`` as ``BlockMethod.quantize_block``."""
        raise NotImplementedError


def build_method(spec, **options) -> Method:
    """The method for a registered name and its options, or for a composed method config.

    ``build_method("gptq", bits=2, solver={"act_order": True})``; ``build_method(cfg.method)``
    with ``cfg.method._target_`` naming the config dataclass (any importable one: methods outside
    the package register on import). Option names and types are checked by OmegaConf against the
    dataclass, then the dataclass checks its values.
    """
    if isinstance(spec, str):
        methods = registered_methods()
        if spec not in methods:
            raise ValueError(f"unknown method {spec!r}; registered methods: {', '.join(sorted(methods))}")
        cls, values = methods[spec], options
    else:
        if options:
            raise TypeError("pass options either in the method config or as keywords with a method name, not both")
        try:
            values = OmegaConf.to_container(spec, resolve=True) if isinstance(spec, DictConfig) else dict(spec)
        except OmegaConfBaseException as error:  # e.g. bits=abc reaching a typed key through ${bits}
            raise ValueError(f"method config: {error}") from None
        target = values.pop("_target_", None)
        if target is None:
            raise ValueError("the method config has no _target_ (the config dataclass to instantiate)")
        cls = _method_for_config(_import(target))
    return cls(_config(cls.Config, values))


def _config(config_cls: type, values: dict):
    fields = [f.name for f in dataclasses.fields(config_cls) if f.name != "_target_"]
    unknown = sorted(set(values) - set(fields) - {"_target_"})
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for {config_cls.__name__}; valid options: {', '.join(fields)}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(config_cls), values)
        return OmegaConf.to_object(merged)  # the dataclass's own checks raise their clear errors
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or "?"
        raise ValueError(f"method.{key}: {str(error).splitlines()[0]}") from None


def _import(path: str) -> type:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"method config _target_={path!r} cannot be imported ({error})") from None


def _method_for_config(config_cls: type) -> type[Method]:
    for cls in registered_methods().values():
        if cls.Config is config_cls:
            return cls
    raise ValueError(f"{config_cls.__name__} is not the config of a registered method "
                     f"({', '.join(sorted(METHODS))}); decorate the method class with @register_method")
