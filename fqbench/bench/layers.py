"""Layer-level benchmark: proxy error on held-out activations and time, as ratios to GPTQ.

    python -m fqbench.bench layers --shapes 768x768,3072x768,4096x4096 --bits 2
    python -m fqbench.bench layers --model DIR --bits 2     # every linear of a pretrained causal LM
    python -m fqbench.bench layers --model DIR --bits 4 --methods gptq framequant:clip_sigma=auto

Every method quantizes the same synthetic LLM-like layer (heavy-tailed weights,
correlated activations with a few outlier channels) in one process; the table
reports each method's held-out relative output error and seconds, and both as
ratios to our GPTQ on the same layer. ``gptq_reference`` is a straightforward
implementation of the published algorithm, timed for comparison.

With ``--model``, the layers are the linears of a pretrained causal LM (e.g. the llama2.c
stories260K), their Hessians from the full-precision model's inputs on text it samples
(calibration seed), the error on inputs from other samples (held-out seed); the table
summarises every method over all layers (geometric mean of the per-layer error ratios).
``--methods`` replaces the default methods (``name:option=value,...`` as in ``lm_samples``; GPTQ,
the baseline of the ratios, is always run).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass

import torch

from fqbench.bench.gptq_reference import reference_gptq
from fqbench.bench.lm_samples import parse_method
from fqbench.methods import build_method
from fqbench.records import write_json

DEFAULT_METHODS = [
    ("rtn", {}),
    ("gptq", {}),
    ("gptq", {"scale_dtype": "float32"}),
    ("gptq_reference", {}),
    ("gptq_clip", {}),
    ("quip", {}),
    ("quip_clip", {}),
    ("quip_sharp", {}),
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


def pretrained_layers(model_dir: str, calib: int, held_out: int, seqlen: int, seed: int = 0):
    """``[(name, W, H, X_test)]`` for every linear in the blocks of a pretrained causal LM: ``H`` from the inputs of
    ``calib`` windows it samples (seed ``seed``), ``X_test`` the inputs of ``held_out`` others (seed ``seed + 1``)."""
    from fqbench.bench.lm_samples import sample
    from fqbench.models.hf import load_causal_lm

    model, tokenizer, adapter = load_causal_lm(model_dir)
    linears = {f"{block.name}.{name}": module for block in adapter.blocks(model)
               for name, module in block.module.named_modules() if isinstance(module, torch.nn.Linear)}

    def inputs(tokens) -> dict[str, torch.Tensor]:
        seen = {name: [] for name in linears}
        hooks = [module.register_forward_hook(lambda m, args, out, name=name: seen[name].append(
            args[0].detach().reshape(-1, args[0].shape[-1]).double())) for name, module in linears.items()]
        with torch.no_grad():
            for window in tokens.split(1):
                model(window)
        for hook in hooks:
            hook.remove()
        return {name: torch.cat(rows) for name, rows in seen.items()}

    calibration = inputs(sample(model, tokenizer, calib, seqlen, seed=seed))
    evaluation = inputs(sample(model, tokenizer, held_out, seqlen, seed=seed + 1))
    return [(name, module.weight.detach().float(), 2.0 / len(calibration[name]) * calibration[name].T @ calibration[name],
             evaluation[name].float()) for name, module in linears.items()]


def bench_layer(W, H, X, shape: str, bits, methods, device, repeats, warmup=1):
    """Every method on one layer (``W``, its Hessian ``H``, held-out inputs ``X``), ratios to GPTQ."""
    W, H, X = W.to(device), H.to(device), X.to(device)
    rows = []
    for name, options in methods:
        label = name + "".join(f" {k}={v}" for k, v in options.items())
        best = float("inf")
        method = None if name == "gptq_reference" else build_method(name, bits=bits, **options)
        for attempt in range(warmup + repeats):
            if method is None:
                W_hat, seconds = _timed(lambda: reference_gptq(W, H, bits))
                bits_per_weight = float("nan")
            else:
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


def summarize(rows) -> list[Row]:
    """One row per method over all layers: mean error, geometric-mean error ratio, total time ratio, honest bits
    weighted by the layers' sizes."""
    by_method: dict[str, list[Row]] = {}
    for r in rows:
        by_method.setdefault(r.method, []).append(r)
    summary = []
    for method, layer_rows in by_method.items():
        sizes = torch.tensor([_size(r.shape) for r in layer_rows], dtype=torch.float64)
        ratios = torch.tensor([r.error_vs_gptq for r in layer_rows], dtype=torch.float64)
        seconds = sum(r.seconds for r in layer_rows)
        gptq_seconds = sum(r.seconds for r in by_method["gptq"])
        bits = torch.tensor([r.bits_per_weight for r in layer_rows], dtype=torch.float64)
        summary.append(Row(f"{len(layer_rows)} layers", method,
                           sum(r.proxy_error for r in layer_rows) / len(layer_rows), seconds,
                           float((bits * sizes).sum() / sizes.sum()), float(ratios.log().mean().exp()),
                           seconds / gptq_seconds))
    return summary


def _size(shape: str) -> int:
    out_features, in_features = (int(v) for v in shape.split(" ")[-1].lower().split("x"))
    return out_features * in_features


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
    parser.add_argument("--model", help="a pretrained causal-LM directory: bench every linear of its blocks instead")
    parser.add_argument("--calib", type=int, default=32, help="--model: calibration windows the model samples")
    parser.add_argument("--eval", type=int, default=16, help="--model: held-out windows")
    parser.add_argument("--seqlen", type=int, default=256, help="--model: tokens per window")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--methods", nargs="+", help="name:option=value,... per method (default: the built-in list)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = DEFAULT_METHODS
    if args.methods:
        methods = [parse_method(spec) for spec in args.methods]
        methods = [m for m in methods if m != ("gptq", {})]
        methods.insert(0, ("gptq", {}))

    all_rows = []
    if args.model:
        for name, W, H, X in pretrained_layers(args.model, args.calib, args.eval, args.seqlen):
            all_rows += bench_layer(W, H, X, f"{name} {W.shape[0]}x{W.shape[1]}", args.bits, methods,
                                    args.device, args.repeats, args.warmup)
        print(format_table(summarize(all_rows)), flush=True)
    else:
        for shape in args.shapes.split(","):
            out_features, in_features = (int(v) for v in shape.lower().split("x"))
            W, H, X = llm_like_layer(out_features, in_features, args.samples or 2 * in_features)
            rows = bench_layer(W, H, X, shape, args.bits, methods, args.device, args.repeats, args.warmup)
            print(format_table(rows), flush=True)
            all_rows += rows
    print(f"\ndevice: {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, bits {args.bits}")
    if args.json:
        write_json(args.json, [asdict(r) for r in all_rows])
    return all_rows
