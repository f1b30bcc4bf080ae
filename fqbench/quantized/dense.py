"""The unquantized weight (method ``fp``), stored at its own precision."""

from __future__ import annotations

import torch

from fqbench.quantized.base import (
    QuantizedWeight, Stored, check_layout, dtype_bits, dtype_name, dtype_named, register_weight_kind,
)


@register_weight_kind("dense")
class DenseWeight(QuantizedWeight):
    def __init__(self, W: torch.Tensor):
        super().__init__(*W.shape)
        self.register_buffer("dense_weight", W.detach().clone())

    def weight(self) -> torch.Tensor:
        return self.dense_weight.float()

    def with_layout(self, layout: str, *, device=None, dtype=None) -> "DenseWeight":
        check_layout(layout)  # nothing to pack: the weight is stored as it is
        return self

    def stored(self) -> dict[str, Stored]:
        return {"weight": Stored(self.dense_weight, self.dense_weight.numel() * dtype_bits(self.dense_weight.dtype))}

    def meta(self) -> dict:
        return {"dtype": dtype_name(self.dense_weight.dtype)}

    @classmethod
    def expected_tensors(cls, meta: dict) -> dict:
        return {"weight": (tuple(meta["shape"]), dtype_named(meta["dtype"]))}

    @classmethod
    def from_state(cls, tensors: dict, meta: dict, layout: str = "plain") -> "DenseWeight":
        return cls(tensors["weight"])
