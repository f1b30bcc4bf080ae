"""One registry for every layer-level method: a decorator and a dict.

A method is a class with a ``Config`` dataclass (what Hydra instantiates) and a
``quantize(W, H)`` that returns a ``QuantizedLayer``.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from fqbench.methods.layers import QuantizedLayer
from fqbench.quant.checks import validate_layer_inputs

METHODS: dict[str, type["Method"]] = {}


def register_method(name: str):
    def decorate(cls):
        if name in METHODS:
            raise ValueError(f"method {name!r} is registered twice ({METHODS[name].__module__} and {cls.__module__})")
        cls.name = name
        METHODS[name] = cls
        return cls

    return decorate


class Method:
    """Base class. Subclasses set ``Config`` and implement ``_quantize``."""

    name: str = ""
    Config: type = type(None)

    def __init__(self, config=None):
        self.config = self.Config() if config is None else config

    @property
    def nominal_bits(self) -> float | None:
        """The bit width a paper would quote for this configuration (None: the stored precision)."""
        return float(self.config.bits)

    def quantize(self, W: torch.Tensor, H: torch.Tensor, *, seed: int | None = None) -> QuantizedLayer:
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

    def _quantize(self, W: torch.Tensor, H: torch.Tensor, seed: int) -> QuantizedLayer:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


def build_method(name: str, **options) -> Method:
    """``build_method("gptq", bits=2)``: any registered name and its config options."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; registered methods: {', '.join(sorted(METHODS))}")
    cls = METHODS[name]
    valid = [f.name for f in dataclasses.fields(cls.Config)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {name!r}; valid options: {', '.join(valid)}")
    return cls(cls.Config(**options))


def method_from_config(config) -> Method:
    """The method for an instantiated config dataclass (e.g. from Hydra's ``instantiate``)."""
    for cls in METHODS.values():
        if type(config) is cls.Config:
            return cls(config)
    raise ValueError(f"{type(config).__name__} is not the config of a registered method ({', '.join(sorted(METHODS))})")
