"""Quantized weights: one class per weight kind, each owning exactly the tensors it stores.

A quantized weight is the weight map of one linear layer without its bias (the
bias stays in full precision, in ``QuantLinear``). Every kind

- gives the effective weight ``W_hat`` (out, in) in float32, exactly as evaluated (``weight()``);
- runs ``x -> x @ W_hat.T (+ bias)`` in its own space (frame space for transformed weights);
- turns itself into the tensors and metadata a checkpoint stores (``state()``) and back
  (``from_state``), so that saving dispatches on nothing but the object and loading on
  nothing but ``meta["kind"]``;
- derives ``bits_per_weight`` from that very state: every stored tensor says how many
  bits it costs (codes at their width, not the bytes of their container), and the sum is
  divided by the number of original weights. There is no second copy of the accounting;
- holds its codes ``plain`` (one integer per byte, ready for a dense matmul),
  ``packed`` (bit-packed as stored, computing with the CPU table-lookup kernels) or
  ``kernel`` (in the layout of the inference kernels of a device and dtype: gemlite on a
  GPU where it can run, else a pure-PyTorch matrix over the same layout; transforms as
  Kronecker-factored matmuls): a layout choice of the same object (``with_layout``), as
  torchao's tensor subclasses make it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

LAYOUTS = ("plain", "packed", "kernel")
WEIGHT_KINDS: dict[str, type["QuantizedWeight"]] = {}


def kind_registrar(registry: dict, what: str):
    """A decorator factory registering classes in ``registry`` under a kind name (stored in checkpoints)."""

    def register(name: str):
        def decorate(cls):
            if name in registry:
                raise ValueError(f"{what} {name!r} is registered twice")
            cls.kind = name
            registry[name] = cls
            return cls

        return decorate

    return register


register_weight_kind = kind_registrar(WEIGHT_KINDS, "weight kind")


class StateError(ValueError):
    """Stored tensors or metadata that do not describe a valid quantized weight."""


@dataclass
class Stored:
    """One stored tensor and the bits it costs in the honest accounting."""

    tensor: torch.Tensor
    bits: int


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")


class StoredModule(nn.Module):
    """A module whose buffers are stored tensors: moving it changes their device, never their dtype.

    ``model.half()`` or ``model.to(torch.bfloat16)`` must not round a float32 scale or turn
    float16 scales into float32 (the honest bits count what is stored).
    """

    def _apply(self, fn, recurse=True):
        def move_only(t):
            return t.to(fn(t.detach().reshape(-1)[:0]).device)

        return super()._apply(move_only, recurse)


class QuantizedWeight(StoredModule):
    kind: ClassVar[str] = ""

    def __init__(self, out_features: int, in_features: int):
        super().__init__()
        self.out_features = out_features
        self.in_features = in_features
        self.method = ""
        self.nominal_bits = float("nan")
        self.info: dict = {}  # what the method reports about this layer (damping, seconds, ...), not stored

    # --- values -------------------------------------------------------------------------

    def weight(self) -> torch.Tensor:
        """``W_hat`` (out, in) in float32."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ W_hat.T + bias``: the same arithmetic as a fake-quantized ``nn.Linear``."""
        return F.linear(x, self.weight().to(device=x.device, dtype=x.dtype), None if bias is None else bias.to(x.dtype))

    @property
    def layout(self) -> str:
        return "plain"

    def with_layout(self, layout: str, *, device=None, dtype: torch.dtype = torch.float16) -> "QuantizedWeight":
        """This weight with its codes held ``plain``, ``packed`` or for the ``kernel`` of ``device`` computing in
        ``dtype`` (a new object when the layout changes)."""
        check_layout(layout)
        return self

    # --- storage ------------------------------------------------------------------------

    def stored(self) -> dict[str, Stored]:
        """Every tensor a checkpoint stores for this weight, with the bits it costs."""
        raise NotImplementedError

    def meta(self) -> dict:
        """The kind-specific metadata a checkpoint stores (JSON)."""
        return {}

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """``(tensors, meta)``: exactly what a checkpoint stores; ``from_state`` rebuilds the weight."""
        tensors = {name: s.tensor.detach().cpu().contiguous() for name, s in self.stored().items()}
        meta = {"kind": self.kind, "shape": [self.out_features, self.in_features], **self.meta()}
        return tensors, meta

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict, layout: str = "plain") -> "QuantizedWeight":
        raise NotImplementedError

    @classmethod
    def expected_tensors(cls, meta: dict) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of every tensor a weight with this metadata stores."""
        raise NotImplementedError

    @property
    def stored_bits(self) -> int:
        return sum(s.bits for s in self.stored().values())

    @property
    def bits_per_weight(self) -> float:
        return self.stored_bits / (self.out_features * self.in_features)

    @property
    def quantizes_activations(self) -> bool:
        """Whether the forward pass quantizes activations inside the weight's own space, so a model must run
        this weight's forward (a ``QuantLinear``), not a dense matmul with ``weight()``."""
        return False

    @property
    def effective_redundancy(self) -> float | None:
        """Stored coefficients per original weight, for kinds that quantize in a redundant space."""
        return None

    def extra_repr(self) -> str:
        return (f"{self.kind} ({self.method or 'unnamed'}): {self.out_features}x{self.in_features}, "
                f"{self.bits_per_weight:.3f} bits/weight, {self.layout}")


def weight_from_state(tensors: dict[str, torch.Tensor], meta: dict, layout: str = "plain",
                      name: str = "layer") -> QuantizedWeight:
    """Rebuild any stored weight (checked first) from its tensors and metadata."""
    check_layout(layout)
    kind = meta.get("kind")
    if kind not in WEIGHT_KINDS:
        raise StateError(f"{name}: unknown weight kind {kind!r}; this fqbench reads {', '.join(sorted(WEIGHT_KINDS))}")
    cls = WEIGHT_KINDS[kind]
    check_tensors(name, cls.expected_tensors(meta), tensors, kind)
    weight = cls.from_state(tensors, meta, layout)
    if [weight.out_features, weight.in_features] != list(meta["shape"]):
        raise StateError(f"{name}: rebuilt shape {[weight.out_features, weight.in_features]} differs from the "
                         f"recorded {meta['shape']}")
    weight.method = meta.get("method", "")
    weight.nominal_bits = meta.get("nominal_bits", float("nan"))
    return weight


def check_tensors(name: str, expected: dict, tensors: dict[str, torch.Tensor], kind: str) -> None:
    """Raise a clear error when tensors are missing, extra or of the wrong shape or dtype."""
    missing = sorted(f"{name}.{k}" for k in set(expected) - set(tensors))
    if missing:
        raise StateError(f"missing tensor(s) {', '.join(missing)}; the checkpoint is incomplete or corrupted")
    unknown = sorted(f"{name}.{k}" for k in set(tensors) - set(expected))
    if unknown:
        raise StateError(f"unexpected tensor(s) {', '.join(unknown)} for a {kind} weight")
    for key, (shape, dtype) in expected.items():
        t = tensors[key]
        if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
            raise StateError(f"tensor {name}.{key} should be {dtype} of shape {tuple(shape)}, found {t.dtype} of "
                             f"shape {tuple(t.shape)}; the checkpoint is corrupted or does not match its config.json")


def sub_state(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix.``, with the prefix removed."""
    start = len(prefix) + 1
    return {k[start:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def dtype_named(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise StateError(f"unknown dtype {name!r}")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_bits(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits if dtype.is_floating_point else torch.iinfo(dtype).bits


def index_bits(count: int) -> int:
    """Bits of an index into ``count`` items."""
    return max(1, math.ceil(math.log2(count)))
