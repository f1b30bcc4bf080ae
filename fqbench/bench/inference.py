"""Inference with packed weights (paper Table 7): tokens/s and memory of a Llama-shaped model.

    python -m fqbench.bench inference [--hidden 2048 --intermediate 5504 --layers 4 --vocab 32000]
                                      [--bits 2] [--decode-tokens 16] [--prefill 1x128] [--rounds 3]

One randomly initialized Llama-shaped model, run in one process as: dense FP32,
dense FP16, packed GPTQ, and packed FrameQuant at r = 1.0 and r = 1.1 (both sides
redundant). Packed variants replace every linear of the blocks by a
``QuantLinear`` whose weight keeps its codes packed (``fqbench.quantized``); embeddings, norms
and the LM head stay as in the FP32 model and are shared, not copied.

Measured per variant, in interleaved rounds (medians): batch-1 decode tokens/s
(after a 16-token prompt, with the KV cache) and prefill tokens/s for a batch of
prompts; the weight memory of the quantized linears (every tensor the variant
keeps alive: packed buffers, biases, regenerated rotation and frame parameters),
against what their honest bits per weight predict; and the peak memory of a decode
step and of a prefill (weights + the largest transient allocation, from the torch
profiler on the CPU, ``max_memory_allocated`` on a GPU). Ratios are against packed
GPTQ and dense FP16 from the same run.

The codes are round-to-nearest on each method's grid (GPTQ's min-max grid in weight
space; FrameQuant's 2-sigma grid in frame space): speed and size depend on the
format, not on how the codes were chosen. ``--quantizer solver`` runs the real
methods (with an identity Hessian) instead, much slower.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import fqbench.methods  # noqa: F401  (registers the methods)
from fqbench.frames.operator import FrameOperator
from fqbench.methods import build_method
from fqbench.kernels.lut import plane_tables
from fqbench.packing import checkpoint_sizes, save_quantized
from fqbench.quant.grids import GridSpec, clip_rows
from fqbench.quant.quantizer import GridQuantizer, round_to_nearest
from fqbench.quantized import GridWeight, QuantLinear, TransformedWeight
from fqbench.seeding import derive_seed

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
PROMPT_TOKENS = 16


@dataclass
class Variant:
    name: str
    model: nn.Module
    bits_per_weight: float = float("nan")  # honest, over the quantized linears
    weight_bytes: int = 0  # memory the variant's quantized (or dense) linears keep alive
    other_bytes: int = 0  # embeddings, norms, LM head
    predicted_bytes: float = float("nan")  # bits_per_weight x weights / 8
    decode: list = field(default_factory=list)  # seconds per decode run
    prefill: list = field(default_factory=list)
    peak_decode_bytes: int = 0
    peak_prefill_bytes: int = 0
    sizes: dict = field(default_factory=dict)  # fqbench.packing.checkpoint_sizes of the saved variant


# --- building the variants ----------------------------------------------------------------


def llama_model(args) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads or args.heads, max_position_embeddings=4096)
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(config).eval()


def rtn_grid(W: torch.Tensor, spec: GridSpec) -> GridWeight:
    """Round-to-nearest on ``spec`` (one grid per row): the packed format of a GPTQ/FrameQuant layer."""
    return round_to_nearest(W.float(), GridQuantizer(spec))


def quantized_layer(W: torch.Tensor, method: str, bits: int, redundancy: float, seed: int, quantizer: str):
    if quantizer == "solver":
        options = {"bits": bits} if method == "gptq" else {"bits": bits, "redundancy": redundancy, "seed": seed}
        H = torch.eye(W.shape[1], dtype=torch.float64)
        return build_method(method, **options).quantize(W, H)
    if method == "gptq":
        layer = rtn_grid(W, GridSpec(bits, "minmax"))
    else:
        in_op = FrameOperator(W.shape[1], redundancy, 8, "auto", derive_seed(seed, "in"))
        out_op = FrameOperator(W.shape[0], redundancy, 8, "auto", derive_seed(seed, "out"))
        D = out_op.analysis(in_op.analysis(W.float()).T).T
        layer = TransformedWeight(rtn_grid(clip_rows(D, 2.0), GridSpec(bits, "sigma", clip_sigma=2.0)), in_op, out_op)
    layer.method = method
    layer.nominal_bits = bits * (redundancy if method == "framequant" else 1)
    return layer


def live_tensor_bytes() -> int:
    """Bytes of every distinct tensor storage alive in this process (CPU), found through the GC."""
    gc.collect()
    seen, total = set(), 0
    with warnings.catch_warnings():  # isinstance() on deprecated module attributes warns
        warnings.simplefilter("ignore")
        objects = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for obj in objects:
        if not obj.is_meta and obj.device.type == "cpu":
            storage = obj.untyped_storage()
            if storage.data_ptr() not in seen and storage.nbytes():
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def memory_in_use(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else live_tensor_bytes()


def packed_variant(base: nn.Module, name: str, method: str, args, redundancy: float, device) -> Variant:
    """A copy of ``base`` sharing everything but the blocks' linears, which become packed modules."""
    before = memory_in_use(device)
    layers = {}
    for i, block in enumerate(base.model.layers):
        for linear_name in LINEARS:
            full_name = f"model.layers.{i}.{linear_name}"
            layers[full_name] = quantized_layer(block.get_submodule(linear_name).weight.data, method, args.bits,
                                                redundancy, derive_seed(args.seed, full_name), args.quantizer)
    sizes = saved_sizes(base, layers, method) if args.sizes else {}
    model = copy.deepcopy(base, memo={id(t): t for t in [*base.parameters(), *base.buffers()]})
    weights = sum(layer.out_features * layer.in_features for layer in layers.values())
    honest_bits = sum(layer.bits_per_weight * layer.out_features * layer.in_features for layer in layers.values())
    _replace_with_packed(model, layers, device)
    del layers  # the unpacked codes: only the packed modules stay
    model.to(device)
    _warm_up(model, device)  # regenerated transforms are cast to the device on first use
    variant = Variant(name, model, honest_bits / weights, sizes=sizes)
    variant.weight_bytes = memory_in_use(device) - before
    variant.predicted_bytes = honest_bits / 8
    return variant


