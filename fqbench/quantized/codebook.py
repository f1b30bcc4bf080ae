"""Vector-quantized codes: eight weights of a row share one codeword of a lattice codebook (QuIP#).

``W_hat[r, 8g:8g+8] = scale * decode(codes[:, r, g])``: one scale for the whole matrix, and per
group of eight columns one code per codebook stage (``fqbench.quant.codebook``: E8P12 at 2 bits;
E8P12 plus a residual stage at 3 and 4 bits). When the columns are not a multiple of eight, the
last group's codeword is cut to the remaining columns (its other entries were free when it was
chosen).

Stored (names relative to the weight), each counted at the bits it costs:

- ``codes``: the first stage's codes, bit-packed at the stage's width (16 bits for E8P12, so
  exactly 2 bits per weight);
- ``residual_codes``: the second stage's codes (3 and 4 bits only; 8 or 16 bits per group);
- ``scale``: one float32.

The codebook itself is a constant of the format (named in the metadata, regenerated on load).
In the ``plain`` layout the codes are one int32 each (ready to index the codebook); in the
``packed`` layout they stay bit-packed in memory and the weights are decoded from them. There
is no GPU kernel for codebook codes: the ``kernel`` layout keeps them packed.
"""

from __future__ import annotations

import logging
import math

import torch

from fqbench.kernels.bitpack import pack_bits, packed_shape, unpack_bits
from fqbench.quant.codebook import DIM, vector_codebook
from fqbench.quantized.base import QuantizedWeight, StateError, Stored, check_layout, register_weight_kind
from fqbench.quantized.grid import _copy_identity

STAGE_NAMES = ("codes", "residual_codes")

log = logging.getLogger(__name__)


@register_weight_kind("codebook")
class CodebookWeight(QuantizedWeight):
    def __init__(self, codes: tuple[torch.Tensor, ...], scale: torch.Tensor, *, codebook: str,
                 shape: tuple[int, int], layout: str = "plain"):
        """``codes``: one tensor per codebook stage, (rows, groups) int32 in the plain layout or bit-packed
        in the packed layout; ``scale``: (1,) float32; ``codebook``: a name in ``VECTOR_CODEBOOKS``."""
        rows, cols = shape
        super().__init__(rows, cols)
        check_layout(layout)
        try:
            self.codebook = vector_codebook(codebook)
        except ValueError as error:
            raise StateError(str(error)) from None
        if len(codes) != len(self.codebook.stages):
            raise StateError(f"codebook {codebook!r} has {len(self.codebook.stages)} stage(s), got {len(codes)} "
                             "code tensors")
        if scale.shape != (1,) or scale.dtype != torch.float32:
            raise StateError(f"a codebook weight has one float32 scale, got {scale.dtype} of shape {tuple(scale.shape)}")
        self._layout = layout
        self.register_buffer("scale", scale)
        for name, stage_codes in zip(STAGE_NAMES, codes):
            self.register_buffer(name, stage_codes)

    @property
    def groups(self) -> int:
        return math.ceil(self.in_features / DIM)

    @property
    def layout(self) -> str:
        return self._layout

    def stage_codes(self) -> list[torch.Tensor]:
        """Every stage's codes as (rows, groups) int32, whatever the layout."""
        codes = [getattr(self, name) for name in STAGE_NAMES[:len(self.codebook.stages)]]
        if self._layout == "plain":
            return codes
        count = self.out_features * self.groups
        return [unpack_bits(c, stage.bits, count).view(self.out_features, self.groups).int()
                for c, stage in zip(codes, self.codebook.stages)]

    # --- values -------------------------------------------------------------------------

    def weight(self) -> torch.Tensor:
        vectors = self.codebook.decode(torch.stack(self.stage_codes()))  # (rows, groups, 8)
        weight = vectors.view(self.out_features, self.groups * DIM)[:, :self.in_features]
        return (weight * self.scale).contiguous()

    def with_layout(self, layout: str, *, device=None, dtype: torch.dtype = torch.float16) -> "CodebookWeight":
        check_layout(layout)
        if layout == "kernel":
            log.warning("%s: no kernel layout (%s); kept bit-packed (CPU decode)", self.extra_repr(),
                        self.kernel_problem())
            layout = "packed"
        if layout == self._layout:
            return self if device is None else self.to(device)
        codes = self.stage_codes()
        if layout == "packed":
            codes = [pack_bits(c, stage.bits).to(c.device) for c, stage in zip(codes, self.codebook.stages)]
        clone = CodebookWeight(tuple(codes), self.scale, codebook=self.codebook.name,
                               shape=(self.out_features, self.in_features), layout=layout)
        _copy_identity(self, clone)
        return clone if device is None else clone.to(device)

    def kernel_problem(self) -> str:
        """Why this weight has no ``kernel`` layout: the inference kernels take scalar grid codes."""
        return "the inference kernels take scalar grid codes, not codebook codes"

    # --- storage ------------------------------------------------------------------------

    def stored(self) -> dict[str, Stored]:
        packed = self.with_layout("packed")
        count = self.out_features * self.groups
        stored = {name: Stored(getattr(packed, name), count * stage.bits)
                  for name, stage in zip(STAGE_NAMES, self.codebook.stages)}
        stored["scale"] = Stored(self.scale, 32)
        return stored

    def meta(self) -> dict:
        return {"codebook": self.codebook.name}

    @classmethod
    def expected_tensors(cls, meta: dict) -> dict:
        rows, cols = meta["shape"]
        try:
            codebook = vector_codebook(meta.get("codebook"))
        except ValueError as error:
            raise StateError(str(error)) from None
        count = rows * math.ceil(cols / DIM)
        expected = {name: (packed_shape(count, stage.bits), torch.uint8)
                    for name, stage in zip(STAGE_NAMES, codebook.stages)}
        expected["scale"] = ((1,), torch.float32)
        return expected

    @classmethod
    def from_state(cls, tensors: dict, meta: dict, layout: str = "plain") -> "CodebookWeight":
        rows, cols = meta["shape"]
        codebook = vector_codebook(meta["codebook"])
        codes = tuple(tensors[name] for name in STAGE_NAMES[:len(codebook.stages)])
        packed = cls(codes, tensors["scale"], codebook=codebook.name, shape=(rows, cols), layout="packed")
        return packed.with_layout(layout)
