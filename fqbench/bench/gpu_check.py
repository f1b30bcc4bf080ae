"""The one prepared device run for the GPU kernels (DESIGN.md §7): checks, layer microbenchmarks, a model.

    python -m fqbench.bench.gpu_check --out DIR [--budget-s 270] [--sections env,checks,layers,model,pytest]
    python -m fqbench.bench.gpu_check --out DIR --device cpu --dry-run      (tiny shapes, the CPU paths)

Sections, in priority order, each measurement in its own try/except (a failure is a record with the
error, the rest goes on) and the results rewritten atomically to DIR/gpu_check.json and
DIR/gpu_check.md after every section, so a run cut short still leaves what it measured:

- env: GPU name, versions, gemlite import and its tuned configs.
- checks: relative error ``||y - y_ref|| / ||y_ref||`` (float64 references) of every backend against
  the limit 2e-3: FastTransform and the fused Triton transform against ``FrameOperator``; the torch
  and gemlite matrices at 2/3/4/8 bits (per row and group 128) at 1, 16 and 2048 rows, both prefill
  paths; the Triton dequantizer; the FrameQuant-style layer; CUDA-graphed decode tokens == eager tokens.
- layers: microbenchmarks of one linear per Llama-2-7B shape (4096x4096, 11008x4096, 4096x11008) at
  1, 16 and 2048 rows, each call inside a CUDA graph (launch overhead removed), cycling over enough
  copies of the weights that they do not sit in L2 (as in a real model): FP16 F.linear, gemlite 2/4-bit
  and 3-bit in 4-bit containers (prefill: dequantize + cuBLAS, and gemlite's GEMM), the torch fallback,
  and the FrameQuant-style layer (transform in, 2-bit gemlite, transform out) at r = 1.0 and 1.1 with
  the fast (matmul) and the fused (Triton) transforms. Ratios are against FP16 from the same run.
- model: the decode harness on a Llama-2-7B-shaped model (random weights): dense FP16, then its linears
  replaced by gemlite 2-bit and by FrameQuant-style layers (r = 1.0, 1.1); batch-1 and batch-16 decode
  graphed, prefill 1x2048; tokens/s, peak memory, resident linear weights against honest bits.
- pytest: the GPU tests (tests/test_fast_transform.py, tests/test_kernel_backends.py) if time is left.

Random codes and weights come from seeded device generators: they serve timing and kernel checks only.

gemlite autotunes a kernel on the first call of every (rows bucket, N, K, group, bits) it has no tuned
config for (its bundled h100.json covers 4-bit group 64/128 and 8-bit, not 2-bit per-row codes): some
15 compiles each. To fit the budget the checks use its default configs, the layers and the model tune
its batch-1 GEMV kernels (``--gemlite-autotune``, "fast") and keep default configs for split-K
(2..63 rows: batch-16 decode) and GEMM (only the ``prefill=gemlite`` comparisons): those are untuned.
The configs found are saved to DIR/gemlite_autotune.json; ``--gemlite-config`` loads them in a later run.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fqbench.frames.operator import FrameOperator
from fqbench.kernels.fast_transform import FastTransform, relative_error
from fqbench.kernels.packed_matrix import QuantizedWeights, TorchPackedMatrix
from fqbench.kernels.transformed import TransformedMatrix

LIMIT = 2e-3
SECTIONS = ("env", "checks", "layers", "model", "pytest")
SHARES = {"env": 0.02, "checks": 0.25, "layers": 0.43, "model": 0.30}  # of the budget; pytest gets what is left
L2_FLUSH_BYTES = 256 * 2**20  # weights cycled per graph: well beyond an H100/H200's 50 MiB L2
MAX_COPIES = 64


class Sizes:
    """Problem sizes of a full run and of the CPU dry run."""

    def __init__(self, dry_run: bool):
        self.dry_run = dry_run
        self.transform_dims = [128, 192] if dry_run else [4096, 11008]
        self.layer_shapes = [(64, 128)] if dry_run else [(4096, 4096), (11008, 4096), (4096, 11008)]
        self.rows = [1, 32] if dry_run else [1, 2048, 16]
        self.check_shape = (96, 256) if dry_run else (4096, 4096)
        self.model = dict(shape="tiny") if dry_run else dict(shape="7b")
        self.decode_batches = [1, 2] if dry_run else [1, 16]
        self.prefill = 16 if dry_run else 2048
        self.decode_tokens = 4 if dry_run else 32
        self.rounds = 1 if dry_run else 3
        self.dense_rows = 8 if dry_run else 64


# --- the report -------------------------------------------------------------------------------------


class Report:
    def __init__(self, out: Path, device: torch.device, budget_s: float, argv: list[str]):
        self.out, self.device = out, device
        self.start, self.budget_s = time.perf_counter(), budget_s
        self.section_end = budget_s
        self.gemlite_modes: tuple[str, str] | None = None
        self.records: list[dict] = []
        self.command = "python -m fqbench.bench.gpu_check " + " ".join(argv)
        out.mkdir(parents=True, exist_ok=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        """Seconds left in the current section's share of the budget."""
        return min(self.section_end, self.budget_s) - self.elapsed()

    def skip_if_late(self, seconds: float = 0.0) -> None:
        if self.left() < seconds:
            raise SkipMeasurement(f"time budget spent ({self.elapsed():.0f} s of {self.budget_s:.0f} s)")

    def say(self, message: str) -> None:
        print(f"[gpu_check {self.elapsed():6.1f}s] {message}", flush=True)

    def add(self, section: str, name: str, fn, **fields) -> dict:
        """Run ``fn() -> dict`` and record its fields, or the error; never raises."""
        record = {"section": section, "name": name, **fields}
        try:
            record.update(fn())
            record.setdefault("status", "ok")
        except SkipMeasurement as skip:
            record.update(status="skipped", error=str(skip))
        except Exception as error:  # noqa: BLE001  one failure must not lose the rest
            record.update(status="failed", error=f"{type(error).__name__}: {error}",
                          traceback=traceback.format_exc(limit=6))
            if self.device.type == "cuda":
                with contextlib.suppress(Exception):
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
        self.records.append(record)
        shown = {k: v for k, v in record.items() if k not in ("section", "name", "traceback")}
        self.say(f"{section} | {name} | {_short(shown)}")
        return record

    def save(self) -> None:
        env = next((r for r in self.records if r["section"] == "env"), {})
        _write_atomically(self.out / "gpu_check.json",
                          json.dumps({"command": self.command, "seconds": self.elapsed(), "records": self.records},
                                     indent=1, default=str))
        _write_atomically(self.out / "gpu_check.md", markdown(self.records, self.command, env, self.elapsed()))


