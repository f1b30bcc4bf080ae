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
  larger ones on a coarse (k-1)-bit grid over ``[0, 1]`` (PTQ4ViT);
- ``affine``: asymmetric uniform ``scale * (clamp(round(x / scale) + zero, 0, 2^k - 1) - zero)`` with an
  integer zero point, one scale and zero per chunk of the last dimension (RepQ-ViT's quantizer; with
  per-channel parameters it is the calibration-time quantizer of post-LayerNorm activations);
- ``log2``: post-softmax values as ``scale * 2^-e`` or ``sqrt(2) * scale * 2^-e`` (an integer exponent
  and a parity bit selecting one of two scales), the inference form of the log-sqrt(2) quantizer
  ``scale * sqrt(2)^-q`` (RepQ-ViT): the same k-bit codes ``q = 2e - parity``, with the largest code
  reserved for zero so that k bits hold every level.

Each quantizer gives ``stored()`` (tensors and their bits) and ``meta()``; ``quantizer_from_state``
rebuilds any of them from what a checkpoint holds.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from fqbench.quantized.base import StateError, StoredModule, Stored, check_tensors, dtype_bits, kind_registrar

GELU_MIN = 0.16997124254703522  # -min GELU(x): the post-GELU negative range
SQRT2 = 2 ** 0.5
QUARTER, THREE_QUARTERS = 2 ** -0.25, 2 ** -0.75  # mantissa thresholds of the half-power levels
ACTIVATION_KINDS: dict[str, type["ActivationQuantizer"]] = {}
register_activation_kind = kind_registrar(ACTIVATION_KINDS, "activation quantizer kind")


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


@register_activation_kind("affine")
class AffineQuantizer(ActivationQuantizer):
    PARAMETERS = ("scale", "zero")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return affine_quantize(x, *self.per_channel(x.shape[-1]), self.bits)

    def per_channel(self, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero for each of ``channels`` (each chunk's repeated over its channels)."""
        chunks = self.scale.numel()
        if channels % chunks:
            raise ValueError(f"{channels} channels do not split into {chunks} chunks of one scale each")
        return self.scale.repeat_interleave(channels // chunks), self.zero.repeat_interleave(channels // chunks)


@register_activation_kind("log2")
class Log2Quantizer(ActivationQuantizer):
    PARAMETERS = ("scale",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        exponent, parity = self.encode(x)
        value = torch.where(parity.bool(), self.scale * SQRT2, self.scale) * torch.exp2(-exponent.to(x.dtype))
        return torch.where(exponent >= zero_exponent(self.bits), torch.zeros_like(x), value).to(x.dtype)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Integer exponent and parity of every value: ``x ~ scale * sqrt(2)^parity * 2^-exponent``.

        Read off the float's own exponent and one comparison of its mantissa (``frexp``): with
        ``x / scale = m 2^k``, ``m`` in [1/2, 1), the nearest half-power ``sqrt(2)^-q`` has
        ``q = -2k + j``, ``j = 0`` for ``m >= 2^-1/4``, ``2`` for ``m <= 2^-3/4``, else ``1``.
        The pair ``(ceil(q/2), q mod 2)`` is the log-sqrt(2) code ``q`` (``log_sqrt2_codes``)
        written as a shift and a choice of scale. Both forms divide by the scale in float64, where
        no float32 input lies on a rounding boundary (the thresholds are irrational), so their codes agree.
        """
        mantissa, k = torch.frexp(_ratio(x, self.scale))
        half_up = (mantissa < QUARTER).to(torch.int32)  # j > 0: one more halving
        parity = ((mantissa < QUARTER) & (mantissa > THREE_QUARTERS)).to(torch.int32)  # j == 1
        exponent = -k + half_up
        codes = 2 * exponent - parity
        zero = (codes >= 2 ** self.bits - 1) | ~(x > 0)
        exponent = torch.where(zero, zero_exponent(self.bits), torch.where(codes < 0, 0, exponent))
        parity = torch.where(zero, 1, torch.where(codes < 0, 0, parity))
        return exponent, parity


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


def affine_codes(x: torch.Tensor, scale, zero, bits: int) -> torch.Tensor:
    """Unsigned k-bit codes of the asymmetric uniform quantizer (``zero`` an integer)."""
    return torch.clamp(torch.round(x / scale) + zero, 0, 2 ** bits - 1)


def affine_quantize(x: torch.Tensor, scale, zero, bits: int) -> torch.Tensor:
    return (affine_codes(x, scale, zero, bits) - zero) * scale


def log_sqrt2_codes(x: torch.Tensor, scale, bits: int) -> torch.Tensor:
    """Codes ``q = clamp(round(-2 log2(x / scale)), 0)`` of the log-sqrt(2) quantizer; ``2^k - 1`` is zero
    (values below the smallest level, and non-positive ones)."""
    q = torch.round(-2 * torch.log2(_ratio(x, scale))).clamp(min=0)
    return torch.where((q < 2 ** bits - 1) & (x > 0), q, 2 ** bits - 1).to(x.dtype)


def log_sqrt2_quantize(x: torch.Tensor, scale, bits: int) -> torch.Tensor:
    """Post-softmax values on the levels ``scale * sqrt(2)^-q`` (RepQ-ViT's calibration-time quantizer)."""
    q = log_sqrt2_codes(x, scale, bits)
    return torch.where(q < 2 ** bits - 1, scale * torch.exp2(-q / 2), torch.zeros_like(x))


def _ratio(x: torch.Tensor, scale) -> torch.Tensor:
    return x.double() / torch.as_tensor(scale, dtype=torch.float64, device=x.device)


def zero_exponent(bits: int) -> int:
    """The log2 exponent of the zero code ``2^k - 1`` (odd: parity 1)."""
    return 2 ** (bits - 1)


def twin_gelu_quantize(x: torch.Tensor, delta_pos, bits: int) -> torch.Tensor:
    q = 2 ** (bits - 1)
    delta_neg = GELU_MIN / q
    negative = torch.clamp(torch.round(x / delta_neg), -q, 0) * delta_neg
    positive = torch.clamp(torch.round(x / delta_pos), 0, q - 1) * delta_pos
    return torch.where(x < 0, negative, positive)
