"""Layer-level benchmark: proxy error on held-out activations and time, as ratios to GPTQ.

    python -m fqbench.bench layers --shapes 768x768,3072x768,4096x4096 --bits 2

Every method quantizes the same synthetic LLM-like layer (heavy-tailed weights,
correlated activations with a few outlier channels) in one process; the table
reports each method's held-out relative output error and seconds, and both as
ratios to our GPTQ on the same layer. ``gptq_reference`` is a straightforward
implementation of the published algorithm, timed for comparison.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass

import torch

from fqbench.bench.gptq_reference import reference_gptq
from fqbench.methods import build_method

DEFAULT_METHODS = [
    ("rtn", {}),
    ("gptq", {}),
    ("gptq", {"scale_dtype": "float32"}),
    ("gptq_reference", {}),
    ("gptq_clip", {}),
    ("quip", {}),
    ("quip_clip", {}),
    ("framequant", {"redundancy": 1.0}),
    ("framequant", {"redundancy": 1.1}),
    ("framequant", {"redundancy": 1.1, "redundancy_sides": "input"}),
]


@dataclass
class Row:
    shape: str
    method: str
    proxy_error: float
    seconds: float
    bits_per_weight: float
    error_vs_gptq: float = float("nan")
    time_vs_gptq: float = float("nan")


def llm_like_layer(out_features: int, in_features: int, samples: int, seed: int = 0, device="cpu"):
    """Heavy-tailed weights and correlated, outlier-channel activations; returns (W, H, X_test)."""
    g = torch.Generator().manual_seed(seed)
    chi2 = torch.randn(3, out_features, in_features, generator=g).square().sum(0)
    W = torch.randn(out_features, in_features, generator=g) / (chi2 / 3).sqrt() * 0.02
    rank = 64
    basis = torch.randn(rank, in_features, generator=g) * 0.5
    channel_scale = torch.ones(in_features)
    channel_scale[torch.randperm(in_features, generator=g)[: max(1, in_features // 256)]] = 10.0

    def activations(n):
        X = torch.randn(n, in_features, generator=g) + torch.randn(n, rank, generator=g) @ basis
        return X * channel_scale

    X_cal = activations(samples).to(device, torch.float64)
    H = 2.0 / samples * X_cal.T @ X_cal
    return W.to(device), H, activations(max(256, samples // 4)).to(device)


def held_out_error(W, W_hat, X):
    ref = X @ W.T
    return float((X @ W_hat.T - ref).square().sum() / ref.square().sum())


def _timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def bench_layer(out_features, in_features, bits, methods, samples, device, repeats, warmup=1):
    W, H, X = llm_like_layer(out_features, in_features, samples, device=device)
    shape = f"{out_features}x{in_features}"
    rows = []
    for name, options in methods:
        label = name + "".join(f" {k}={v}" for k, v in options.items())
        best = float("inf")
        for attempt in range(warmup + repeats):
            if name == "gptq_reference":
                W_hat, seconds = _timed(lambda: reference_gptq(W, H, bits))
                bits_per_weight = float("nan")
            else:
                method = build_method(name, bits=bits, **options)
                layer, seconds = _timed(lambda: method.quantize(W, H))
                W_hat, bits_per_weight = layer.weight(), layer.bits_per_weight
            if attempt >= warmup:  # warm-up calls pay one-time costs (kernel loading, allocator growth)
                best = min(best, seconds)
        rows.append(Row(shape, label, held_out_error(W, W_hat, X), best, bits_per_weight))
    gptq = next(r for r in rows if r.method == "gptq")
    for r in rows:
        r.error_vs_gptq = r.proxy_error / gptq.proxy_error
        r.time_vs_gptq = r.seconds / gptq.seconds
    return rows


def format_table(rows) -> str:
    lines = [
        "| layer | method | held-out error | error / GPTQ | seconds | time / GPTQ | bits/weight |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.shape} | {r.method} | {r.proxy_error:.4g} | {r.error_vs_gptq:.3f} | {r.seconds:.2f} "
            f"| {r.time_vs_gptq:.2f} | {r.bits_per_weight:.3f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fqbench.bench layers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="768x768,3072x768,4096x4096",
                        help="comma-separated OUTxIN layer shapes (add 11008x4096 on a GPU)")
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--samples", type=int, default=0, help="calibration tokens (default: 2 x in_features)")
    parser.add_argument("--repeats", type=int, default=3, help="time each method this many times, keep the best")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls of each method before timing")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)

    all_rows = []
    for shape in args.shapes.split(","):
        out_features, in_features = (int(v) for v in shape.lower().split("x"))
        samples = args.samples or 2 * in_features
        rows = bench_layer(out_features, in_features, args.bits, DEFAULT_METHODS, samples, args.device, args.repeats,
                           args.warmup)
        print(format_table(rows), flush=True)
        all_rows += rows
    print(f"\ndevice: {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, bits {args.bits}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in all_rows], f, indent=1)
    return all_rows