def _replace_with_packed(model: nn.Module, layers: dict, device) -> None:
    for full_name, layer in layers.items():
        owner, _, attr = full_name.rpartition(".")
        packed = QuantLinear(layer.with_layout("packed"), model.get_submodule(full_name).bias)
        setattr(model.get_submodule(owner), attr, packed.to(device))


def saved_sizes(base: nn.Module, layers: dict, method: str) -> dict:
    """Paper Table 6: the fake-quantized model saved packed (a temporary directory), with what stays in full
    precision (embeddings, norms, LM head) in FP16 as a deployed model would; sizes read from the files."""
    fake = copy.deepcopy(base).half()
    with torch.no_grad():
        for name, layer in layers.items():
            linear = fake.get_submodule(name)
            linear.weight.data = layer.weight().to(linear.weight.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        save_quantized(fake, layers, Path(tmp) / "packed", method=method)
        return checkpoint_sizes(Path(tmp) / "packed")


def dense_variant(base: nn.Module, name: str, dtype: torch.dtype, device) -> Variant:
    model = base if (dtype == torch.float32 and device.type == "cpu") else copy.deepcopy(base).to(device, dtype)
    linears = [block.get_submodule(n) for block in model.model.layers for n in LINEARS]
    bits = torch.finfo(dtype).bits
    weights = sum(linear.weight.numel() for linear in linears)
    variant = Variant(name, model, bits, predicted_bytes=weights * bits / 8)
    variant.weight_bytes = sum(p.numel() * p.element_size() for linear in linears for p in linear.parameters())
    return variant


def other_bytes(model: nn.Module) -> int:
    """Bytes of the model's tensors outside the blocks' linears (embeddings, norms, LM head), each once."""
    inside = {id(t) for block in model.model.layers for n in LINEARS
              for t in [*block.get_submodule(n).parameters(), *block.get_submodule(n).buffers()]}
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in inside and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _warm_up(model, device):
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device))
        model(input_ids=torch.zeros(1, 2 * PROMPT_TOKENS, dtype=torch.long, device=device))


