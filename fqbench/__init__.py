"""fqbench: low-bit post-training quantization benchmarks for transformers."""

__version__ = "0.1.0"
