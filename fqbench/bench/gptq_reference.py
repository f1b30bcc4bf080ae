"""A straightforward implementation of the published GPTQ algorithm (IST-DASLab/gptq's ``fasterquant``).

It is the baseline our solver is timed against and checked for equal results, and it shares no
code with the solver or the grids under test: its own per-row asymmetric min-max quantizer (the
reference's ``Quantizer`` with ``perchannel=True, sym=False``: float32 scales, integer zero points,
``q = clamp(round(w / scale) + zero, 0, maxq)``), fitted on the whole weight before columns without
input are zeroed, the same damping, Cholesky inverse, blocks and lazy batch updates, written the
plain way (a fresh error matrix per block, column updates by outer products).
"""

from __future__ import annotations

import torch


class _MinMaxGrid:
    def __init__(self, W: torch.Tensor, bits: int):
        self.maxq = 2**bits - 1
        zeros = torch.zeros(W.shape[0])
        xmin = torch.minimum(W.min(1).values, zeros)
        xmax = torch.maximum(W.max(1).values, zeros)
        empty = (xmin == 0) & (xmax == 0)
        xmin[empty], xmax[empty] = -1, +1
        self.scale = ((xmax - xmin) / self.maxq).unsqueeze(1)
        self.zero = torch.round(-xmin.unsqueeze(1) / self.scale)

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        q = torch.clamp(torch.round(w.unsqueeze(1) / self.scale) + self.zero, 0, self.maxq)
        return (self.scale * (q - self.zero)).flatten()


def reference_gptq(W: torch.Tensor, H: torch.Tensor, bits: int, blocksize: int = 128, percdamp: float = 0.01):
    """GPTQ on a per-row min-max grid of ``bits`` bits; returns the dequantized weight (float32)."""
    W = W.clone().float()
    H = H.clone().float()
    cols = W.shape[1]
    grid = _MinMaxGrid(W, bits)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    H[range(cols), range(cols)] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    Hinv = torch.linalg.cholesky(H, upper=True)
    Q = torch.zeros_like(W)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = W1[:, i]
            d = Hinv1[i, i]
            q = grid.quantize(w)
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return Q