# --- measuring ---------------------------------------------------------------------------


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_decode(model, tokens: int, device, vocab: int) -> float:
    """Seconds for ``tokens`` batch-1 decode steps after a prompt, with the KV cache."""
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, PROMPT_TOKENS), generator=g).to(device)
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync(device)
        start = time.perf_counter()
        for _ in range(tokens):
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync(device)
        return time.perf_counter() - start


def time_prefill(model, batch: int, length: int, device, vocab: int) -> float:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, length), generator=g).to(device)
    with torch.no_grad():
        _sync(device)
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        _sync(device)
        return time.perf_counter() - start


def peak_transient_bytes(fn, device) -> int:
    """The largest amount of memory allocated at once while ``fn`` runs, above what was allocated before."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0]
    return max([0, *totals])


# --- report ------------------------------------------------------------------------------


def summarize(variants: list[Variant], args) -> list[dict]:
    decode_tokens = args.decode_tokens
    batch, length = args.prefill_batch, args.prefill_length
    rows = []
    for v in variants:
        rows.append({
            "variant": v.name,
            "bits_per_weight": v.bits_per_weight,
            "decode_tokens_per_s": decode_tokens / statistics.median(v.decode),
            "prefill_tokens_per_s": batch * length / statistics.median(v.prefill),
            "weight_mib": v.weight_bytes / 2**20,
            "predicted_weight_mib": v.predicted_bytes / 2**20,
            "weight_memory_vs_bits": v.weight_bytes / v.predicted_bytes,
            "peak_decode_mib": v.peak_decode_bytes / 2**20,
            "peak_prefill_mib": v.peak_prefill_bytes / 2**20,
            **({"checkpoint_mib": v.sizes["bytes"] / 2**20, "fp16_checkpoint_mib": v.sizes["fp16_bytes"] / 2**20,
                "file_bits_per_weight": v.sizes["bits_per_weight"]} if v.sizes else {}),
        })
    reference = {r["variant"]: r for r in rows}
    gptq, fp16 = reference.get("packed GPTQ"), reference.get("dense FP16")
    for r in rows:
        for key in ("decode_tokens_per_s", "prefill_tokens_per_s"):
            r[f"{key.split('_')[0]}_vs_gptq"] = r[key] / gptq[key] if gptq else float("nan")
            r[f"{key.split('_')[0]}_vs_fp16"] = r[key] / fp16[key] if fp16 else float("nan")
    return rows


def format_table(rows) -> str:
    lines = [
        "| variant | bits/weight | decode tok/s | vs GPTQ | vs FP16 | prefill tok/s | vs GPTQ | vs FP16 "
        "| linear weights MiB | predicted MiB | ratio | peak decode MiB | peak prefill MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['bits_per_weight']:.3f} | {r['decode_tokens_per_s']:.2f} | {r['decode_vs_gptq']:.2f} "
            f"| {r['decode_vs_fp16']:.2f} | {r['prefill_tokens_per_s']:.1f} | {r['prefill_vs_gptq']:.2f} "
            f"| {r['prefill_vs_fp16']:.2f} | {r['weight_mib']:.1f} | {r['predicted_weight_mib']:.1f} "
            f"| {r['weight_memory_vs_bits']:.3f} | {r['peak_decode_mib']:.1f} | {r['peak_prefill_mib']:.1f} |"
        )
    return "\n".join(lines)


def format_sizes(rows) -> str:
    lines = ["| variant | checkpoint MiB (rest in FP16) | FP16 original MiB | FP16 / checkpoint "
             "| bits/weight from the files | bits/weight (accounting) |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "checkpoint_mib" in r:
            lines.append(f"| {r['variant']} | {r['checkpoint_mib']:.1f} | {r['fp16_checkpoint_mib']:.1f} "
                         f"| {r['fp16_checkpoint_mib'] / r['checkpoint_mib']:.2f} | {r['file_bits_per_weight']:.4f} "
                         f"| {r['bits_per_weight']:.4f} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def check_targets(rows) -> list[str]:
    """The issue's targets: FrameQuant decode >= 0.7x packed GPTQ; packed weight memory within 10% of the bits."""
    lines = []
    for r in rows:
        if r["variant"].startswith("packed FrameQuant"):
            ok = r["decode_vs_gptq"] >= 0.7
            lines.append(f"{r['variant']}: decode {r['decode_vs_gptq']:.2f}x packed GPTQ (target >= 0.7): "
                         f"{'met' if ok else 'NOT met'}")
        if r["variant"].startswith("packed"):
            ok = abs(r["weight_memory_vs_bits"] - 1) <= 0.10
            lines.append(f"{r['variant']}: weight memory {r['weight_memory_vs_bits']:.3f}x its honest bits "
                         f"(target within 10%): {'met' if ok else 'NOT met'}")
    return lines


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m fqbench.bench inference", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5504)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=None)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--redundancies", default="1.0,1.1", help="FrameQuant redundancies (both sides)")
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--prefill", default="1x128", help="BATCHxLENGTH of the prefill measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved measurement rounds (medians reported)")
    parser.add_argument("--quantizer", choices=("rtn", "solver"), default="rtn")
    parser.add_argument("--no-sizes", dest="sizes", action="store_false",
                        help="skip saving each packed variant to measure its checkpoint (paper Table 6)")
    parser.add_argument("--variants", default="fp32,fp16,gptq,framequant",
                        help="comma-separated subset of fp32, fp16, bf16, gptq, framequant")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's); 1 avoids OpenMP spinning on a shared, busy CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    args.prefill_batch, args.prefill_length = (int(v) for v in args.prefill.lower().split("x"))
    return args


