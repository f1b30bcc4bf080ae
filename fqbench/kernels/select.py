"""Which backend runs a packed matrix: gemlite where it can, else the pure-PyTorch one, with the reason logged.

    select_backend(device, bits, in_features, group_size) -> "gemlite" | "torch"
    build_matrix(weights, device, dtype)                  -> the matrix module of the selected backend

Each distinct fallback reason is logged once (at INFO on a CPU, where it is expected; WARNING on a
GPU, where it costs speed), so a model of hundreds of layers prints one line per cause.
"""

from __future__ import annotations

import logging

import torch

from fqbench.kernels.packed_matrix import SUPPORTED_BITS, QuantizedWeights, TorchPackedMatrix

log = logging.getLogger(__name__)

GEMLITE_MIN_DIVISOR = 32  # gemlite: in_features and group sizes multiples of 32
_LOGGED: set[str] = set()


def gemlite_problem(device, bits: int, in_features: int, group_size: int,
                    dtype: torch.dtype = torch.float16) -> str | None:
    """Why gemlite cannot run this matrix here, or None. Checks the cheap things before importing it."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"device {device} is not CUDA"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"gemlite computes in float16 or bfloat16, not {dtype}"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if bits not in SUPPORTED_BITS:
        return f"{bits}-bit codes are not supported (supported: {SUPPORTED_BITS})"
    if in_features % GEMLITE_MIN_DIVISOR:
        return f"in_features = {in_features} is not a multiple of {GEMLITE_MIN_DIVISOR}"
    if group_size % GEMLITE_MIN_DIVISOR or in_features % group_size:
        return (f"group size {group_size} is not a multiple of {GEMLITE_MIN_DIVISOR} dividing "
                f"in_features = {in_features}")
    from fqbench.kernels.gemlite_backend import BackendUnavailable, load_gemlite

    try:
        load_gemlite()
    except BackendUnavailable as error:
        return str(error)
    return None


def select_backend(device, bits: int, in_features: int, group_size: int, dtype: torch.dtype = torch.float16) -> str:
    problem = gemlite_problem(device, bits, in_features, group_size, dtype)
    if problem is None:
        return "gemlite"
    if problem not in _LOGGED:
        _LOGGED.add(problem)
        level = logging.WARNING if torch.device(device).type == "cuda" else logging.INFO
        log.log(level, "packed matrices fall back to the torch backend: %s", problem)
    return "torch"


def build_matrix(weights: QuantizedWeights, device, dtype: torch.dtype = torch.float16, **gemlite_options):
    """The packed-matrix module for ``weights`` on ``device`` from the selected backend."""
    backend = select_backend(device, weights.bits, weights.in_features, weights.group_size, dtype)
    if backend == "gemlite":
        from fqbench.kernels.gemlite_backend import GemliteMatrix

        return GemliteMatrix(weights, device=device, dtype=dtype, **gemlite_options)
    return TorchPackedMatrix(weights, device=device, dtype=dtype)
