"""Methods compared on a causal LM's own text: perplexity of stories it samples, after quantization.

    python -m fqbench.bench lm_samples --model DIR [--methods gptq:bits=2 framequant:bits=2,redundancy=1.1 ...]
    python -m fqbench.bench lm_samples --model DIR --methods gptq:budget_bits=2.5,budget_bit_widths=2/3/4

For a pretrained model with no matching evaluation set on disk (stories260K, a
TinyStories model), text sampled from the full-precision model at temperature 1
is in-domain text: calibration windows come from one seed, evaluation windows
from another. Every method quantizes the same model from the same calibration
windows (engine, per-layer seeds from --seed); the table gives perplexity, its
ratio to full precision, and honest and nominal bits per weight.
"""

from __future__ import annotations

import argparse
import copy
import time


def parse_method(spec: str) -> tuple[str, dict]:
    """``name:key=value,key=a/b/c`` -> (name, options); values are int, float, None or str, and ``a/b/c`` a list."""
    name, _, options = spec.partition(":")
    parsed = {}
    for item in filter(None, options.split(",")):
        key, _, value = item.partition("=")
        parsed[key] = [_value(v) for v in value.split("/")] if "/" in value else _value(value)
    return name, parsed


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            continue
    if text in ("true", "false"):
        return text == "true"
    return None if text in ("null", "None") else text


def sample(model, tokenizer, count: int, seqlen: int, seed: int):
    import torch

    torch.manual_seed(seed)
    bos = torch.full((count, 1), tokenizer.bos_token_id)
    return model.generate(bos, do_sample=True, top_k=0, max_new_tokens=seqlen - 1, min_new_tokens=seqlen - 1,
                          pad_token_id=tokenizer.pad_token_id or 0)


DEFAULT_METHODS = ["rtn:bits=2", "gptq:bits=2", "quip:bits=2", "quip_clip:bits=2", "framequant:bits=2,redundancy=1.0",
                   "framequant:bits=2,redundancy=1.1", "gptq:bits=3", "quip:bits=3"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fqbench.bench lm_samples", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a Hugging Face causal-LM directory (or hub name)")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, help="name:option=value,... per method")
    parser.add_argument("--calib", type=int, default=128, help="calibration windows")
    parser.add_argument("--eval", type=int, default=64, help="evaluation windows")
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", help="also write every method's result and per-layer records to this JSON file")
    args = parser.parse_args(argv)

    import torch

    from fqbench.methods import build_method
    from fqbench.engine import quantize_model, summarize
    from fqbench.eval.perplexity import perplexity
    from fqbench.models.hf import load_causal_lm

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer, adapter = load_causal_lm(args.model)
    calibration = sample(model, tokenizer, args.calib, args.seqlen, seed=args.seed)
    evaluation = sample(model, tokenizer, args.eval, args.seqlen, seed=args.seed + 1).reshape(-1)
    fp = perplexity(model, adapter, evaluation, seqlen=args.seqlen, device="cpu").ppl
    print(f"{args.model}: {args.calib} calibration and {args.eval} evaluation windows of {args.seqlen} sampled tokens")
    print(f"{'method':42s} {'ppl':>9s} {'x FP':>7s} {'bits/w':>7s} {'nominal':>7s} {'seconds':>7s}")
    print(f"{'fp':42s} {fp:9.3f} {1:7.2f} {32:7.3f} {32:7.3f}")
    results = [{"method": "fp", "ppl": fp}]
    for spec in args.methods:
        name, options = parse_method(spec)
        method = build_method(name, **options)
        quantized = copy.deepcopy(model)
        start = time.perf_counter()
        records = quantize_model(quantized, adapter, calibration.split(1), method, device="cpu", seed=args.seed,
                                 progress=False).records
        seconds = time.perf_counter() - start
        ppl = perplexity(quantized, adapter, evaluation, seqlen=args.seqlen, device="cpu").ppl
        summary = summarize(records)
        print(f"{spec:42s} {ppl:9.3f} {ppl / fp:7.2f} {summary['bits_per_weight']:7.3f} {summary['nominal_bits']:7.3f}"
              f" {seconds:7.1f}", flush=True)
        results.append({"method": spec, "ppl": ppl, "seconds": seconds, **summary,
                        "layers": [record.to_dict() for record in records]})
    if args.json:
        from fqbench.records import write_json

        write_json(args.json, {"model": args.model, "calib": args.calib, "eval": args.eval, "seqlen": args.seqlen,
                               "seed": args.seed, "results": results})


if __name__ == "__main__":
    main()
