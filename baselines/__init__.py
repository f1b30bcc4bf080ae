"""Baseline quantization methods (RTN, GPTQ, QuIP, QuIP# and the clipping ablations).

Importing this package registers its methods in ``fqbench.methods``.
"""

from baselines import gptq, ptq4vit, quip, quip_sharp, rtn  # noqa: F401
