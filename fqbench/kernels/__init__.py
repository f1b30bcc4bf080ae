"""Compute on quantized codes: the bit-packed layout (``bitpack``) and the CPU kernels on it (``lut``)."""
