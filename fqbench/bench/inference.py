"""Inference with quantized weights (paper Table 7): tokens/s and memory of a Llama-shaped model, served
the way people serve models.

    python -m fqbench.bench inference --shape 7b --device cuda          # Llama-2-7B shape, random weights
    python -m fqbench.bench inference --shape 13b --device cuda
    python -m fqbench.bench inference [--hidden 2048 --intermediate 5504 --layers 4]   # any shape, e.g. on a CPU

One randomly initialized Llama-shaped model, run in one process as: dense (FP16 on a GPU, FP32 and FP16 on
a CPU), GPTQ at 2 (and 3) bits, and FrameQuant at r = 1.0 and r = 1.1 (both sides redundant). Quantized
variants replace every linear of the blocks by a ``QuantLinear`` whose weight is in the ``kernel`` layout
on a GPU (gemlite's Triton GEMV/GEMM, 3-bit codes from 4-bit containers, frame transforms as
Kronecker-factored matmuls; ``--transforms triton`` fuses them) and in the ``packed`` layout on a CPU
(table-lookup kernels); embeddings, norms and the LM head are the dense model's, shared.

Decode: a static KV cache and, on CUDA, each decode step replayed as one CUDA graph, for every variant
dense included (``fqbench.bench.decode``), batch 1 and 16, after a 16-token prompt. Prefill: one 1 x
``--prefill`` sequence. Memory: what building a variant's linears allocated (every tensor they keep alive,
shared transform tables and kernel workspaces included), against what their honest bits predict, and the
resident bytes of their own tensors; peak memory of the decode runs. Ratios are against the dense FP16
model from the same process. The codes are round-to-nearest on each method's grid: speed and size depend
on the format, not on how the codes were chosen.

``--records DIR`` writes one run record per variant (``DIR/<shape>/<variant>/result.json``) that
``python -m fqbench.report DIR --table table7`` lays out as paper Table 7.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fqbench.bench.decode import SHAPES, build_llama, time_decode, time_prefill
from fqbench.frames.operator import FrameOperator
from fqbench.quant.grids import GridSpec, clip_rows
from fqbench.quantized import GridWeight, QuantLinear, TransformedWeight
from fqbench.seeding import derive_seed

log = logging.getLogger("fqbench")

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# The report's variant (conf/variant) of each benchmark variant, and Table 7's models of each shape.
VARIANTS = {"dense FP16": "fp", "GPTQ 2-bit": "gptq_w2", "GPTQ 3-bit": "gptq_w3", "FrameQuant r=1": "fq_w2_r1.0",
            "FrameQuant r=1.1": "fq_w2_r1.1"}
SHAPE_MODELS = {"7b": "llama2_7b", "13b": "llama2_13b"}
TABLE7_AXES = {"model": list(SHAPE_MODELS.values()), "variant": list(VARIANTS.values())}  # the report's Table 7


@dataclass
class Variant:
    name: str
    model: nn.Module
    bits_per_weight: float  # honest, over the block linears
    allocated_bytes: int = 0  # what building the linears allocated (device memory on a GPU)
    resident_bytes: int = 0  # the linears' own tensors
    honest_bytes: float = 0.0  # bits_per_weight x weights / 8
    layout: str = "dense"
    timings: dict = field(default_factory=dict)


# --- building the variants ----------------------------------------------------------------------------


def rtn_grid(W: torch.Tensor, spec: GridSpec) -> GridWeight:
    """Round-to-nearest on ``spec`` with one grid per row, vectorized: the stored format of a GPTQ or
    FrameQuant layer (speed and size depend on the format, not on how the codes were chosen)."""
    grid = spec.fit(W)
    codes = grid.encode(W.float())
    return GridWeight.fit(codes, grid.scale[:, None], grid.zero[:, None], torch.zeros(W.shape[1], dtype=torch.long,
                                                                                      device=W.device),
                          bits=spec.bits, integer_zero=spec.integer_zero, shared_scale=spec.shared_scale)


def quantized_layer(W: torch.Tensor, method: str, bits: int, redundancy: float, seed: int):
    W = W.float()
    if method == "gptq":
        return rtn_grid(W, GridSpec(bits, "minmax"))
    in_op = FrameOperator(W.shape[1], redundancy, 8, "auto", derive_seed(seed, "in"))
    out_op = FrameOperator(W.shape[0], redundancy, 8, "auto", derive_seed(seed, "out"))
    D = out_op.analysis(in_op.analysis(W).T).T
    return TransformedWeight(rtn_grid(clip_rows(D, 2.0), GridSpec(bits, "sigma", clip_sigma=2.0)), in_op, out_op)


def allocated(device: torch.device) -> int:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device)
    return 0


def quantized_variant(base: nn.Module, name: str, method: str, bits: int, redundancy: float, args,
                      device: torch.device, dtype: torch.dtype) -> Variant:
    """A copy of ``base`` sharing every tensor but the blocks' linears, which become ``QuantLinear``s."""
    layout = "kernel" if device.type == "cuda" else "packed"
    model = _shell(base)
    before = allocated(device)
    weights = stored_bits = resident = 0
    for i, block in enumerate(model.model.layers):
        for linear_name in LINEARS:
            owner_name, _, attr = linear_name.rpartition(".")
            owner = block.get_submodule(owner_name)
            linear = getattr(owner, attr)
            layer = quantized_layer(linear.weight.data, method, bits, redundancy,
                                    derive_seed(args.seed, f"model.layers.{i}.{linear_name}"))
            stored_bits += layer.stored_bits
            weights += linear.weight.numel()
            if layout == "kernel":
                packed = layer.with_layout("kernel", device=device, dtype=dtype, **_transform_options(layer, args))
            else:
                packed = layer.with_layout("packed").to(device)
            del layer
            module = QuantLinear(packed, linear.bias)
            setattr(owner, attr, module)
            resident += _own_bytes(module)
    variant = Variant(name, model, stored_bits / weights, layout=layout)
    variant.allocated_bytes = allocated(device) - before
    variant.resident_bytes = resident
    variant.honest_bytes = stored_bits / 8
    return variant


