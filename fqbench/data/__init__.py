"""Calibration and evaluation data, local files first (layout of the shared data folder), hub as a fallback.

Importing the package registers every text set: the GPTQ protocol's (``text``) and the offline
default's corpus, Python's own standard library (``pystdlib``, which builds on ``text``).
"""

from fqbench.data import pystdlib, text  # noqa: F401