class SkipMeasurement(Exception):
    """Not measurable here (no CUDA, no gemlite, no time left); recorded as skipped with the reason."""


def _short(fields: dict) -> str:
    parts = []
    for key, value in fields.items():
        if isinstance(value, float):
            value = f"{value:.3g}"
        parts.append(f"{key}={value}")
    return ", ".join(parts)[:400]


def _write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- shared builders ---------------------------------------------------------------------------------


def random_weights(n: int, k: int, bits: int, group_size: int, device, seed: int) -> QuantizedWeights:
    g = torch.Generator(device).manual_seed(seed)
    groups = k // group_size
    return QuantizedWeights(
        codes=torch.randint(0, 2**bits, (n, k), generator=g, device=device, dtype=torch.uint8),
        scale=(torch.rand(n, groups, generator=g, device=device) * 0.02 + 0.005).half(),
        zero=(torch.rand(n, groups, generator=g, device=device) * (2**bits - 1)).half(),
        bits=bits, group_size=group_size)


def gemlite_or_skip(device: torch.device):
    if device.type != "cuda":
        raise SkipMeasurement(f"gemlite needs CUDA (device {device})")
    from fqbench.kernels.gemlite_backend import BackendUnavailable, load_gemlite

    try:
        return load_gemlite()
    except BackendUnavailable as error:
        raise SkipMeasurement(str(error)) from error


def packed_matrix(weights: QuantizedWeights, backend: str, device, dtype, **options) -> nn.Module:
    if backend == "torch":
        return TorchPackedMatrix(weights, device=device, dtype=dtype)
    gemlite_or_skip(torch.device(device))
    from fqbench.kernels.gemlite_backend import GemliteMatrix

    return GemliteMatrix(weights, device=device, dtype=dtype, **options)


