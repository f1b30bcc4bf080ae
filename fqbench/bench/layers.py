"""Layer-level benchmark: proxy error on held-out activations and time, as ratios to GPTQ.

    python -m fqbench.bench layers --shapes 768x768,3072x768,4096x4096 --bits 2
    python -m fqbench.bench layers --model DIR --bits 3 [--methods gptq framequant:clip_sigma=auto ...]

Every method quantizes the same synthetic LLM-like layer (heavy-tailed weights,
correlated activations with a few outlier channels) in one process; the table
reports each method's held-out relative output error and seconds, and both as
ratios to our GPTQ on the same layer. ``gptq_reference`` is a straightforward
implementation of the published algorithm, timed for comparison.

With ``--model`` the layers are every linear of a pretrained causal LM's blocks
instead, with calibration and held-out Hessians from text the full-precision
model samples (as ``lm_samples`` does; full-precision inputs at every layer);
the table summarises each method over the layers: the geometric mean of its
held-out error over GPTQ's, how many layers it is at or below GPTQ, the worst
layer, and its total time over GPTQ's.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass

import torch

from fqbench.bench.gptq_reference import reference_gptq
from fqbench.methods import build_method
from fqbench.quant.checks import proxy_error
from fqbench.records import write_json

DEFAULT_METHODS = [
    ("rtn", {}),
    ("gptq", {}),
    ("gptq", {"scale_dtype": "float32"}),
    ("gptq_reference", {}),
    ("gptq_clip", {}),
    ("quip", {}),
    ("quip_clip", {}),
    ("framequant", {"redundancy": 1.0}),
    ("framequant", {"redundancy": 1.0, "clip_sigma": "auto"}),
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


PRETRAINED_METHODS = ["gptq", "framequant", "framequant:clip_sigma=null", "framequant:clip_sigma=auto",
                      "framequant:clip_sigma=auto,grid_fit=mse"]


def pretrained_layers(source: str, calibration: int, evaluation: int, seqlen: int, seed: int):
    """``{name: (W, H_calibration, H_held_out)}`` for every linear of a causal LM's blocks, on sampled text."""
    from fqbench.bench.lm_samples import sample
    from fqbench.engine import accumulate_hessians, capture_block_inputs, enter_block, run_block
    from fqbench.models.hf import load_causal_lm

    model, tokenizer, adapter = load_causal_lm(source)
    blocks = adapter.blocks(model)
    layers = {}
    for index, count in enumerate((calibration, evaluation)):
        windows = sample(model, tokenizer, count, seqlen, seed=seed + index)
        inputs = capture_block_inputs(model, blocks, windows.split(1), lambda m, s: adapter.run(m, s, "cpu"), "cpu")
        for position, block in enumerate(blocks):
            block, block_inputs, _ = enter_block(block, position, inputs, "cpu", adapter.block_kwargs)
            for group in block.groups:
                for name, H in accumulate_hessians(block.module, group, block_inputs).items():
                    W = block.module.get_submodule(name).weight.data.float()
                    layers.setdefault(f"{block.name}.{name}", [W])[1 + index:] = [H]
            inputs = inputs.replace_hidden(run_block(block.module, block_inputs))
    return {name: tuple(value) for name, value in layers.items()}


def bench_pretrained(layers: dict, bits: int, specs: list[str], seed: int = 0) -> list[dict]:
    """Every method on every layer: held-out error and seconds, with their ratios to GPTQ's on that layer."""
    from fqbench.bench.lm_samples import parse_method
    from fqbench.seeding import derive_seed

    rows = []
    for layer_name, (W, H, H_held_out) in layers.items():
        gptq = None
        for spec in ["gptq", *(s for s in specs if s != "gptq")]:
            name, options = parse_method(spec)
            method = build_method(name, **{"bits": bits, **options})
            layer, seconds = _timed(lambda: method.quantize(W, H, seed=derive_seed(seed, layer_name)))
            row = {"layer": layer_name, "method": spec, "held_out_error": proxy_error(W, layer.weight(), H_held_out),
                   "seconds": seconds, "bits_per_weight": layer.bits_per_weight, "weights": W.numel(),
                   "clip_sigma": layer.info.get("clip_sigma")}
            gptq = gptq or row
            row["error_vs_gptq"] = row["held_out_error"] / gptq["held_out_error"]
            rows.append(row)
    return rows


def format_summary(rows: list[dict], specs: list[str]) -> str:
    import math

    lines = ["| method | error / GPTQ (geometric mean) | layers at or below GPTQ | worst layer / GPTQ "
             "| time / GPTQ | bits/weight |", "|---|---|---|---|---|---|"]
    gptq_seconds = sum(r["seconds"] for r in rows if r["method"] == "gptq")
    for spec in ["gptq", *(s for s in specs if s != "gptq")]:
        mine = [r for r in rows if r["method"] == spec]
        ratios = [r["error_vs_gptq"] for r in mine]
        bits = sum(r["bits_per_weight"] * r["weights"] for r in mine) / sum(r["weights"] for r in mine)
        lines.append(f"| {spec} | {math.exp(sum(map(math.log, ratios)) / len(ratios)):.3f} "
                     f"| {sum(ratio <= 1 for ratio in ratios)} of {len(ratios)} | {max(ratios):.3f} "
                     f"| {sum(r['seconds'] for r in mine) / gptq_seconds:.2f} | {bits:.3f} |")
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
    parser.add_argument("--model", help="a causal-LM directory: its pretrained layers instead of synthetic ones")
    parser.add_argument("--methods", nargs="+", default=PRETRAINED_METHODS,
                        help="with --model: name:option=value,... per method (GPTQ is always the baseline)")
    parser.add_argument("--calib", type=int, default=128, help="with --model: calibration windows")
    parser.add_argument("--eval", type=int, default=64, help="with --model: held-out windows")
    parser.add_argument("--seqlen", type=int, default=256, help="with --model: tokens per window")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.model:
        layers = pretrained_layers(args.model, args.calib, args.eval, args.seqlen, args.seed)
        rows = bench_pretrained(layers, args.bits, args.methods, args.seed)
        print(f"{args.model}: {len(layers)} layers, {args.bits} bits, {args.calib} calibration and {args.eval} "
              f"held-out windows of {args.seqlen} sampled tokens")
        print(format_summary(rows, args.methods))
        if args.json:
            write_json(args.json, rows)
        return rows

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
        write_json(args.json, [asdict(r) for r in all_rows])
    return all_rows
