"""Quantized layers: one class per weight kind (grid, transformed, dense; codebook for QuIP#), each
owning its stored tensors and deriving its honest bits from them; activation quantizers with stored
parameters; and ``QuantLinear``, the one module that wraps any of them with the bias.

    layer = method.quantize(W, H)          # a QuantizedWeight
    layer.weight(), layer(x), layer.bits_per_weight, layer.state()
    packed = layer.with_layout("packed")   # the same weight, codes bit-packed in memory
    module = QuantLinear(packed, bias)     # what a model holds
"""

from fqbench.quantized.activations import ACTIVATION_KINDS, ActivationQuantizer, quantizer_from_state
from fqbench.quantized.base import (
    LAYOUTS, WEIGHT_KINDS, QuantizedWeight, StateError, Stored, register_weight_kind, weight_from_state,
)
from fqbench.quantized.codebook import CodebookWeight
from fqbench.quantized.dense import DenseWeight
from fqbench.quantized.grid import GridWeight
from fqbench.quantized.linear import QuantLinear
from fqbench.quantized.transformed import TransformedWeight

__all__ = ["ACTIVATION_KINDS", "ActivationQuantizer", "CodebookWeight", "DenseWeight", "GridWeight", "LAYOUTS",
           "QuantLinear", "QuantizedWeight", "StateError", "Stored", "TransformedWeight", "WEIGHT_KINDS", "quantizer_from_state",
           "register_weight_kind", "weight_from_state"]
