"""The one module a model holds for a quantized linear layer: any quantized weight plus the bias.

``QuantLinear`` runs ``output_quantizer(weight(input_quantizer(x)) + bias)``: the weight in its
own space and layout (``fqbench.quantized``), the bias in full precision, and optional
activation quantizers with stored parameters (``fqbench.quantized.activations``).
``in_features``/``out_features`` let model layouts recognise it as a linear layer; ``weight``
gives the dequantized matrix for models that call ``F.linear(x, module.weight)`` themselves
(Swin V2, EVA), which bypasses the module's own forward and its activation quantizers.
"""

from __future__ import annotations

import torch
from torch import nn

from fqbench.quantized.activations import ActivationQuantizer
from fqbench.quantized.base import QuantizedWeight


class QuantLinear(nn.Module):
    def __init__(self, quantized: QuantizedWeight, bias: torch.Tensor | None = None, *,
                 input_quantizer: ActivationQuantizer | None = None,
                 output_quantizer: ActivationQuantizer | None = None):
        super().__init__()
        self.in_features, self.out_features = quantized.in_features, quantized.out_features
        self.quantized = quantized
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.input_quantizer = input_quantizer
        self.output_quantizer = output_quantizer

    @property
    def weight(self) -> torch.Tensor:
        dtype = torch.float32 if self.bias is None else self.bias.dtype
        return self.quantized.weight().to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        y = self.quantized(x, self.bias)
        return y if self.output_quantizer is None else self.output_quantizer(y)

    def with_layout(self, layout: str) -> "QuantLinear":
        """The same layer with its weight's codes held ``plain`` or ``packed``."""
        return QuantLinear(self.quantized.with_layout(layout), self.bias, input_quantizer=self.input_quantizer,
                           output_quantizer=self.output_quantizer)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
