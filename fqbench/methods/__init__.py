"""Layer-level quantization methods behind one interface.

    from fqbench.methods import build_method
    method = build_method("framequant", bits=2, redundancy=1.1, seed=0)
    qlayer = method.quantize(W, H)
"""

from fqbench.methods.registry import METHODS, Method, build_method, method_from_config, register_method

# Importing the modules registers their methods.
from fqbench.methods import fp, framequant  # noqa: E402,F401
import baselines  # noqa: E402,F401

__all__ = ["METHODS", "Method", "build_method", "method_from_config", "register_method"]
