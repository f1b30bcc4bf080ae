"""Packed weights through gemlite's Triton kernels (CUDA only; ``pip install -e ".[gpu]"``).

Facts from gemlite 0.6 (its ``core.py``): ``GemLiteLinear(W_nbits in {1, 2, 4, 8}, group_size,
in_features, out_features, input_dtype, output_dtype)``, ``in_features % 32 == 0`` and divisible by
the group size; ``.pack(W_q uint8 (N, K), scales (N, G), zeros (N, G), bias)`` packs 32 / bits codes
per int32 along K, stored (K * bits / 32, N). With one group per row it keeps ``(W_q - zeros)`` and
scales the output per channel; with groups it stores ``zeros = -zeros * scales`` and dequantizes by
one FMA. It picks GEMV kernels up to 4 rows, split-K GEMM up to 63, GEMM from 64. Importing it
queries the GPU, so it is imported lazily; on import it loads the tuned configs whose file name
is in the GPU's name (``h100`` on an H100, none on an H200, so ``load_gemlite`` loads ``h100.json``
on both).

``GemliteMatrix``: ``x @ W_hat.T + bias`` with 2-, 4- or 8-bit codes, and 3-bit codes from 4-bit
containers. Beyond ``dense_rows`` rows (prefill) it can instead dequantize once per call with one
Triton pass and use cuBLAS (``prefill="dequant"``) or keep gemlite's GEMM (``prefill="gemlite"``);
which is faster is measured by ``python -m fqbench.bench.gpu_check``.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from fqbench.kernels.packed_matrix import QuantizedWeights, check_input, container_bits, unpack_over_k

log = logging.getLogger(__name__)

DENSE_ROWS = 64  # from here gemlite switches to its GEMM kernel; above, dequant + cuBLAS is the alternative
PREFILL_MODES = ("dequant", "gemlite")
TUNED_CONFIG_GPUS = ("h100", "h200")  # GPUs the bundled configs/h100.json is meant for


class BackendUnavailable(RuntimeError):
    """gemlite cannot run here; the message says why."""


_LOADED: dict[str, object] = {}


def load_gemlite():
    """The gemlite module, imported once, with its tuned configs loaded; BackendUnavailable if not."""
    if "module" in _LOADED:
        return _LOADED["module"]
    if "reason" in _LOADED:
        raise BackendUnavailable(_LOADED["reason"])
    if not torch.cuda.is_available():
        raise BackendUnavailable("CUDA is not available (gemlite queries the GPU on import)")
    try:
        import gemlite
    except Exception as error:  # ImportError, or a driver/triton error raised while importing
        _LOADED["reason"] = f"gemlite cannot be imported ({type(error).__name__}: {error})"
        raise BackendUnavailable(_LOADED["reason"]) from error
    gpu = torch.cuda.get_device_name().lower()
    config = os.path.join(os.path.dirname(gemlite.__file__), "configs", "h100.json")
    if any(name in gpu for name in TUNED_CONFIG_GPUS) and os.path.exists(config):
        loaded = gemlite.GemLiteLinear.load_config(config)
        log.info("gemlite %s: %s tuned configs %s", gemlite.__version__, "loaded" if loaded else "FAILED to load",
                 config)
    else:
        log.info("gemlite %s: no bundled tuned configs used for %s (autotuning on first call)",
                 gemlite.__version__, gpu)
    tuned = os.environ.get("FQBENCH_GEMLITE_CONFIG")  # configs an earlier run autotuned (gpu_check saves them)
    if tuned:
        log.info("gemlite: %s configs from FQBENCH_GEMLITE_CONFIG=%s",
                 "loaded" if gemlite.GemLiteLinear.load_config(tuned) else "FAILED to load", tuned)
    _LOADED["module"] = gemlite
    return gemlite


def set_autotune(decode: str = "fast", other: str = "default") -> None:
    """gemlite's autotuning: ``decode`` for its GEMV kernels (batch 1), ``other`` for split-K and GEMM
    ("default": its default configs, no tuning; tuning every shape and row bucket costs minutes)."""
    load_gemlite().set_autotune({"GEMV": decode, "GEMV_REVSPLITK": decode, "GEMV_SPLITK": other,
                                 "GEMM_SPLITK": other, "GEMM": other})


class GemliteMatrix(nn.Module):
    backend = "gemlite"

    def __init__(self, weights: QuantizedWeights, device="cuda", dtype: torch.dtype = torch.float16,
                 dense_rows: int = DENSE_ROWS, prefill: str = "dequant"):
        super().__init__()
        if prefill not in PREFILL_MODES:
            raise ValueError(f"prefill must be one of {PREFILL_MODES}, got {prefill!r}")
        if dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"gemlite computes in float16 or bfloat16, got {dtype}")
        gemlite = load_gemlite()
        self.out_features, self.in_features = weights.out_features, weights.in_features
        self.bits, self.group_size, self.dtype = weights.bits, weights.group_size, dtype
        self.kernel_bits = container_bits(weights.bits)
        self.dense_rows, self.prefill = dense_rows, prefill
        gemlite_dtype = gemlite.DType.FP16 if dtype == torch.float16 else gemlite.DType.BF16
        layer = gemlite.GemLiteLinear(self.kernel_bits, group_size=self.group_size, in_features=self.in_features,
                                      out_features=self.out_features, input_dtype=gemlite_dtype,
                                      output_dtype=gemlite_dtype)
        codes = weights.codes.to(device)
        bias = None if weights.bias is None else weights.bias.to(device=device, dtype=dtype)
        layer.pack(codes, weights.scale.to(device=device, dtype=dtype), weights.zero.to(device=device, dtype=dtype),
                   bias=bias)
        self.layer = layer
        self.fma = layer.W_group_mode == 4  # zeros stored as -zero * scale
        self.dequant_reason = self._dequant_layout_problem(codes)
        if self.dequant_reason:
            log.warning("gemlite %dx%d: dequantize + cuBLAS prefill disabled (%s); gemlite's GEMM runs instead",
                        self.out_features, self.in_features, self.dequant_reason)

    def _dequant_layout_problem(self, codes: torch.Tensor) -> str | None:
        """Why the Triton dequantizer cannot read gemlite's tensors, or None (checked on a slice)."""
        w_q = self.layer.W_q
        per_word = 32 // self.kernel_bits
        expected = (self.in_features // per_word, self.out_features)
        if w_q.dtype != torch.int32 or tuple(w_q.shape) != expected or not w_q.is_contiguous():
            return f"W_q is {w_q.dtype} {tuple(w_q.shape)}, expected contiguous int32 {expected}"
        if self.layer.W_group_mode not in (1, 4) or self.layer.scales.shape[-1] != self.out_features:
            return f"unexpected W_group_mode {self.layer.W_group_mode} or scales {tuple(self.layer.scales.shape)}"
        words = min(4, expected[0])
        if not torch.equal(unpack_over_k(w_q[:words], self.kernel_bits), codes[:, : words * per_word].T.int()):
            return "W_q's bit layout differs from fqbench.kernels.packed_matrix.pack_over_k"
        return None

    def codes(self) -> torch.Tensor:
        """The (N, K) uint8 codes, unpacked from gemlite's layout."""
        if self.dequant_reason:
            raise RuntimeError(f"the codes cannot be read back from gemlite's tensors: {self.dequant_reason}")
        return unpack_over_k(self.layer.W_q, self.kernel_bits)[: self.in_features].T.to(torch.uint8)

    def dequantize(self) -> torch.Tensor:
        """``W_hat.T`` (K, N) in this matrix's dtype, one Triton pass over the packed codes."""
        from fqbench.kernels.triton_dequant import dequantize_packed

        return dequantize_packed(self.layer.W_q, self.kernel_bits, self.layer.scales, self.layer.zeros,
                                 self.in_features, self.group_size, fma=self.fma, dtype=self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_features, self.dtype)
        rows = x.numel() // self.in_features
        if rows > self.dense_rows and self.prefill == "dequant" and self.dequant_reason is None:
            y = x @ self.dequantize()
            return y if self.layer.bias is None else y + self.layer.bias
        return self.layer(x)

    def resident_bytes(self) -> int:
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for t in [*self.layer.parameters(), *self.layer.buffers()] if t is not None}
        return sum(storages.values())

    def describe(self) -> str:
        prefill = (f"above {self.dense_rows} rows: {self.prefill}" if self.dequant_reason is None
                   else f"above {self.dense_rows} rows: gemlite ({self.dequant_reason})")
        return (f"gemlite {self.out_features}x{self.in_features}, {self.bits}-bit codes in {self.kernel_bits}-bit "
                f"containers, group {self.group_size}, {self.dtype}; {prefill}")
