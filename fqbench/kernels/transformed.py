"""A FrameQuant-style linear map out of the building blocks: ``y = A_out^T D_hat A_in x + b``.

``in_transform`` and ``out_transform`` are anything with ``analysis``/``synthesis`` (a
``FastTransform`` or a ``TritonTransform``), ``matrix`` a packed matrix of the frame-space
coefficients ``D_hat`` (``TorchPackedMatrix`` or ``GemliteMatrix``, built without the bias: the
bias lives in the output space).
"""

from __future__ import annotations

import torch
from torch import nn


class TransformedMatrix(nn.Module):
    def __init__(self, in_transform, matrix: nn.Module, out_transform, bias: torch.Tensor | None = None):
        super().__init__()
        if matrix.in_features != in_transform.num_coefficients or matrix.out_features != out_transform.num_coefficients:
            raise ValueError(f"the matrix is {matrix.out_features}x{matrix.in_features}, the transforms need "
                             f"{out_transform.num_coefficients}x{in_transform.num_coefficients}")
        self.in_transform, self.out_transform = in_transform, out_transform
        self.matrix = matrix
        self.in_features, self.out_features = in_transform.dim, out_transform.dim
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.out_transform.synthesis(self.matrix(self.in_transform.analysis(x)))
        return y if self.bias is None else y + self.bias

    def resident_bytes(self) -> int:
        """The packed matrix and bias; transform parameters are shared between layers and reported apart."""
        bias = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return self.matrix.resident_bytes() + bias

    def describe(self) -> str:
        return (f"in: {self.in_transform.describe()}\nmatrix: {self.matrix.describe()}\n"
                f"out: {self.out_transform.describe()}")