def transform(op: FrameOperator, kind: str, device, dtype):
    if kind == "fast":
        return FastTransform.from_operator(op, device, dtype)
    if torch.device(device).type != "cuda":
        raise SkipMeasurement("the fused Triton transform runs on CUDA only here")
    from fqbench.kernels.triton_transform import TritonTransform

    return TritonTransform.from_operator(op, device, dtype)


def framequant_layer(n: int, k: int, redundancy: float, transform_kind: str, backend: str, device, dtype,
                     seed: int, **options) -> TransformedMatrix:
    """A FrameQuant-style layer with random 2-bit codes (per-row grids) on the frame coefficients."""
    in_op = FrameOperator(k, redundancy, seed=seed)
    out_op = FrameOperator(n, redundancy, seed=seed + 1)
    weights = random_weights(out_op.num_coefficients, in_op.num_coefficients, 2, in_op.num_coefficients, device, seed)
    return TransformedMatrix(transform(in_op, transform_kind, device, dtype),
                             packed_matrix(weights, backend, device, dtype, **options),
                             transform(out_op, transform_kind, device, dtype))


# --- env ---------------------------------------------------------------------------------------------


def section_env(report: Report, sizes: Sizes, args) -> None:
    def versions():
        import transformers

        info = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__, "device": str(report.device), "dry_run": sizes.dry_run}
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError as error:
            info["triton"] = f"missing ({error})"
        if report.device.type == "cuda":
            props = torch.cuda.get_device_properties(report.device)
            info.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                        memory_gib=props.total_memory / 2**30, sms=props.multi_processor_count)
        return info

    report.add("env", "versions", versions)

    def gemlite_setup():
        gemlite = gemlite_or_skip(report.device)
        info = {"gemlite": gemlite.__version__, "path": os.path.dirname(gemlite.__file__),
                "autotune": f"checks: default configs; layers and model: GEMV {args.gemlite_autotune}, "
                            f"split-K and GEMM default configs"}
        if args.gemlite_config:
            info["loaded_config"] = str(args.gemlite_config)
            info["status"] = "ok" if gemlite.GemLiteLinear.load_config(str(args.gemlite_config)) else "failed"
        return info

    report.add("env", "gemlite", gemlite_setup)


def save_gemlite_configs(report: Report) -> None:
    """gemlite's autotuned configs so far, for ``--gemlite-config`` on a later run (no-op without gemlite)."""
    if report.device.type != "cuda" or "gemlite" not in sys.modules:
        return
    with contextlib.suppress(Exception):
        sys.modules["gemlite"].GemLiteLinear.cache_config(str(report.out / "gemlite_autotune.json"))


# --- checks -------------------------------------------------------------------------------------------


def _check(errors: dict) -> dict:
    worst = max(errors.values())
    return {**errors, "worst": worst, "limit": LIMIT, "status": "ok" if worst < LIMIT else "failed"}


def _matrix_checks(k: int, rows: list[int]) -> list[tuple]:
    """(backend, bits, group, rows, prefill modes): every bit width, per-row and grouped scales, both prefill
    paths where gemlite's GEMM is worth a compile (2-bit per row, and 4-bit group 128 which h100.json tunes)."""
    rows = sorted(rows)
    torch_checks = [("torch", 2, k, rows, ("dequant",)), ("torch", 3, k, rows, ("dequant",)),
                    ("torch", 4, 128, rows, ("dequant",)), ("torch", 8, k, rows, ("dequant",))]
    gemlite_checks = [("gemlite", 2, k, rows, ("dequant", "gemlite")), ("gemlite", 3, k, rows, ("dequant",)),
                      ("gemlite", 4, 128, rows, ("dequant", "gemlite")),
                      ("gemlite", 8, k, [rows[0], rows[-1]], ("dequant",))]
    return torch_checks + gemlite_checks


