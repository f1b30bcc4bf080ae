"""Quantization methods behind one registry and three tiers (layer, block, model).

    from fqbench.methods import build_method
    method = build_method("framequant", bits=2, redundancy=1.1, seed=0)
    qlayer = method.quantize(W, H)

The built-in methods (``fqbench.methods.fp``, ``fqbench.methods.framequant`` and the
``baselines`` package) register on first lookup, so importing this package imports no method.
"""

from fqbench.methods.registry import (
    METHODS, TIERS, BlockMethod, LayerMethod, Method, ModelMethod, build_method, register_method, registered_methods,
)

__all__ = ["METHODS", "TIERS", "BlockMethod", "LayerMethod", "Method", "ModelMethod", "build_method",
           "register_method", "registered_methods"]
