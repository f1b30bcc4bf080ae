"""A straightforward implementation of the published GPTQ algorithm (IST-DASLab/gptq).

It is the baseline our solver is timed against and checked for equal results:
the same damping, Cholesky-inverse, blocks and lazy batch updates, written the
plain way (a fresh error matrix per block, column updates by outer products).
"""

from __future__ import annotations

import torch

from fqbench.quant.grids import GridSpec


def reference_gptq(W: torch.Tensor, H: torch.Tensor, grid: GridSpec, blocksize: int = 128, percdamp: float = 0.01):
    W = W.clone().float()
    H = H.clone().float()
    cols = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    quantizer = grid.fit(W)
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
            q = quantizer.decode(quantizer.encode(w))
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return Q