def section_checks(report: Report, sizes: Sizes, args) -> None:
    device, dtype = report.device, torch.float16 if report.device.type == "cuda" else torch.float32
    configure_gemlite(report, "default", "default")  # correctness only: no tuning compiles
    g = torch.Generator().manual_seed(0)
    for dim in sizes.transform_dims:
        for r in (1.0, 1.1):
            op = FrameOperator(dim, r, seed=dim)
            x = torch.randn(16, dim, generator=g, dtype=torch.float64)
            c = torch.randn(16, op.num_coefficients, generator=g, dtype=torch.float64)
            for kind in ("fast", "triton"):
                def run(op=op, x=x, c=c, kind=kind):
                    report.skip_if_late()
                    t = transform(op, kind, device, dtype)
                    errors = {"analysis": relative_error(t.analysis(x.to(device, dtype)).cpu(), op.analysis(x)),
                              "synthesis": relative_error(t.synthesis(c.to(device, dtype)).cpu(), op.synthesis(c))}
                    return {**_check(errors), "describe": t.describe()}

                report.add("checks", f"transform {kind} d={dim} r={r}", run)

    n, k = sizes.check_shape
    for backend, bits, group, rows_list, prefills in _matrix_checks(k, sizes.rows):
        def run(backend=backend, bits=bits, group=group, rows_list=rows_list, prefills=prefills):
            report.skip_if_late()
            w = random_weights(n, k, bits, group, device, seed=bits * 1000 + group)
            bias = torch.randn(n, device=device, generator=torch.Generator(device).manual_seed(1))
            w = QuantizedWeights(w.codes, w.scale, w.zero, bits, group, bias=bias)
            reference = w.dense(torch.float64)
            errors = {}
            for prefill in prefills:
                options = dict(prefill=prefill, dense_rows=sizes.dense_rows) if backend == "gemlite" else {}
                m = packed_matrix(w, backend, device, dtype, **options)
                for rows in rows_list:
                    if prefill == "gemlite" and rows <= sizes.dense_rows:
                        continue  # the same gemlite kernels as the dequant run
                    x = torch.randn(rows, k, device=device, generator=torch.Generator(device).manual_seed(rows))
                    expected = x.double() @ reference.T + bias.double()
                    errors[f"{prefill} rows={rows}"] = relative_error(m(x.to(dtype)), expected)
            return _check(errors)

        group_name = "row" if group == k else group
        report.add("checks", f"matrix {backend} {bits}-bit group={group_name}", run)

    def dequantizer():
        report.skip_if_late()
        gemlite_or_skip(device)
        from fqbench.kernels.gemlite_backend import GemliteMatrix
        from fqbench.kernels.packed_matrix import pack_over_k

        errors = {}
        for bits, group in ((2, k), (4, 128), (3, k), (8, k)):
            w = random_weights(n, k, bits, group, device, seed=bits)
            m = GemliteMatrix(w, device=device, dtype=dtype)
            if m.dequant_reason:
                raise AssertionError(m.dequant_reason)
            errors[f"{bits}-bit group {group}"] = relative_error(m.dequantize().T, w.dense())
            errors[f"{bits}-bit W_q differs from pack_over_k"] = float(
                not torch.equal(m.layer.W_q, pack_over_k(w.codes, m.kernel_bits)))
        return _check(errors)

    report.add("checks", "triton dequantizer vs reference, W_q layout", dequantizer)

    for r in (1.0, 1.1):
        for kind, backend in (("fast", "torch"), ("fast", "gemlite"), ("triton", "gemlite")):
            def run(r=r, kind=kind, backend=backend):
                report.skip_if_late()
                k_in, n_out = sizes.transform_dims
                layer = framequant_layer(n_out, k_in, r, kind, backend, device, dtype, seed=11)
                ref_in = FastTransform.from_operator(layer.in_transform.op, device, torch.float64)
                ref_out = FastTransform.from_operator(layer.out_transform.op, device, torch.float64)
                d_hat = layer.matrix.dequantize().double().T
                x = torch.randn(4, k_in, device=device, dtype=torch.float64,
                                generator=torch.Generator(device).manual_seed(2))
                expected = ref_out.synthesis(ref_in.analysis(x) @ d_hat.T)
                return _check({"layer": relative_error(layer(x.to(dtype)), expected)})

            report.add("checks", f"framequant layer r={r} {kind} transform, {backend}", run)

    def graphs_change_nothing():
        report.skip_if_late()
        if device.type != "cuda":
            raise SkipMeasurement("CUDA graphs need CUDA")
        from fqbench.bench.decode import build_llama, greedy_tokens

        model = build_llama("7b", torch.float16, device, layers=2)
        prompt = torch.randint(0, 32000, (2, 16), generator=torch.Generator().manual_seed(0)).to(device)
        graphed, was_graphed = greedy_tokens(model, prompt, 16, graphs="auto")
        eager, _ = greedy_tokens(model, prompt, 16, graphs=False)
        agree = float((graphed == eager).float().mean())
        return {"graphed": was_graphed, "tokens_agree": agree,
                "status": "ok" if was_graphed and agree == 1.0 else "failed"}

    report.add("checks", "decode: graphed tokens == eager tokens (7B shape, 2 blocks)", graphs_change_nothing)


