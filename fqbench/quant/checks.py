"""Input validation for layer-level quantization, and the proxy error every run logs."""

from __future__ import annotations

import torch

from fqbench.finite import all_finite


def validate_layer_inputs(W: torch.Tensor, H: torch.Tensor) -> None:
    """Raise a clear ``ValueError`` for weights/Hessians no method can quantize."""
    if not isinstance(W, torch.Tensor) or W.dim() != 2:
        raise ValueError(f"W must be a 2-D (out, in) tensor, got {_describe(W)}")
    if not isinstance(H, torch.Tensor) or H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"H must be a square (in, in) tensor, got {_describe(H)}")
    if H.shape[0] != W.shape[1]:
        raise ValueError(
            f"H is {tuple(H.shape)} but W is {tuple(W.shape)}: H must be (in, in) with in = W.shape[1] = {W.shape[1]}"
        )
    if not W.is_floating_point() or not H.is_floating_point():
        raise ValueError(f"W and H must be floating point, got {W.dtype} and {H.dtype}")
    _check_finite("W", W)
    _check_finite("H", H)
    if (torch.diag(H) < 0).any():
        bad = torch.nonzero(torch.diag(H) < 0).flatten()[:5].tolist()
        raise ValueError(f"H has negative diagonal entries at {bad}: it is not a Hessian (2/N) sum x x^T")


def _check_finite(name: str, t: torch.Tensor) -> None:
    if all_finite(t):
        return
    bad = ~torch.isfinite(t)
    where = [tuple(i) for i in torch.nonzero(bad)[:3].tolist()]
    raise ValueError(
        f"{name} contains {int(bad.sum())} NaN/Inf values (first at {where}); "
        f"check the layer's weights and the calibration activations"
    )


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"a tensor of shape {tuple(t.shape)}"
    return f"{type(t).__name__}"


def proxy_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """Relative proxy error ``tr(dW H dW^T) / tr(W H W^T)`` in float64."""
    den = output_error(W, torch.zeros_like(W), H)
    return output_error(W, W_hat, H) / den if den > 0 else float("nan")


def output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """``tr(dW H dW^T)`` in float64: the squared output error per calibration token (times 2)."""
    H = H.to(torch.float64)
    W = W.to(H.device, torch.float64)
    dW = W - W_hat.to(H.device, torch.float64)
    return float(((dW @ H) * dW).sum())
