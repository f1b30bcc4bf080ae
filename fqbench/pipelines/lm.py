"""The language-model pipeline (``model.task: lm``): load, calibrate, quantize block by block, evaluate.

1. Load the model (CPU) and tokenizer through ``from_pretrained`` (hub name or local path).
2. Load every evaluation set and the calibration windows first, so that a missing
   file fails the job before the expensive part.
3. Optionally evaluate the full-precision model (``eval.fp_baseline``).
4. Capture block 0's inputs for the calibration windows and quantize every block
   in the adapter's order (per-layer seeds derived from ``seed``).
5. Perplexity (GPTQ protocol) on ``eval.datasets``, optionally lm-eval tasks.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from fqbench.data.text import DataFiles, calibration_windows, eval_tokens
from fqbench.engine import quantize_model, summarize
from fqbench.eval.perplexity import perplexity
from fqbench.finite import check_metric
from fqbench.models.hf import load_causal_lm, max_positions
from fqbench.pipelines.saving import save_run

log = logging.getLogger("fqbench")


def run(cfg, method, device, output_dir) -> dict:
    if method.tier == "model":
        raise ValueError(f"method {method.name!r} calibrates whole vision models (a model-tier method); the "
                         f"language-model pipeline runs layer and block methods")
    source = cfg.model.get("path") or cfg.model.get("name")
    if not source:
        raise ValueError("the model config needs model.path (a local checkpoint directory) or model.name (a hub name)")
    if cfg.model.get("path") and not Path(source).expanduser().is_dir():  # else the hub's repo-id message
        raise FileNotFoundError(f"model.path={source}: no such directory; model.path is a local checkpoint folder "
                                f"(from save_pretrained), model.name a hub name")
    model, tokenizer, adapter = load_causal_lm(str(source), dtype=cfg.model.get("dtype", "auto"), device=device)
    _check_seqlen(model, "calib.seqlen", cfg.calib.seqlen)
    _check_seqlen(model, "eval.seqlen", cfg.eval.seqlen)

    data = DataFiles.from_config(cfg.data)
    eval_sets = {name: eval_tokens(name, data, tokenizer, cfg.eval.seqlen) for name in cfg.eval.datasets}
    calibration = calibration_windows(cfg.calib.dataset, data, tokenizer, nsamples=cfg.calib.nsamples,
                                      seqlen=cfg.calib.seqlen, seed=cfg.seed)
    log.info("calibration: %d windows of %d tokens from %s", len(calibration.windows), cfg.calib.seqlen, calibration.source)

    metrics: dict[str, float] = {}
    details: dict[str, dict] = {}
    if cfg.eval.fp_baseline:
        evaluate(model, tokenizer, adapter, eval_sets, cfg, device, metrics, details, prefix="fp_")

    start = time.perf_counter()
    # keep_layers: the quantized layers, for saving packed models when cfg.save is set.
    quantized = quantize_model(model, adapter, calibration.windows, method, device=device, seed=cfg.seed,
                               true_sequential=cfg.engine.true_sequential, keep_layers=bool(cfg.get("save", False)),
                               progress=cfg.engine.progress)
    quantize_seconds = time.perf_counter() - start

    start = time.perf_counter()
    evaluate(model, tokenizer, adapter, eval_sets, cfg, device, metrics, details, prefix="")
    eval_seconds = time.perf_counter() - start
    saved = {}
    if cfg.get("save", False):  # the evaluated model, packed: <output_dir>/packed (fqbench.packing)
        saved["packed"] = save_run(model, quantized.layers, method, output_dir, device=device, tokenizer=tokenizer)
    return {
        "metrics": metrics,
        "layers": [record.to_dict() for record in quantized.records],
        "summary": summarize(quantized.records),
        "model": str(source),
        "model_type": model.config.model_type,
        "adapter": adapter.name,
        "dtype": str(model.dtype).removeprefix("torch."),
        "parameters": sum(p.numel() for p in model.parameters()),
        "eval_seqlen": cfg.eval.seqlen,
        "eval_sources": {name: tokens.source for name, tokens in eval_sets.items()},
        # Tokenizers change token counts, hence perplexity (docs/lm.md, "Tokenizers"): what was used, and how many
        # tokens each evaluation text became.
        "tokenizer": {"class": type(tokenizer).__name__, "fast": bool(getattr(tokenizer, "is_fast", False)),
                      "vocab_size": len(tokenizer)},
        "eval_tokens": {name: int(tokens.ids.numel()) for name, tokens in eval_sets.items()},
        "perplexity": details,
        "calib_dataset": cfg.calib.dataset,
        "calib_source": calibration.source,
        "calib_seqlen": cfg.calib.seqlen,
        "calib_nsamples": len(calibration.windows),
        "calib_tokens": calibration.tokens,
        "quantize_seconds": quantize_seconds,
        "eval_seconds": eval_seconds,
        **saved,
    }


def evaluate(model, tokenizer, adapter, eval_sets, cfg, device, metrics: dict, details: dict, *, prefix: str) -> None:
    """Perplexity on every evaluation set (and lm-eval tasks when enabled), into ``metrics`` as ``<prefix><name>_ppl``."""
    for name, tokens in eval_sets.items():
        result = perplexity(model, adapter, tokens.ids, seqlen=cfg.eval.seqlen, device=device,
                            progress=cfg.engine.progress, desc=f"{prefix}{name} perplexity")
        check_metric(f"{prefix}{name}_ppl", result.ppl, first_nonfinite=result.first_nonfinite)
        metrics[f"{prefix}{name}_ppl"] = result.ppl
        details[f"{prefix}{name}"] = result.to_dict()
        log.info("%s%s perplexity %.3f (%d windows of %d tokens)", prefix, name, result.ppl, result.windows, result.seqlen)
    options = cfg.eval.lm_eval
    if options.enabled:
        from fqbench.eval.lm_eval import evaluate_tasks

        home = next(model.parameters()).device
        model.to(device)  # lm-eval runs the model whole
        scores = evaluate_tasks(model, tokenizer, options.tasks, include_path=options.include_path,
                                num_fewshot=options.num_fewshot, batch_size=options.batch_size,
                                limit=options.limit, seed=cfg.seed)
        model.to(home)
        metrics.update({f"{prefix}{key}": value for key, value in scores.items()})


def _check_seqlen(model, key: str, seqlen: int) -> None:
    limit = max_positions(model)
    if limit is not None and seqlen > limit:
        raise ValueError(f"{key}={seqlen} exceeds the model's max_position_embeddings={limit}; set {key}<={limit}")