# --- layers -------------------------------------------------------------------------------------------


def time_per_call_us(calls: list, x: torch.Tensor, device: torch.device, replays: int = 5) -> float:
    """Microseconds per call, ``calls`` (one per weight copy) run back to back: inside one CUDA graph on
    CUDA (launch overhead removed), eagerly on the CPU."""
    with torch.no_grad():
        for fn in calls:  # autotuning, lazily built tables: before any capture
            fn(x)
        if device.type != "cuda":
            start = time.perf_counter()
            for _ in range(replays):
                for fn in calls:
                    fn(x)
            return (time.perf_counter() - start) / (replays * len(calls)) * 1e6
        sequence = [calls[i % len(calls)] for i in range(max(len(calls), 8))]
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for fn in sequence:
                fn(x)
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for fn in sequence:
                fn(x)
        graph.replay()
        torch.cuda.synchronize(device)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize(device)
        return begin.elapsed_time(end) / (replays * len(sequence)) * 1e3


def _copies(device: torch.device, bytes_per_copy: int, rows: int) -> int:
    """Weight copies cycled per graph so that they stream from memory, not from L2, as in a model."""
    if device.type != "cuda":
        return 1
    if rows > 64:  # compute-bound: where the weights sit does not matter
        return 2
    return max(2, min(MAX_COPIES, math.ceil(L2_FLUSH_BYTES / max(bytes_per_copy, 1))))


def _layer_variants(rows: int, backend: str, dense_rows: int) -> list[tuple[str, dict]]:
    """(label, what to build) timed at this row count, most important first."""
    gemlite = backend == "gemlite"
    options = dict(dense_rows=dense_rows, prefill="dequant") if gemlite else {}
    variants = [(f"{backend} 2-bit", dict(bits=2, backend=backend, options=options)),
                (f"{backend} 4-bit", dict(bits=4, backend=backend, options=options))]
    if rows == 1:  # the same kernels as 4-bit: one row count shows the container costs nothing
        variants.append((f"{backend} 3-bit (4-bit containers)", dict(bits=3, backend=backend, options=options)))
    if gemlite and rows > dense_rows:
        variants.append(("gemlite 2-bit (its GEMM, default configs)",
                         dict(bits=2, backend=backend, options=dict(options, prefill="gemlite"))))
        variants.append(("torch 2-bit", dict(bits=2, backend="torch", options={})))
    frame_options = dict(dense_rows=dense_rows) if gemlite else {}
    for r in (1.0, 1.1):
        for kind in ("fast", "triton"):
            variants.append((f"framequant r={r} {kind}", dict(redundancy=r, kind=kind, options=frame_options)))
    return variants


def _layer(spec: dict, n: int, k: int, backend: str, device, dtype, seed: int) -> nn.Module:
    if "bits" in spec:
        weights = random_weights(n, k, spec["bits"], k, device, seed=seed)
        return packed_matrix(weights, spec["backend"], device, dtype, **spec["options"])
    return framequant_layer(n, k, spec["redundancy"], spec["kind"], backend, device, dtype, seed=100 + seed,
                            **spec["options"])


