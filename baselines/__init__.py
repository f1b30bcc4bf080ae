"""Baseline quantization methods (RTN, GPTQ, QuIP and the clipping ablations).

Importing this package registers its methods in ``fqbench.methods``.
"""

from baselines import gptq, ptq4vit, quip, rtn  # noqa: F401