def _transform_options(layer, args) -> dict:
    return {"transforms": args.transforms} if isinstance(layer, TransformedWeight) else {}


def _shell(base: nn.Module) -> nn.Module:
    """A structural copy of ``base`` whose tensors are ``base``'s own (nothing is copied or moved)."""
    import copy

    return copy.deepcopy(base, memo={id(t): t for t in [*base.parameters(), *base.buffers()]})


def _own_bytes(module: nn.Module) -> int:
    """Bytes of the distinct storages of a module's own tensors (codes, scales, zero points, kernel copies;
    transform tables are shared between layers and counted in the allocated figure only)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*module.buffers(), *module.parameters()]}
    return sum(storages.values())


def dense_variant(base: nn.Module, dtype: torch.dtype, device: torch.device) -> Variant:
    model = base if next(base.parameters()).dtype == dtype else _cast(base, dtype)
    linears = [block.get_submodule(n) for block in model.model.layers for n in LINEARS]
    bits = torch.finfo(dtype).bits
    weights = sum(linear.weight.numel() for linear in linears)
    variant = Variant(f"dense {_dtype_label(dtype)}", model, bits)
    variant.honest_bytes = weights * bits / 8
    variant.resident_bytes = variant.allocated_bytes = sum(l.weight.numel() * l.weight.element_size() for l in linears)
    return variant


def _cast(base: nn.Module, dtype: torch.dtype) -> nn.Module:
    import copy

    return copy.deepcopy(base).to(dtype)


def _dtype_label(dtype: torch.dtype) -> str:
    return {torch.float16: "FP16", torch.bfloat16: "BF16", torch.float32: "FP32"}[dtype]


def base_model(args, device: torch.device, dtype: torch.dtype) -> nn.Module:
    if args.shape:
        return build_llama(args.shape, dtype=dtype, device=device, layers=args.layers, seed=args.seed,
                           vocab=args.vocab)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers or 4, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, max_position_embeddings=4096)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(args.seed)
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


# --- measuring -----------------------------------------------------------------------------------------


def measure(variant: Variant, args) -> None:
    graphs = "auto" if args.graphs else False
    for batch in args.decode_batches:
        variant.timings[f"decode_b{batch}"] = time_decode(variant.model, batch=batch, new_tokens=args.decode_tokens,
                                                          rounds=args.rounds, graphs=graphs)
    variant.timings["prefill"] = time_prefill(variant.model, batch=1, length=args.prefill, rounds=args.rounds)


def summarize(variants: list[Variant]) -> list[dict]:
    rows = []
    for v in variants:
        row = {"variant": v.name, "layout": v.layout, "bits_per_weight": v.bits_per_weight,
               "weight_mib": v.allocated_bytes / 2**20, "resident_mib": v.resident_bytes / 2**20,
               "honest_mib": v.honest_bytes / 2**20,
               "allocated_vs_honest_bits": v.allocated_bytes / v.honest_bytes if v.allocated_bytes else float("nan"),
               "resident_vs_honest_bits": v.resident_bytes / v.honest_bytes}
        for key, timing in v.timings.items():
            row[f"{key}_tokens_per_s"] = timing.tokens_per_s
            row[f"{key}_graphs"] = timing.graphs
            row[f"{key}_peak_mib"] = None if timing.peak_bytes is None else timing.peak_bytes / 2**20
            if timing.note:
                row[f"{key}_note"] = timing.note
        rows.append(row)
    reference = next((r for r in rows if r["variant"] in ("dense FP16", "dense BF16")), None)
    for r in rows:
        for key in [k for k in r if k.endswith("_tokens_per_s")]:
            r[key.replace("_tokens_per_s", "_vs_fp16")] = r[key] / reference[key] if reference else float("nan")
    return rows


def format_table(rows: list[dict]) -> str:
    keys = [k.removesuffix("_tokens_per_s") for k in rows[0] if k.endswith("_tokens_per_s")]
    header = ["variant", "bits/weight", *(f"{k} tok/s (x FP16)" for k in keys), "weight MiB", "honest MiB",
              "allocated / honest", "resident / honest"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["variant"], f"{r['bits_per_weight']:.3f}"]
        cells += [f"{r[k + '_tokens_per_s']:.1f} ({r[k + '_vs_fp16']:.2f}x)" + ("" if r.get(k + "_graphs", True)
                                                                             or k == "prefill" else " eager")
                  for k in keys]
        cells += [f"{r['weight_mib']:.1f}", f"{r['honest_mib']:.1f}", f"{r['allocated_vs_honest_bits']:.3f}",
                  f"{r['resident_vs_honest_bits']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def check_targets(rows: list[dict]) -> list[str]:
    """The issue's targets (ratios to dense FP16 in the same process)."""
    targets = {"GPTQ 2-bit": 1.5, "FrameQuant r=1": 1.2, "FrameQuant r=1.1": 1.0}
    lines = []
    for r in rows:
        if r["variant"] in targets and "decode_b1_vs_fp16" in r:
            ok = r["decode_b1_vs_fp16"] >= targets[r["variant"]]
            lines.append(f"{r['variant']}: batch-1 decode {r['decode_b1_vs_fp16']:.2f}x FP16 (target >= "
                         f"{targets[r['variant']]}): {'met' if ok else 'NOT met'}")
        if r["layout"] != "dense" and "prefill_vs_fp16" in r:
            ok = r["prefill_vs_fp16"] >= 0.8
            lines.append(f"{r['variant']}: prefill {r['prefill_vs_fp16']:.2f}x FP16 (target >= 0.8): "
                         f"{'met' if ok else 'NOT met'}")
        if r["layout"] == "kernel":
            ok = abs(r["allocated_vs_honest_bits"] - 1) <= 0.10
            lines.append(f"{r['variant']}: weight memory {r['allocated_vs_honest_bits']:.3f}x its honest bits "
                         f"(target within 10%; 3-bit runs from 4-bit containers): {'met' if ok else 'NOT met'}")
    return lines