def section_layers(report: Report, sizes: Sizes, args) -> None:
    device = report.device
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    backend = "gemlite" if device.type == "cuda" else "torch"
    configure_gemlite(report, args.gemlite_autotune, "default")
    for rows in sizes.rows:  # every shape at batch 1 first: what matters most survives a short budget
        for n, k in sizes.layer_shapes:
            x = torch.randn(rows, k, device=device, dtype=dtype, generator=torch.Generator(device).manual_seed(rows))
            shape = dict(out_features=n, in_features=k, rows=rows)
            base = {}

            def dense():
                report.skip_if_late()
                weights = [torch.randn(n, k, device=device, dtype=dtype) * 0.02
                           for _ in range(_copies(device, n * k * 2, rows))]
                base["us"] = time_per_call_us([lambda x, w=w: F.linear(x, w) for w in weights], x, device)
                return {"us": base["us"], "vs_fp16": 1.0}

            report.add("layers", f"fp16 F.linear {n}x{k} rows={rows}", dense, variant="fp16", **shape)
            for label, spec in _layer_variants(rows, backend, sizes.dense_rows):
                def run(spec=spec):
                    report.skip_if_late(5)
                    if "bits" in spec:
                        stored_bytes = n * k * spec["bits"] // 8
                    else:
                        stored_bytes = int(n * k * spec["redundancy"] ** 2) // 4
                    modules = [_layer(spec, n, k, backend, device, dtype, seed=i)
                               for i in range(_copies(device, stored_bytes, rows))]
                    us = time_per_call_us(modules, x, device)
                    return {"us": us, "vs_fp16": base["us"] / us if base else float("nan"),
                            "describe": modules[0].describe()}

                report.add("layers", f"{label} {n}x{k} rows={rows}", run, variant=label, **shape)
            report.save()
        save_gemlite_configs(report)


def configure_gemlite(report: Report, decode: str, gemm: str) -> None:
    """gemlite's autotuning: ``decode`` for its GEMV kernels (batch 1), ``gemm`` for split-K and GEMM.
    Changing it reloads gemlite's kernel modules, which forgets the configs tuned so far (they stay in
    the saved file), so nothing happens when the modes are already these."""
    if report.device.type != "cuda" or report.gemlite_modes == (decode, gemm):
        return
    try:
        gemlite = gemlite_or_skip(report.device)
    except SkipMeasurement:
        return
    gemlite.set_autotune({"GEMV": decode, "GEMV_REVSPLITK": decode, "GEMV_SPLITK": gemm,
                          "GEMM_SPLITK": gemm, "GEMM": gemm})
    report.gemlite_modes = (decode, gemm)
    report.say(f"gemlite autotune: GEMV {decode}, split-K and GEMM {gemm}")


# --- model --------------------------------------------------------------------------------------------

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _replace_linears(model: nn.Module, build) -> dict:
    """Every block linear becomes ``build(linear, index) -> (module, honest bytes)``; the sizes."""
    resident, honest = 0, 0.0
    for b, block in enumerate(model.model.layers):
        for j, name in enumerate(LINEARS):
            owner_name, _, attr = name.rpartition(".")
            owner = block.get_submodule(owner_name)
            module, honest_bytes = build(getattr(owner, attr), b * len(LINEARS) + j)
            setattr(owner, attr, module)
            resident += module.resident_bytes()
            honest += honest_bytes
    return {"resident_bytes": resident, "honest_bytes": honest, **_allocated(model)}


