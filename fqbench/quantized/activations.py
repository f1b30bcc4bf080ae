"""Activation quantizers: modules with stored parameters, saved and reloaded with the packed model.

A quantizer maps activations to their quantized values (fake quantization: the codes are not
kept). Kinds:

- ``per_token``: symmetric round-to-nearest with one scale per token (row), computed on the fly
  (FrameQuant's frame-space activations, paper Appendix F); stores nothing but its width;
- ``uniform``: signed symmetric ``clamp(round(x / delta), -2^(k-1), 2^(k-1) - 1) * delta`` with one
  step per chunk of the last dimension (one chunk: per tensor; three: q, k and v of a fused qkv);
- ``twin_gelu``: post-GELU values, negatives on the fixed range ``[-0.17, 0]`` and positives with a
  searched step (PTQ4ViT);
- ``twin_softmax``: post-softmax values up to ``split`` on a fine (k-1)-bit grid over ``[0, split]``,
  larger ones on a coarse (k-1)-bit grid over ``[0, 1]`` (PTQ4ViT).

Each quantizer gives ``stored()`` (tensors and their bits) and ``meta()``; ``quantizer_from_state``
rebuilds any of them from what a checkpoint holds.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from fqbench.quantized.base import StateError, StoredModule, Stored, check_tensors, dtype_bits

GELU_MIN = 0.16997124254703522  # -min GELU(x): the post-GELU negative range
ACTIVATION_KINDS: dict[str, type["ActivationQuantizer"]] = {}


def register_activation_kind(name: str):
    def decorate(cls):
        if name in ACTIVATION_KINDS:
            raise ValueError(f"activation quantizer kind {name!r} is registered twice")
        cls.kind = name
        ACTIVATION_KINDS[name] = cls
        return cls

    return decorate


def check_act_bits(bits) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"act_bits={bits!r}: use an integer from 2 to 16 bits")


class ActivationQuantizer(StoredModule):
    kind: ClassVar[str] = ""
    PARAMETERS: ClassVar[tuple[str, ...]] = ()  # names of the stored float32 tensors

    def __init__(self, bits: int, **parameters: torch.Tensor):
        super().__init__()
        check_act_bits(bits)
        self.bits = bits
        for name in self.PARAMETERS:
            value = parameters[name]
            self.register_buffer(name, torch.as_tensor(value, dtype=torch.float32).reshape(-1).clone())

    def stored(self) -> dict[str, Stored]:
        return {name: Stored(getattr(self, name), getattr(self, name).numel() * dtype_bits(torch.float32))
                for name in self.PARAMETERS}

    def meta(self) -> dict:
        return {"kind": self.kind, "bits": self.bits,
                "sizes": {name: getattr(self, name).numel() for name in self.PARAMETERS}}

    def extra_repr(self) -> str:
        return f"{self.kind}, {self.bits} bits"


@register_activation_kind("per_token")
class PerTokenQuantizer(ActivationQuantizer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantize_per_token(x, self.bits)


@register_activation_kind("uniform")
class UniformQuantizer(ActivationQuantizer):
    PARAMETERS = ("step",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.step.numel() == 1:
            return uniform_quantize(x, self.step, self.bits)
        chunks = x.chunk(self.step.numel(), dim=-1)
        return torch.cat([uniform_quantize(c, self.step[i], self.bits) for i, c in enumerate(chunks)], dim=-1)


@register_activation_kind("twin_gelu")
class TwinGeluQuantizer(ActivationQuantizer):
    PARAMETERS = ("positive_step",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return twin_gelu_quantize(x, self.positive_step, self.bits)


@register_activation_kind("twin_softmax")
class TwinSoftmaxQuantizer(ActivationQuantizer):
    PARAMETERS = ("split",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return twin_softmax_quantize(x, self.split, self.bits)


def expected_quantizer_tensors(meta: dict) -> dict:
    cls = _kind(meta)
    sizes = meta.get("sizes", {})
    return {name: ((sizes.get(name, 1),), torch.float32) for name in cls.PARAMETERS}


def quantizer_from_state(tensors: dict[str, torch.Tensor], meta: dict, name: str = "quantizer") -> ActivationQuantizer:
    cls = _kind(meta)
    check_tensors(name, expected_quantizer_tensors(meta), tensors, meta["kind"])
    return cls(meta["bits"], **{p: tensors[p] for p in cls.PARAMETERS})


def _kind(meta: dict) -> type[ActivationQuantizer]:
    kind = meta.get("kind")
    if kind not in ACTIVATION_KINDS:
        raise StateError(f"unknown activation quantizer kind {kind!r}; known: {', '.join(sorted(ACTIVATION_KINDS))}")
    return ACTIVATION_KINDS[kind]


# --- the quantization functions --------------------------------------------------------------------

def quantize_per_token(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric round-to-nearest with one scale per token (row), paper Appendix F."""
    qmax = 2 ** (bits - 1) - 1
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / qmax
    return torch.clamp(torch.round(x / scale), -qmax - 1, qmax) * scale


def uniform_quantize(x: torch.Tensor, delta, bits: int) -> torch.Tensor:
    """Symmetric signed uniform quantization with step ``delta``."""
    q = 2 ** (bits - 1)
    return torch.clamp(torch.round(x / delta), -q, q - 1) * delta


def twin_softmax_quantize(x: torch.Tensor, split, bits: int) -> torch.Tensor:
    steps = 2 ** (bits - 1) - 1
    split = torch.as_tensor(split, dtype=x.dtype, device=x.device)
    fine = torch.round(torch.minimum(x.clamp(min=0), split) * (steps / split)) * (split / steps)
    coarse = torch.round(x.clamp(0, 1) * steps) / steps
    return torch.where(x <= split, fine, coarse)


def twin_gelu_quantize(x: torch.Tensor, delta_pos, bits: int) -> torch.Tensor:
    q = 2 ** (bits - 1)
    delta_neg = GELU_MIN / q
    negative = torch.clamp(torch.round(x / delta_neg), -q, 0) * delta_neg
    positive = torch.clamp(torch.round(x / delta_pos), 0, q - 1) * delta_pos
    return torch.where(x < 0, negative, positive)
