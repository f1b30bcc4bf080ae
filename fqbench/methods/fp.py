"""The identity method: the layer at full precision, for baselines and pipeline checks."""

from __future__ import annotations

from dataclasses import dataclass

from fqbench.methods.registry import LayerMethod, register_method
from fqbench.quantized import DenseWeight


@dataclass
class FPConfig:
    pass


@register_method("fp")
class FullPrecision(LayerMethod):
    Config = FPConfig

    @property
    def nominal_bits(self) -> None:
        return None

    def _quantize(self, W, H, seed):
        return DenseWeight(W)