def _allocated(model: nn.Module) -> dict:
    """On CUDA, what is allocated with the model alone, minus the tensors outside the block linears: the
    linears' measured footprint (shared transform tables, caches and cuBLAS workspace included)."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return {}
    gc.collect()
    torch.cuda.synchronize(device)
    inside = {id(p) for block in model.model.layers for n in LINEARS for p in block.get_submodule(n).parameters()}
    outside = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in inside)
    return {"allocated_linear_bytes": torch.cuda.memory_allocated(device) - outside}


def section_model(report: Report, sizes: Sizes, args) -> None:
    from fqbench.bench.decode import build_llama, time_decode, time_prefill

    device = report.device
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    backend = "gemlite" if device.type == "cuda" else "torch"
    configure_gemlite(report, args.gemlite_autotune, "default")
    state, baseline = {}, {}

    def build():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        model = build_llama(**sizes.model, dtype=dtype, device=device)
        state["model"] = model
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        info = {"parameter_mib": params / 2**20}
        if device.type == "cuda":
            info["build_peak_vs_parameters"] = torch.cuda.max_memory_allocated(device) / params
        return info

    report.add("model", f"build {sizes.model['shape']} in {dtype}", build)
    if "model" not in state:
        return

    def measure(variant: str, sizes_of_linears: dict):
        model = state["model"]
        memory = {"weight_mib": sizes_of_linears["resident_bytes"] / 2**20,
                  "weight_vs_honest_bits": sizes_of_linears["resident_bytes"] / sizes_of_linears["honest_bytes"]}
        if "allocated_linear_bytes" in sizes_of_linears:
            memory["allocated_vs_honest_bits"] = (sizes_of_linears["allocated_linear_bytes"]
                                                  / sizes_of_linears["honest_bytes"])
        runs = [(f"decode batch={b}", ("decode", b), lambda b=b: time_decode(
            model, batch=b, new_tokens=sizes.decode_tokens, rounds=sizes.rounds, graphs="auto"))
            for b in sizes.decode_batches]
        runs.insert(1, (f"prefill 1x{sizes.prefill}", ("prefill", 1), lambda: time_prefill(
            model, batch=1, length=sizes.prefill, rounds=sizes.rounds, graphs=False)))  # before batch 16
        for label, key, timed in runs:
            def run(key=key, timed=timed):
                report.skip_if_late(5)
                t = timed()
                if variant.startswith("dense"):
                    baseline[key] = t.tokens_per_s
                return {**t.as_dict(), "vs_fp16": t.tokens_per_s / baseline.get(key, float("nan")), **memory}

            report.add("model", f"{variant} {label}", run, variant=variant, batch=key[1])
        report.save()

    def dense_sizes():
        linear = sum(block.get_submodule(n).weight.numel() * block.get_submodule(n).weight.element_size()
                     for block in state["model"].model.layers for n in LINEARS)
        return {"resident_bytes": linear, "honest_bytes": linear, **_allocated(state["model"])}

    measure(f"dense {str(dtype).removeprefix('torch.')}", dense_sizes())

    def quantized(variant, make):
        def replace():
            report.skip_if_late(30)
            return _replace_linears(state["model"], make)

        result = report.add("model", f"{variant}: replace the linears", replace)
        if result["status"] == "ok":
            measure(variant, result)
        save_gemlite_configs(report)

    def packed_2bit(linear, i):
        w = random_weights(linear.out_features, linear.in_features, 2, linear.in_features, device, seed=i)
        options = dict(dense_rows=sizes.dense_rows) if backend == "gemlite" else {}
        return packed_matrix(w, backend, device, dtype, **options), w.honest_bytes()

    quantized(f"{backend} 2-bit", packed_2bit)
    kinds = [(1.0, "fast"), (1.1, "fast")] + ([(1.0, "triton")] if device.type == "cuda" else [])
    for r, kind in kinds:
        def frame_layer(linear, i, r=r, kind=kind):
            options = dict(dense_rows=sizes.dense_rows) if backend == "gemlite" else {}
            layer = framequant_layer(linear.out_features, linear.in_features, r, kind, backend, device, dtype,
                                     seed=1000 * i, **options)
            rows, cols = layer.matrix.out_features, layer.matrix.in_features
            return layer, rows * cols * 2 / 8 + 4 * rows  # 2-bit codes, fp16 scale and zero per row

        quantized(f"framequant r={r} {kind} transforms, {backend} 2-bit", frame_layer)


# --- pytest -------------------------------------------------------------------------------------------


def section_pytest(report: Report, sizes: Sizes, args) -> None:
    def run():
        if sizes.dry_run or report.device.type != "cuda":
            raise SkipMeasurement("the GPU tests need CUDA")
        report.skip_if_late(30)
        root = Path(__file__).resolve().parents[2]
        tests = [str(root / "tests" / name) for name in ("test_fast_transform.py", "test_kernel_backends.py")]
        try:
            done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-k", "gpu", *tests], cwd=root,
                                  capture_output=True, text=True, timeout=max(30.0, report.left()))
        except subprocess.TimeoutExpired as error:
            raise SkipMeasurement(f"the GPU tests did not finish in the {error.timeout:.0f} s left") from error
        tail = done.stdout.strip().splitlines()[-1:] or [""]
        return {"returncode": done.returncode, "summary": tail[0],
                "status": "ok" if done.returncode == 0 else "failed", "output_tail": done.stdout[-3000:]}

    report.add("pytest", "GPU tests", run)


# --- markdown -----------------------------------------------------------------------------------------


def markdown(records: list[dict], command: str, env: dict, seconds: float) -> str:
    versions = ", ".join(f"{name} {env[name]}" for name in ("torch", "triton", "transformers") if name in env)
    lines = [f"# GPU kernel check ({env.get('gpu', env.get('device', 'environment not recorded'))})", "",
             f"`{command}` - {seconds:.0f} s" + (f"; {versions}" if versions else ""), ""]
    checks = [r for r in records if r["section"] == "checks"]
    if checks:
        lines += ["## Checks (relative error vs float64 references, limit 2e-3)", "",
                  "| check | status | worst | detail |", "|---|---|---|---|"]
        for r in checks:
            worst = f"{r['worst']:.2e}" if "worst" in r else ""
            lines.append(f"| {r['name']} | {r['status']} | {worst} | {r.get('error', '')[:160]} |")
        lines.append("")
    layers = [r for r in records if r["section"] == "layers" and "rows" in r]
    if layers:
        lines += ["## Layers (us per call: inside a CUDA graph on CUDA, eager on the CPU; "
                  "vs FP16 = FP16 time / time)", "",
                  "| shape (out x in) | rows | variant | us | vs FP16 | status |", "|---|---|---|---|---|---|"]
        for r in layers:
            us = f"{r['us']:.1f}" if "us" in r else ""
            ratio = f"{r['vs_fp16']:.2f}" if "vs_fp16" in r else ""
            status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('error', '')[:120]}"
            lines.append(f"| {r['out_features']}x{r['in_features']} | {r['rows']} | {r['variant']} | {us} | {ratio} "
                         f"| {status} |")
        lines.append("")
    model = [r for r in records if r["section"] == "model"]
    if model:
        lines += ["## Model (random weights; vs dense: tokens/s over the dense model's in the same run)", "",
                  "| run | tokens/s | vs dense | graphs | peak MiB | linear weights MiB | vs honest bits "
                  "| allocated vs honest bits | status |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in model:
            cell = lambda key, fmt: format(r[key], fmt) if isinstance(r.get(key), (int, float)) else ""  # noqa: E731
            peak = f"{r['peak_bytes'] / 2**20:.0f}" if isinstance(r.get("peak_bytes"), int) else ""
            status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('error', '')[:120]}"
            note = f" ({r['note'][:80]})" if r.get("note") else ""
            lines.append(f"| {r['name']} | {cell('tokens_per_s', '.1f')} | {cell('vs_fp16', '.2f')} "
                         f"| {r.get('graphs', '')}{note} | {peak} | {cell('weight_mib', '.1f')} "
                         f"| {cell('weight_vs_honest_bits', '.3f')} | {cell('allocated_vs_honest_bits', '.3f')} "
                         f"| {status} |")
        lines.append("")
    other = [r for r in records if r["section"] in ("env", "pytest")]
    hidden = ("section", "name", "traceback", "output_tail")
    lines += ["## Environment and tests", ""]
    lines += [f"- {r['name']}: {_short({k: v for k, v in r.items() if k not in hidden})}" for r in other]
    return "\n".join(lines) + "\n"


# --- main ---------------------------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m fqbench.bench.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes: exercises every path in seconds")
    parser.add_argument("--budget-s", type=float, default=270.0,
                        help="total time; each section gets a share, measurements past it are skipped")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--gemlite-autotune", choices=("fast", "default", "max"), default="fast",
                        help="gemlite's autotuning of its batch-1 GEMV kernels in the layers and model sections")
    parser.add_argument("--gemlite-config", type=Path, help="a gemlite_autotune.json saved by an earlier run")
    args = parser.parse_args(argv)
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    return args


def main(argv=None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    sizes = Sizes(args.dry_run)
    report = Report(args.out, device, args.budget_s, argv)
    runners = {"env": section_env, "checks": section_checks, "layers": section_layers, "model": section_model,
               "pytest": section_pytest}
    chosen = args.sections.split(",")
    shares = {name: SHARES.get(name, 0.0) for name in chosen}
    for name in chosen:
        # Each section may use its share plus whatever earlier sections left over.
        later = sum(shares[n] for n in chosen[chosen.index(name) + 1:])
        report.section_end = args.budget_s * (1 - later / max(sum(shares.values()), 1e-9)) if later else args.budget_s
        report.say(f"section {name} (until {report.section_end:.0f} s)")
        report.add(name, "section", lambda name=name: runners[name](report, sizes, args) or {})
        report.save()
    save_gemlite_configs(report)
    failed = [r["name"] for r in report.records if r["status"] == "failed"]
    report.say(f"done: {len(report.records)} records, {len(failed)} failed{': ' if failed else ''}"
               f"{'; '.join(failed)[:500]}; {args.out / 'gpu_check.md'}")
    return report.records


if __name__ == "__main__":
    main()
