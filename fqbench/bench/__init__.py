"""Benchmarks: ``python -m fqbench.bench layers`` (layer-level methods)."""