def build_variants(args, device) -> list[Variant]:
    base = llama_model(args)
    wanted = args.variants.split(",")
    variants = []
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        if name in wanted:
            variants.append(dense_variant(base, f"dense {name.upper()}", dtype, device))
    if "gptq" in wanted:
        variants.append(packed_variant(base, "packed GPTQ", "gptq", args, 1.0, device))
    if "framequant" in wanted:
        for r in (float(v) for v in args.redundancies.split(",")):
            variants.append(packed_variant(base, f"packed FrameQuant r={r:g}", "framequant", args, r, device))
    return variants


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    plane_tables(device, torch.float32)  # the kernels' constant tables, before any variant's memory is measured
    start = time.perf_counter()
    variants = build_variants(args, device)
    print(f"built {len(variants)} variants in {time.perf_counter() - start:.0f}s", flush=True)
    for v in variants:
        v.other_bytes = other_bytes(v.model)
        held = v.weight_bytes + v.other_bytes
        v.peak_decode_bytes = held + peak_transient_bytes(
            lambda: time_decode(v.model, 2, device, args.vocab), device)
        v.peak_prefill_bytes = held + peak_transient_bytes(
            lambda: time_prefill(v.model, args.prefill_batch, args.prefill_length, device, args.vocab), device)
    for _ in range(args.rounds):
        for v in variants:
            v.decode.append(time_decode(v.model, args.decode_tokens, device, args.vocab))
            v.prefill.append(time_prefill(v.model, args.prefill_batch, args.prefill_length, device, args.vocab))
    rows = summarize(variants, args)
    print(format_table(rows))
    print(format_sizes(rows))
    for line in check_targets(rows):
        print(line)
    print(f"\ndevice: {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, model: hidden "
          f"{args.hidden}, intermediate {args.intermediate}, {args.layers} layers, vocab {args.vocab}, "
          f"{args.bits}-bit codes ({args.quantizer}); decode {args.decode_tokens} tokens after a "
          f"{PROMPT_TOKENS}-token prompt; prefill {args.prefill}; {args.rounds} rounds")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    return rows
