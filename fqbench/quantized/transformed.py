"""A quantized weight in a transformed space: rotations or tight fusion frames around an inner weight.

``W_hat = diag(output_scale) A_out^T D_hat A_in diag(input_scale)``, with ``D_hat`` any quantized weight (a grid
for FrameQuant and QuIP, a codebook for QuIP#) on the transform coefficients. The forward pass
runs in the transformed space and never forms a dense d x d matrix: analysis of the input
(optionally quantized per token there: paper Appendix F), ``D_hat``, synthesis of the output.

In the ``kernel`` layout the inner weight is in its kernel layout and the operators run as
Kronecker-factored matmuls (``fqbench.kernels.fast_transform``), or as one fused Triton kernel per
direction (``transforms="triton"``, CUDA), in the kernel's dtype.

Stored: the inner weight's tensors under ``inner.``; per side ``in_op.spec`` / ``out_op.spec``
(int32: dim, block, rotation kind, seed) and ``in_op.redundancy`` / ``out_op.redundancy``
(float64, NaN for a rotation without a frame), from which the operators are regenerated;
``input_scale`` (float16, QuIP's channel rescaling); ``output_scale`` (float16, FrameQuant's
optional row normalisation); and the coefficient quantizer's tensors
under ``coefficient_quantizer.``.
"""

from __future__ import annotations

import logging

import torch

from fqbench.frames.operator import SPEC_BITS, FrameOperator, OperatorSpec
from fqbench.quantized.activations import ActivationQuantizer, quantizer_from_state
from fqbench.quantized.base import (
    WEIGHT_KINDS, QuantizedWeight, StateError, Stored, check_layout, dtype_bits, register_weight_kind, sub_state,
)
from fqbench.quantized.grid import _copy_identity, _exact

log = logging.getLogger(__name__)

SIDES = ("in_op", "out_op")


