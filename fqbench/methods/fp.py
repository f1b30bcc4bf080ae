"""The identity method: the layer at full precision, for baselines and pipeline checks."""

from __future__ import annotations

from dataclasses import dataclass

from fqbench.methods.layers import DenseLayer
from fqbench.methods.registry import Method, register_method


@dataclass(frozen=True)
class FPConfig:
    pass


@register_method("fp")
class FullPrecision(Method):
    Config = FPConfig

    @property
    def nominal_bits(self) -> None:
        return None

    def _quantize(self, W, H, seed):
        return DenseLayer(W)