def write_records(rows: list[dict], args, device: torch.device, directory: Path) -> list[Path]:
    """One run record per variant, for the report's Table 7 (``fqbench.report``)."""
    from fqbench.config import compose
    from fqbench.records import versions, write_record
    from omegaconf import OmegaConf

    model = SHAPE_MODELS.get(args.shape, f"llama_{args.shape or 'custom'}")
    paths = []
    for row in rows:
        variant = VARIANTS.get(row["variant"])
        if variant is None:
            continue
        config = OmegaConf.to_container(compose([f"variant={variant}", f"model={model}"] if model in
                                                SHAPE_MODELS.values() else [f"variant={variant}"]), resolve=True)
        record = {"status": "ok", "method": config["method"].get("_target_", "").rsplit(".", 1)[-1],
                  "choices": {"model": model, "variant": variant}, "config": config,
                  "config_hash": f"inference-{args.shape}-{variant}", "bench": "inference",
                  "metrics": {k: v for k, v in row.items() if k.endswith(("_tokens_per_s", "_vs_fp16"))},
                  "bits_per_weight": row["bits_per_weight"], "inference": row, "versions": versions(),
                  "bench_args": {"shape": args.shape, "layers": args.layers, "decode_tokens": args.decode_tokens,
                                 "prefill": args.prefill, "transforms": args.transforms, "graphs": args.graphs},
                  "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                  "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        paths.append(write_record(directory / (args.shape or "custom") / variant, record))
    return paths


# --- the command --------------------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m fqbench.bench inference", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None,
                        help="a Llama-2 shape (7b: 32 blocks of 4096/11008, 32 heads; 13b: 40 of 5120/13824, 40 heads)")
    parser.add_argument("--layers", type=int, default=None, help="blocks (default: the shape's, or 4)")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5504)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--bits", default="2", help="GPTQ bit widths, comma-separated (FrameQuant runs at the first)")
    parser.add_argument("--redundancies", default="1.0,1.1", help="FrameQuant redundancies (both sides)")
    parser.add_argument("--variants", default="dense,gptq,framequant",
                        help="comma-separated subset of dense, fp32 (CPU), gptq, framequant")
    parser.add_argument("--decode-batches", default="1,16")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--prefill", type=int, default=2048, help="prompt length of the 1 x N prefill")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per measurement (medians reported)")
    parser.add_argument("--transforms", choices=("fast", "triton"), default="fast",
                        help="FrameQuant's transforms on a GPU: Kronecker-factored matmuls, or one fused Triton kernel")
    parser.add_argument("--no-graphs", dest="graphs", action="store_false", help="decode eagerly on a GPU too")
    parser.add_argument("--gemlite-autotune", choices=("fast", "default", "max"), default="fast",
                        help="gemlite's tuning of its batch-1 GEMV kernels (split-K and GEMM keep default configs); "
                             "FQBENCH_GEMLITE_CONFIG=FILE loads configs tuned earlier")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--records", type=Path, help="also write one run record per variant under this folder")
    args = parser.parse_args(argv)
    args.decode_batches = [int(b) for b in args.decode_batches.split(",")]
    args.bits = [int(b) for b in args.bits.split(",")]
    return args