@register_weight_kind("transformed")
class TransformedWeight(QuantizedWeight):
    def __init__(self, inner: QuantizedWeight, in_op: FrameOperator, out_op: FrameOperator,
                 input_scale: torch.Tensor | None = None, coefficient_quantizer: ActivationQuantizer | None = None,
                 output_scale: torch.Tensor | None = None):
        super().__init__(out_op.dim, in_op.dim)
        if (inner.out_features, inner.in_features) != (out_op.num_coefficients, in_op.num_coefficients):
            raise StateError(f"the inner weight is {inner.out_features}x{inner.in_features} but the operators have "
                             f"{out_op.num_coefficients}x{in_op.num_coefficients} coefficients")
        self.inner = inner
        self.in_op = in_op
        self.out_op = out_op
        self.coefficient_quantizer = coefficient_quantizer
        if input_scale is not None:
            input_scale = _exact(input_scale, torch.float16, "input_scale")
        if output_scale is not None:
            output_scale = _exact(output_scale, torch.float16, "output_scale")
        self.register_buffer("input_scale", input_scale)
        self.register_buffer("output_scale", output_scale)
        self.fast_ops = None  # (in, out) transforms of the kernel layout

    @property
    def layout(self) -> str:
        return self.inner.layout

    @property
    def quantizes_activations(self) -> bool:
        return self.coefficient_quantizer is not None

    @property
    def effective_redundancy(self) -> float:
        """Stored coefficients per original weight (honest: counts padding and both sides)."""
        return self.inner.out_features * self.inner.in_features / (self.out_features * self.in_features)

    def weight(self) -> torch.Tensor:
        X = self.in_op.synthesis(self.inner.weight())
        if self.input_scale is not None:
            X = X * self.input_scale.float()
        W = self.out_op.synthesis(X.T).T.float()
        return W if self.output_scale is None else W * self.output_scale.float()[:, None]

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.fast_ops is not None:
            return self._kernel_forward(x, bias)
        dtype = x.dtype
        x = x.float()
        if self.input_scale is not None:
            x = x * self.input_scale.float()
        coefficients = self.in_op.analysis(x)
        if self.coefficient_quantizer is not None:
            coefficients = self.coefficient_quantizer(coefficients)
        y = self.out_op.synthesis(self.inner(coefficients))
        if self.output_scale is not None:
            y = y * self.output_scale.float()
        y = y.to(dtype)
        return y if bias is None else y + bias.to(dtype)

    def _kernel_forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        fast_in, fast_out = self.fast_ops
        dtype = x.dtype
        x = x.to(fast_in.dtype)
        if self.input_scale is not None:
            x = x * self.input_scale.to(x.dtype)
        coefficients = fast_in.analysis(x)
        if self.coefficient_quantizer is not None:
            coefficients = self.coefficient_quantizer(coefficients)
        y = fast_out.synthesis(self.inner(coefficients))
        if self.output_scale is not None:
            y = y * self.output_scale.to(y.dtype)
        y = y.to(dtype)
        return y if bias is None else y + bias.to(dtype)

    def with_layout(self, layout: str, *, device=None, dtype: torch.dtype = torch.float16,
                    transforms: str = "fast") -> "TransformedWeight":
        """``transforms`` (kernel layout): ``fast`` (Kronecker-factored matmuls, any device) or ``triton``
        (one fused kernel per direction, CUDA; ``fast`` where it does not apply, with the reason logged)."""
        check_layout(layout)
        if layout == self.layout and layout != "kernel":
            return self
        inner = self.inner.with_layout(layout, device=device, dtype=dtype)
        clone = TransformedWeight(inner, self.in_op, self.out_op, self.input_scale, self.coefficient_quantizer,
                                  self.output_scale)
        _copy_identity(self, clone)
        if device is not None:
            clone = clone.to(device)
        if inner.layout == "kernel":
            target = next(clone.inner.buffers()).device if device is None else device
            clone.fast_ops = tuple(_fast_transform(op, target, dtype, transforms) for op in (self.in_op, self.out_op))
        return clone

    # --- storage ------------------------------------------------------------------------

    def stored(self) -> dict[str, Stored]:
        stored = {f"inner.{k}": v for k, v in self.inner.stored().items()}
        for name in ("input_scale", "output_scale"):
            scale = getattr(self, name)
            if scale is not None:
                stored[name] = Stored(scale, scale.numel() * dtype_bits(torch.float16))
        for side in SIDES:
            words, redundancy = getattr(self, side).spec.to_tensors()
            # The two tensors together cost SPEC_BITS: four int32 words and one float64.
            stored[f"{side}.spec"] = Stored(words, SPEC_BITS - 64)
            stored[f"{side}.redundancy"] = Stored(redundancy, 64)
        if self.coefficient_quantizer is not None:
            stored.update({f"coefficient_quantizer.{k}": v for k, v in self.coefficient_quantizer.stored().items()})
        return stored

    def meta(self) -> dict:
        _, inner_meta = self.inner.state()
        meta = {"inner": inner_meta, "in_op": self.in_op.summary(), "out_op": self.out_op.summary(),
                "input_scale": self.input_scale is not None,
                "coefficient_quantizer": None if self.coefficient_quantizer is None else self.coefficient_quantizer.meta()}
        if self.output_scale is not None:  # only then: checkpoints without one stay as they were
            meta["output_scale"] = True
        return meta

    @classmethod
    def expected_tensors(cls, meta: dict) -> dict:
        inner = meta["inner"]
        if inner.get("kind") not in WEIGHT_KINDS:
            raise StateError(f"unknown inner weight kind {inner.get('kind')!r}")
        expected = {f"inner.{k}": v for k, v in WEIGHT_KINDS[inner["kind"]].expected_tensors(inner).items()}
        for side in SIDES:
            expected[f"{side}.spec"] = ((4,), torch.int32)
            expected[f"{side}.redundancy"] = ((1,), torch.float64)
        if meta.get("input_scale"):
            expected["input_scale"] = ((meta["shape"][1],), torch.float16)
        if meta.get("output_scale"):
            expected["output_scale"] = ((meta["shape"][0],), torch.float16)
        if meta.get("coefficient_quantizer"):
            from fqbench.quantized.activations import expected_quantizer_tensors

            expected.update({f"coefficient_quantizer.{k}": v
                             for k, v in expected_quantizer_tensors(meta["coefficient_quantizer"]).items()})
        return expected

    @classmethod
    def from_state(cls, tensors: dict, meta: dict, layout: str = "plain") -> "TransformedWeight":
        inner_meta = meta["inner"]
        inner = WEIGHT_KINDS[inner_meta["kind"]].from_state(sub_state(tensors, "inner"), inner_meta, layout)
        ops = {side: _operator(side, tensors, meta.get(side)) for side in SIDES}
        coefficients = [ops["out_op"].num_coefficients, ops["in_op"].num_coefficients]
        if list(inner_meta["shape"]) != coefficients:
            raise StateError(f"the regenerated frames have {coefficients} coefficients but the inner weight is "
                             f"{inner_meta['shape']}; the file was written by an incompatible frame construction")
        quantizer = None
        if meta.get("coefficient_quantizer"):
            quantizer = quantizer_from_state(sub_state(tensors, "coefficient_quantizer"), meta["coefficient_quantizer"])
        return cls(inner, ops["in_op"], ops["out_op"], tensors.get("input_scale"), quantizer, tensors.get("output_scale"))


def _fast_transform(op: FrameOperator, device, dtype: torch.dtype, kind: str):
    from fqbench.kernels.fast_transform import FastTransform

    if kind == "triton":
        from fqbench.kernels.triton_transform import TritonTransform, triton_problem

        problem = "it needs CUDA" if torch.device(device).type != "cuda" else triton_problem(op)
        if problem is None:
            return TritonTransform.from_operator(op, device, dtype)
        log.warning("fused Triton transform not used for %s (%s): Kronecker-factored matmuls instead", op.describe(),
                    problem)
    elif kind != "fast":
        raise ValueError(f"transforms={kind!r}: choose fast or triton")
    return FastTransform.from_operator(op, device, dtype)


def _operator(side: str, tensors: dict, recorded: dict | None) -> FrameOperator:
    try:
        spec = OperatorSpec.from_tensors(tensors[f"{side}.spec"], tensors[f"{side}.redundancy"])
    except ValueError as error:
        raise StateError(f"{side}: {error}") from error
    op = FrameOperator.from_spec(spec)
    if recorded is not None:
        rebuilt = op.summary()
        differing = {k: (v, rebuilt[k]) for k, v in recorded.items() if k in rebuilt and rebuilt[k] != v}
        if differing:
            raise StateError(f"the regenerated {side} differs from config.json (recorded, regenerated): {differing}")
    return op
