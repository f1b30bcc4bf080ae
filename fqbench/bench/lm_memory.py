"""Peak memory and time of sequential quantization as a Llama-shaped model gets deeper.

    python -m fqbench.bench lm_memory --layers 1 2 4 8 [--hidden 2048 --intermediate 5632 --method gptq]

Each depth runs in a fresh process: build a randomly initialized ``LlamaForCausalLM``
(CPU), capture the calibration inputs of block 0, quantize every block with the
engine, and measure the memory the quantization adds on top of the loaded model
(peak resident memory during quantization minus resident memory before it; on a
GPU also the peak accelerator memory). If the engine held more than one block's
working set at a time, the added memory would grow with depth; it should stay at
about one block's Hessians, activations and solver temporaries while the model
grows linearly.
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> None:
    """Linux >= 4.0: writing 5 to clear_refs resets VmHWM (the peak resident set) to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure(layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, method: str, bits: int,
            nsamples: int, seqlen: int, device: str, threads: int | None) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fqbench.methods import build_method
    from fqbench.engine import quantize_model
    from fqbench.models.hf import LLAMA

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=seqlen)
    model = LlamaForCausalLM(config).eval()
    model.config.use_cache = False
    samples = torch.randint(0, 1024, (nsamples, 1, seqlen), generator=torch.Generator().manual_seed(0))
    blocks = LLAMA.blocks(model)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    block_bytes = sum(p.numel() * p.element_size() for p in blocks[0].module.parameters())

    _reset_peak_rss()
    rss_before = _status_kib("VmRSS") * 1024
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    records = quantize_model(model, LLAMA, samples, build_method(method, bits=bits), device=device,
                             progress=False).records
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM") * 1024
    result = {
        "layers": layers, "parameters": sum(p.numel() for p in model.parameters()), "model_bytes": model_bytes,
        "block_bytes": block_bytes, "rss_before": rss_before, "peak_rss": peak, "added_rss": peak - rss_before,
        "activation_bytes": nsamples * seqlen * hidden * 4, "largest_hessian_bytes": intermediate ** 2 * 8,
        "seconds": seconds, "seconds_per_block": seconds / layers, "linears": len(records),
    }
    if device.startswith("cuda"):
        result["accelerator_peak"] = torch.cuda.max_memory_allocated(device)
    return result


def _gib(n: float) -> str:
    return f"{n / 2**30:6.2f}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fqbench.bench lm_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=16)
    parser.add_argument("--method", default="gptq")
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)

    options = dict(hidden=args.hidden, intermediate=args.intermediate, heads=args.heads, kv_heads=args.kv_heads,
                   method=args.method, bits=args.bits, nsamples=args.nsamples, seqlen=args.seqlen,
                   device=args.device, threads=args.threads)
    context = multiprocessing.get_context("spawn")  # a fresh process per depth: peak memory is its own
    rows = []
    print(f"Llama-shaped blocks: hidden {args.hidden}, intermediate {args.intermediate}; {args.method} "
          f"{args.bits}-bit; {args.nsamples} x {args.seqlen} calibration tokens; device {args.device}")
    header = "layers  model GiB  RSS before  peak RSS  added GiB  added/model  added/block  s/block"
    print(header + ("  accel peak GiB" if args.device.startswith("cuda") else ""))
    for layers in args.layers:
        with ProcessPoolExecutor(1, mp_context=context) as pool:
            row = pool.submit(measure, layers, **options).result()
        rows.append(row)
        line = (f"{layers:6d}  {_gib(row['model_bytes'])}     {_gib(row['rss_before'])}    {_gib(row['peak_rss'])}"
                f"    {_gib(row['added_rss'])}     {row['added_rss'] / row['model_bytes']:8.2f}     "
                f"{row['added_rss'] / row['block_bytes']:8.2f}  {row['seconds_per_block']:7.1f}")
        if "accelerator_peak" in row:
            line += f"  {_gib(row['accelerator_peak'])}"
        print(line, flush=True)
    first, last = rows[0], rows[-1]
    print(f"model grew x{last['model_bytes'] / first['model_bytes']:.1f}; memory added by quantization "
          f"grew x{last['added_rss'] / max(first['added_rss'], 1):.2f}; one block is {_gib(first['block_bytes']).strip()} GiB, "
          f"the largest Hessian {_gib(first['largest_hessian_bytes']).strip()} GiB, the calibration activations "
          f"{_gib(first['activation_bytes']).strip()} GiB per copy")


if __name__ == "__main__":
    main()