def build_variants(args, device: torch.device) -> list[Variant]:
    start = time.perf_counter()
    wanted = args.variants.split(",")
    dtype = torch.float16
    base = base_model(args, device, dtype if device.type == "cuda" else torch.float32)
    variants = []
    if "fp32" in wanted and device.type == "cpu":
        variants.append(dense_variant(base, torch.float32, device))
    if "dense" in wanted:
        variants.append(dense_variant(base, torch.float16, device))
    if device.type == "cuda":  # cuBLAS workspaces, before any variant's memory is measured
        for work in (torch.float16, torch.float32):
            torch.ones(64, 64, device=device, dtype=work) @ torch.ones(64, 64, device=device, dtype=work)
    if "gptq" in wanted:
        for bits in args.bits:
            variants.append(quantized_variant(base, f"GPTQ {bits}-bit", "gptq", bits, 1.0, args, device, dtype))
            print(f"  built {variants[-1].name} ({time.perf_counter() - start:.0f} s)", flush=True)
    if "framequant" in wanted:
        for r in (float(v) for v in args.redundancies.split(",")):
            variants.append(quantized_variant(base, f"FrameQuant r={r:g}", "framequant", args.bits[0], r, args,
                                              device, dtype))
            print(f"  built {variants[-1].name} ({time.perf_counter() - start:.0f} s)", flush=True)
    return variants


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        from fqbench.kernels.gemlite_backend import BackendUnavailable, set_autotune

        try:
            set_autotune(args.gemlite_autotune)
        except BackendUnavailable as error:
            log.warning("gemlite unavailable (%s): quantized variants use the PyTorch kernel", error)
    start = time.perf_counter()
    variants = build_variants(args, device)
    print(f"built {len(variants)} variants in {time.perf_counter() - start:.0f}s", flush=True)
    for variant in variants:
        measure(variant, args)
        print(f"measured {variant.name}", flush=True)
    rows = summarize(variants)
    print(format_table(rows))
    for line in check_targets(rows):
        print(line)
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    print(f"\ndevice: {device}{gpu}, torch {torch.__version__}, shape {args.shape or 'custom'}, "
          f"decode {args.decode_tokens} tokens x batches {args.decode_batches} (static cache"
          f"{', CUDA graphs' if args.graphs and device.type == 'cuda' else ''}), prefill 1x{args.prefill}, "
          f"{args.rounds} rounds")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows},
                                              indent=1))
    if args.records:
        for path in write_records(rows, args, device, args.records):
            print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
