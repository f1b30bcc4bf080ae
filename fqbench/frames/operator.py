"""Frame operators: zero-pad, rotate, then expand in a block-diagonal tight fusion frame.

The analysis operator of one side of a layer is ``A = F R P`` (``P`` zero-pads
``dim`` to the frame's padded dimension, ``R`` a seeded rotation, ``F`` the
block-diagonal Parseval frame), so ``A^T A = I_dim``. Without a frame
(``redundancy=None``) the operator is the rotation alone, as in QuIP. An
operator is regenerated from its ``spec()``; nothing is stored densely.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from fqbench.frames.rotation import make_rotation
from fqbench.frames.tff import BlockFrame, plan_frame


@dataclass(frozen=True)
class OperatorSpec:
    dim: int
    redundancy: float | None  # requested redundancy; None means rotation only
    block: int
    rotation: str
    seed: int


class FrameOperator:
    def __init__(self, dim: int, redundancy: float | None = 1.0, block: int = 8, rotation: str = "auto", seed: int = 0):
        self.dim = dim
        self.plan = None if redundancy is None else plan_frame(dim, redundancy, block)
        self.frame = None if self.plan is None else BlockFrame(self.plan)
        padded = dim if self.plan is None else self.plan.padded_dim
        self.rotation = make_rotation(padded, rotation, seed)
        self.spec = OperatorSpec(dim, redundancy, block, self.rotation.kind, seed)

    @classmethod
    def from_spec(cls, spec: OperatorSpec | dict) -> "FrameOperator":
        fields = asdict(spec) if isinstance(spec, OperatorSpec) else dict(spec)
        return cls(**fields)

    @property
    def padded_dim(self) -> int:
        return self.dim if self.plan is None else self.plan.padded_dim

    @property
    def num_coefficients(self) -> int:
        return self.dim if self.plan is None else self.plan.num_coefficients

    @property
    def effective_redundancy(self) -> float:
        return self.num_coefficients / self.dim

    def analysis(self, x: torch.Tensor) -> torch.Tensor:
        """``A x`` for every row vector: (..., dim) -> (..., num_coefficients)."""
        # Elementwise ops keep a transposed input's strides, and every reshape after
        # them would copy: one copy up front is about 3x faster on a transposed weight.
        x = x.contiguous()
        if self.padded_dim != self.dim:
            x = F.pad(x, (0, self.padded_dim - self.dim))
        x = self.rotation.apply(x)
        return x if self.frame is None else self.frame.analysis(x)

    def synthesis(self, c: torch.Tensor) -> torch.Tensor:
        """``A^T c`` for every row vector: (..., num_coefficients) -> (..., dim)."""
        c = c.contiguous()
        if self.frame is not None:
            c = self.frame.synthesis(c)
        x = self.rotation.apply_transpose(c)
        return x[..., : self.dim]

    def describe(self) -> str:
        frame = "no frame" if self.plan is None else self.plan.describe()
        return f"{self.rotation.kind} rotation (seed {self.spec.seed}), {frame}"
