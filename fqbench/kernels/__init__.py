"""Compute on quantized codes, each module taking plain tensors (DESIGN.md §7).

- ``bitpack``: the bit-plane layout checkpoints store codes in; ``lut``: the CPU kernels on it
  (decoding, table-lookup matmul).
- ``fast_transform``: a ``FrameOperator`` as a few batched matmuls (any device).
- ``triton_transform``: sign, Hadamard and frame in one Triton kernel (CUDA only).
- ``container``: 3-bit codes stored at 3 bits, run from 4-bit containers.
- ``packed_matrix``: ``x @ (scale * (codes - zero)).T`` in pure PyTorch over gemlite's layout (the fallback).
- ``gemlite_backend``: the same through gemlite's Triton GEMV/GEMM (CUDA only, imported lazily).
- ``select``: which of the two backends a layer gets, with the reason logged.
- ``transformed``: a FrameQuant-style map out of two transforms and a packed matrix.

Nothing here imports triton or gemlite at module import: both need a GPU.
"""
