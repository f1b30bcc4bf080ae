"""Inference kernels and their building blocks, each taking plain tensors (DESIGN.md §7).

- ``fast_transform``: a ``FrameOperator`` as a few batched matmuls (any device).
- ``triton_transform``: sign, Hadamard and frame in one Triton kernel (CUDA only).
- ``container``: 3-bit codes stored at 3 bits, run from 4-bit containers.
- ``packed_matrix``: ``x @ (scale * (codes - zero)).T`` in pure PyTorch (the reference and fallback).
- ``gemlite_backend``: the same through gemlite's Triton GEMV/GEMM (CUDA only, imported lazily).
- ``select``: which of the two backends a layer gets, with the reason logged.
- ``transformed``: a FrameQuant-style layer out of two transforms and a packed matrix.

Nothing here imports triton or gemlite at module import: both need a GPU.
"""
