"""Quantized layers: what a layer-level method returns.

A quantized layer is the weight map of one linear layer without its bias (the
bias stays in full precision with the model). It gives the effective weight in
the original space, runs a forward pass, and reports its honest storage cost:
``storage()`` lists every stored component with its size in bits, exactly what
the packed format writes, and ``bits_per_weight`` divides the total by the
number of original weights.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fqbench.frames.operator import FrameOperator
from fqbench.quant.grids import SCALE_BITS

# What regenerates a transform, as the packed format stores it: dim, block, rotation
# kind and seed as four int32, and the requested redundancy as a float64 (exact).
OPERATOR_SPEC_BITS = 4 * 32 + 64


class QuantizedLayer(nn.Module):
    """Base class: ``forward(x) = x @ weight().T``."""

    method: str = ""
    nominal_bits: float = float("nan")

    def __init__(self, out_features: int, in_features: int):
        super().__init__()
        self.out_features = out_features
        self.in_features = in_features
        self.info: dict = {}

    def weight(self) -> torch.Tensor:
        raise NotImplementedError

    def storage(self) -> dict[str, int]:
        """Stored components and their sizes in bits."""
        raise NotImplementedError

    @property
    def bits_per_weight(self) -> float:
        return sum(self.storage().values()) / (self.out_features * self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight().to(device=x.device, dtype=x.dtype).T

    def extra_repr(self) -> str:
        return f"{self.method}: {self.out_features}x{self.in_features}, {self.bits_per_weight:.3f} bits/weight"


class DenseLayer(QuantizedLayer):
    """The unquantized weight (method ``fp``), stored at its own precision."""

    def __init__(self, W: torch.Tensor):
        super().__init__(*W.shape)
        self.register_buffer("dense_weight", W.detach().clone())

    def weight(self) -> torch.Tensor:
        return self.dense_weight.float()

    def storage(self) -> dict[str, int]:
        return {"weight": self.dense_weight.numel() * torch.finfo(self.dense_weight.dtype).bits}


class GridLayer(QuantizedLayer):
    """Integer codes on per-row (or per-group) affine grids: ``W_hat = scale * (codes - zero)``."""

    def __init__(self, codes, scale, zero, group_index, bits: int, integer_zero: bool, shared_scale: bool = False):
        super().__init__(*codes.shape)
        self.bits = bits
        self.integer_zero = integer_zero
        self.shared_scale = shared_scale
        self.register_buffer("codes", codes.to(torch.uint8))
        self.register_buffer("scale", scale.float())
        self.register_buffer("zero", zero.float())
        self.register_buffer("group_index", group_index.long())

    @property
    def num_groups(self) -> int:
        return self.scale.shape[1]

    def weight(self) -> torch.Tensor:
        scale = self.scale[:, self.group_index]
        zero = self.zero[:, self.group_index]
        return scale * (self.codes.float() - zero)

    def storage(self) -> dict[str, int]:
        rows, groups = self.scale.shape
        stored = {"codes": self.codes.numel() * self.bits}
        if self.shared_scale:
            # QuIP's grid: one scale per group shared by all rows, zero fixed at maxq / 2.
            stored["scale"] = groups * SCALE_BITS
            return stored
        stored["scale"] = rows * groups * SCALE_BITS
        stored["zero"] = rows * groups * self.zero_bits
        if not self.groups_are_contiguous():
            stored["group_index"] = self.in_features * max(1, math.ceil(math.log2(groups)))
        return stored

    @property
    def zero_bits(self) -> int:
        """Integer zero points inside the code range pack at ``bits`` bits; anything else needs 16."""
        if self.integer_zero and bool(((self.zero >= 0) & (self.zero <= 2**self.bits - 1)).all()):
            return self.bits
        return SCALE_BITS

    def groups_are_contiguous(self) -> bool:
        """True when the group of column c is c // groupsize, so no index needs storing."""
        groups = self.num_groups
        if groups == 1:
            return True
        size = math.ceil(self.in_features / groups)
        implied = torch.arange(self.in_features, device=self.group_index.device) // size
        return bool(torch.equal(implied, self.group_index))


class TransformedLayer(QuantizedLayer):
    """A grid-quantized matrix ``D_hat`` in a transformed space (FrameQuant, QuIP).

    ``W_hat = A_out^T D_hat A_in diag(input_scale)``; the forward pass runs in the
    transformed space: analysis of the input, ``D_hat``, synthesis of the output,
    with optional per-token quantization of the transformed input (``act_bits``).
    """

    def __init__(self, inner: GridLayer, in_op: FrameOperator, out_op: FrameOperator,
                 input_scale: torch.Tensor | None = None, act_bits: int | None = None):
        super().__init__(out_op.dim, in_op.dim)
        self.inner = inner
        self.in_op = in_op
        self.out_op = out_op
        self.act_bits = act_bits
        self.register_buffer("input_scale", None if input_scale is None else input_scale.float())

    @property
    def effective_redundancy(self) -> float:
        """Stored coefficients per original weight (honest: counts padding and both sides)."""
        return self.inner.codes.numel() / (self.out_features * self.in_features)

    def weight(self) -> torch.Tensor:
        X = self.in_op.synthesis(self.inner.weight())
        if self.input_scale is not None:
            X = X * self.input_scale
        return self.out_op.synthesis(X.T).T.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        if self.input_scale is not None:
            x = x * self.input_scale
        coefficients = self.in_op.analysis(x)
        if self.act_bits is not None:
            coefficients = quantize_per_token(coefficients, self.act_bits)
        y = coefficients @ self.inner.weight().T
        return self.out_op.synthesis(y).to(dtype)

    def storage(self) -> dict[str, int]:
        stored = {f"inner.{k}": v for k, v in self.inner.storage().items()}
        if self.input_scale is not None:
            stored["input_scale"] = self.input_scale.numel() * SCALE_BITS
        stored["transforms"] = 2 * OPERATOR_SPEC_BITS
        return stored


class BiasedLinear(nn.Module):
    """A model's linear layer: a quantized weight map of ``x`` plus the full-precision bias.

    Subclasses implement ``weight_map``; ``in_features``/``out_features`` let model
    layouts recognise the module as a linear layer.
    """

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def weight_map(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.weight_map(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class QuantizedLinear(BiasedLinear):
    """A model's linear layer running its quantized layer (fake-quantized, as evaluated)."""

    def __init__(self, layer: QuantizedLayer, bias: torch.Tensor | None):
        super().__init__(layer.in_features, layer.out_features, bias)
        self.qlayer = layer

    def weight_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.qlayer(x)


def quantize_per_token(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric round-to-nearest with one scale per token (row), paper Appendix F."""
    qmax = 2 ** (bits - 1) - 1
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / qmax
    return torch.clamp(torch.round(x / scale), -qmax - 1, qmax) * scale
