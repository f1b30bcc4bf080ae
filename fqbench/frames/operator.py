"""Frame operators: zero-pad, rotate, then expand in a block-diagonal tight fusion frame.

The analysis operator of one side of a layer is ``A = F R P`` (``P`` zero-pads
``dim`` to the frame's padded dimension, ``R`` a seeded rotation, ``F`` the
block-diagonal Parseval frame), so ``A^T A = I_dim``. Without a frame
(``redundancy=None``) the operator is the rotation alone, as in QuIP. An
operator is regenerated from its ``spec()``; nothing is stored densely.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from fqbench.frames.rotation import KINDS as ROTATION_KINDS
from fqbench.frames.rotation import make_rotation
from fqbench.frames.tff import BlockFrame, plan_frame

# Stable ids of rotation kinds in stored specs (never renumber; append new kinds).
ROTATION_IDS = {"auto": 0, "hadamard": 1, "kronecker": 2, "orthogonal": 3, "block_hadamard": 4, "identity": 5}
assert set(ROTATION_KINDS) <= set(ROTATION_IDS), "every rotation kind needs a stored id in ROTATION_IDS"
ROTATION_NAMES = {v: k for k, v in ROTATION_IDS.items()}
# What a stored spec costs: dim, block, rotation id and seed as four int32, the requested redundancy as float64.
SPEC_BITS = 4 * 32 + 64


@dataclass(frozen=True)
class OperatorSpec:
    dim: int
    redundancy: float | None  # requested redundancy; None means rotation only
    block: int
    rotation: str
    seed: int

    def to_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(int32 [dim, block, rotation id, seed], float64 [redundancy or NaN])``: the operator, regenerable."""
        if self.rotation not in ROTATION_IDS:
            raise ValueError(f"rotation kind {self.rotation!r} has no stored id")
        words = torch.tensor([self.dim, self.block, ROTATION_IDS[self.rotation], self.seed], dtype=torch.int64)
        if int(words.abs().max()) > torch.iinfo(torch.int32).max:
            raise ValueError(f"operator spec {self} does not fit int32")
        redundancy = float("nan") if self.redundancy is None else float(self.redundancy)
        return words.to(torch.int32), torch.tensor([redundancy], dtype=torch.float64)

    @classmethod
    def from_tensors(cls, words: torch.Tensor, redundancy: torch.Tensor) -> "OperatorSpec":
        dim, block, rotation_id, seed = (int(v) for v in words)
        if rotation_id not in ROTATION_NAMES:
            raise ValueError(f"unknown rotation id {rotation_id} in a stored operator spec")
        value = float(redundancy[0])
        return cls(dim, None if math.isnan(value) else value, block, ROTATION_NAMES[rotation_id], seed)


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

    def summary(self) -> dict:
        """What a reader of a checkpoint's config.json wants to know about the operator (checked on load)."""
        return {"dim": self.dim, "redundancy": self.spec.redundancy, "effective_redundancy": self.effective_redundancy,
                "block": self.spec.block, "frame_block": None if self.plan is None else self.plan.block,
                "subspaces": None if self.plan is None else self.plan.subspaces, "padded_dim": self.padded_dim,
                "num_coefficients": self.num_coefficients, "rotation": self.rotation.kind, "seed": self.spec.seed}

    def describe(self) -> str:
        frame = "no frame" if self.plan is None else self.plan.describe()
        return f"{self.rotation.kind} rotation (seed {self.spec.seed}), {frame}"
