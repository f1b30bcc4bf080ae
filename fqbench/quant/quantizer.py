"""The quantizer protocol the solver calls, and the scalar-grid quantizer.

The solver (``fqbench.quant.solver``) walks the columns of a weight in its solve order
and asks a quantizer for ``width`` columns at a time (1 for scalar grids; 8 for an E8
lattice codebook, which quantizes eight columns of every row jointly). The quantizer
returns their dequantized values, keeps their codes, and at the end builds the
quantized weight. The solver owns the error feedback, damping and the Cholesky
fallback; a quantizer owns the grid or codebook, so a new one never touches the
solver's loop.

    quantizer.prepare(W, order, dead) # W (rows, cols) in original column order, as given (columns
                                      # without input not yet zeroed: ``dead``, a boolean mask);
                                      # order: the solve order (act-order permutation) or None
    dq = quantizer.quantize(WT, col)  # WT: (cols, rows), the up-to-date weights in solve order;
                                      # returns (k, rows) dequantized values of WT[col:col + k],
                                      # k = min(width, cols - col): the last group may be narrower
    weight = quantizer.finish()       # a QuantizedWeight in original column order
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

from fqbench.quant.codebook import DIM, VectorCodebook
from fqbench.quant.grids import AffineGrid, GridSpec
from fqbench.quantized import GridWeight, QuantizedWeight
from fqbench.quantized.codebook import CodebookWeight


class ColumnQuantizer(Protocol):
    width: int

    def prepare(self, W: torch.Tensor, order: torch.Tensor | None, dead: torch.Tensor) -> None: ...

    def quantize(self, WT: torch.Tensor, col: int) -> torch.Tensor: ...

    def finish(self) -> QuantizedWeight: ...


class GridQuantizer:
    """Scalar codes on affine grids (``GridSpec``), one grid per row and group of ``groupsize`` columns.

    A dynamic group's grid is fitted when the solver reaches its first column, on the
    up-to-date weights (error feedback included); ``static_groups`` fits every group once
    on the original weights (with act-order, groups stay contiguous in the original order).
    Columns without input are zeroed first, except in reference-exact mode (float32 scales):
    there the one grid of a row is fitted on the weight as given, as IST-DASLab's GPTQ does.
    """

    width = 1

    def __init__(self, grid: GridSpec, groupsize: int = -1, static_groups: bool = False):
        self.grid = grid
        self.groupsize = groupsize
        self.static_groups = static_groups and groupsize > 0

    def prepare(self, W: torch.Tensor, order: torch.Tensor | None, dead: torch.Tensor) -> None:
        rows, cols = W.shape
        self.order = order
        self.size = self.groupsize if self.groupsize > 0 else cols
        groups = math.ceil(cols / self.size)
        self.static = None
        if self.grid.scale_dtype == "float32" and groups == 1:
            self.static = [self.grid.fit(W)]
        zeroed = W.masked_fill(dead, 0) if bool(dead.any()) else W
        if self.static_groups:
            self.static = [self.grid.fit(zeroed[:, g * self.size:(g + 1) * self.size]) for g in range(groups)]
        self.codesT = torch.empty(cols, rows, dtype=torch.uint8, device=W.device)
        self.scale = torch.empty(rows, groups, device=W.device)
        self.zero = torch.empty(rows, groups, device=W.device)
        self.position_group = torch.empty(cols, dtype=torch.long)
        self.current: AffineGrid | None = None
        self.current_group = -1

    def quantize(self, WT: torch.Tensor, col: int) -> torch.Tensor:
        if self.static is not None:
            g = (self.order[col].item() if self.order is not None else col) // self.size
        else:
            g = col // self.size
        if g != self.current_group:
            if self.static is not None:
                self.current = self.static[g]
            else:
                self.current = self.grid.fit(WT[col:col + self.size].T)
            self.scale[:, g] = self.current.scale
            self.zero[:, g] = self.current.zero
            self.current_group = g
        self.position_group[col] = g
        q = self.current.encode(WT[col])
        self.codesT[col] = q.to(torch.uint8)
        return self.current.decode(q).unsqueeze(0)

    def finish(self) -> GridWeight:
        codes = self.codesT.T
        group_index = self.position_group.to(codes.device)
        if self.order is not None:
            inverse = torch.argsort(self.order)
            codes = codes[:, inverse]
            group_index = group_index[inverse.to(group_index.device)]
        return GridWeight.fit(codes.contiguous(), self.scale, self.zero, group_index, bits=self.grid.bits,
                              integer_zero=self.grid.integer_zero, shared_scale=self.grid.shared_scale,
                              scale_dtype=getattr(torch, self.grid.scale_dtype))


class CodebookQuantizer:
    """Eight columns at a time: each row's eight weights become the nearest codeword of a vector codebook
    (QuIP#'s E8P12 and its residual stages), at one scale for the matrix, ``RMS(W) / rms_ratio``.

    A last group of fewer than eight columns is matched on its columns only (the codeword's other entries
    are free). The solver's act-order would group columns out of order, which the codes cannot express.
    """

    width = DIM

    def __init__(self, codebook: VectorCodebook, rms_ratio: float | None = None):
        self.codebook = codebook
        self.rms_ratio = codebook.rms_ratio if rms_ratio is None else rms_ratio
        if not self.rms_ratio > 0:
            raise ValueError(f"rms_ratio={rms_ratio} must be positive (the scale is RMS(W) / rms_ratio)")

    def prepare(self, W: torch.Tensor, order: torch.Tensor | None, dead: torch.Tensor) -> None:
        if order is not None:
            raise ValueError("a vector codebook quantizes groups of consecutive columns; act_order (a column "
                             "permutation) is not supported: use method.solver.act_order=false")
        rows, cols = W.shape
        rms = W.masked_fill(dead, 0).double().square().mean().sqrt().item()  # of the weights the solver quantizes
        self.scale = torch.tensor([rms / self.rms_ratio if rms > 0 else 1.0], dtype=torch.float32)
        self.shape = (rows, cols)
        self.codes = torch.empty(len(self.codebook.stages), math.ceil(cols / DIM), rows, dtype=torch.int32,
                                 device=W.device)

    def quantize(self, WT: torch.Tensor, col: int) -> torch.Tensor:
        columns = WT[col:col + DIM]
        k = columns.shape[0]
        scale = self.scale.to(WT.device)
        target = torch.zeros(columns.shape[1], DIM, device=WT.device)
        target[:, :k] = columns.T / scale
        mask = None if k == DIM else torch.arange(DIM) < k
        codes = self.codebook.encode(target, mask)
        self.codes[:, col // DIM] = codes.int()
        return (self.codebook.decode(codes)[:, :k] * scale).T

    def finish(self) -> CodebookWeight:
        codes = tuple(stage.T.contiguous() for stage in self.codes)
        return CodebookWeight(codes, self.scale.to(self.codes.device), codebook=self.codebook.name, shape=self.shape)


def round_to_nearest(W: torch.Tensor, quantizer: ColumnQuantizer) -> QuantizedWeight:
    """Every column rounded on its own (no error feedback): RTN through the same quantizer."""
    WT = W.T.contiguous()
    quantizer.prepare(W, None, torch.zeros(W.shape[1], dtype=torch.bool, device=W.device))
    for col in range(0, W.shape[1], quantizer.width):
        quantizer.quantize(WT, col)
    return quantizer.finish()
