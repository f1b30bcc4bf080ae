"""The vision pipeline (``model.task: vision``): timm classifiers on ImageNet (or the small MNIST model).

1. Load the model through timm (CPU); preprocessing is the model's own data
   config (``resolve_model_data_config`` + ``create_transform(is_training=False)``).
2. Load the evaluation split and draw ``calib.nsamples`` random training images
   (seeded by ``seed``) first, so that missing data fails the job early.
3. Optionally evaluate the full-precision model (``eval.fp_baseline``).
4. Quantize: layer-level methods through the sequential engine over the
   layout's units; model-level methods (a ``quantize_model``, e.g. PTQ4ViT-style)
   with the same units, calibration images and device.
5. Top-1 / top-5 accuracy on the evaluation split.
"""

from __future__ import annotations

import logging
import time

import timm.data

from fqbench.data.vision import calibration_images, evaluation_subset, load_split
from fqbench.engine import capture_block_inputs, quantize_blocks, summarize
from fqbench.eval.imagenet import evaluate_classifier
from fqbench.models.timm import layout_for, load_timm_model

log = logging.getLogger("fqbench")


def run(cfg, method, device, output_dir) -> dict:
    save = bool(cfg.get("save", False))
    if save and hasattr(method, "quantize_model"):
        raise ValueError(f"save=true: {method.name} quantizes the whole model with activation hooks, which the "
                         f"packed format (fqbench.packing) cannot store; use a layer-level method or save=false")
    layout = layout_for(cfg.model.family)
    model = load_timm_model(cfg.model)
    data_config = timm.data.resolve_model_data_config(model)
    transform = timm.data.create_transform(**data_config, is_training=False)
    dataset = cfg.model.dataset

    eval_set = evaluation_subset(load_split(dataset, cfg.data, "val", transform), cfg.eval.max_images)
    train_set = load_split(dataset, cfg.data, "train", transform)
    images = calibration_images(train_set, cfg.calib.nsamples, seed=cfg.seed)
    batches = list(images.split(cfg.calib.batch_size))
    log.info("calibration: %d %s training images; evaluation: %d validation images",
             len(images), dataset, len(eval_set))

    metrics: dict[str, float] = {}
    if cfg.eval.fp_baseline:
        fp = _evaluate(model, eval_set, cfg, device, "fp accuracy")
        metrics.update(fp_top1=fp["top1"], fp_top5=fp["top5"])
        model.cpu()

    start = time.perf_counter()
    progress = cfg.engine.progress
    if hasattr(method, "quantize_model"):
        records = method.quantize_model(model, layout, batches, device=device, seed=cfg.seed, progress=progress)
    else:
        units = layout.units(model)
        inputs = capture_block_inputs(model, units, batches, lambda m, x: m(x.to(device)), device)
        records, kept = quantize_blocks(units, inputs, method, device=device, seed=cfg.seed,
                                        true_sequential=cfg.engine.true_sequential, keep_layers=save,
                                        progress=progress)
        del inputs
    quantize_seconds = time.perf_counter() - start

    start = time.perf_counter()
    result = _evaluate(model, eval_set, cfg, device, f"{method.name} accuracy")
    metrics.update(top1=result["top1"], top5=result["top5"])
    log.info("top-1 %.2f%% top-5 %.2f%% on %d images%s", result["top1"], result["top5"], result["images"],
             f" (full precision: {metrics['fp_top1']:.2f}%)" if "fp_top1" in metrics else "")
    eval_seconds = time.perf_counter() - start
    saved = {}
    if save:  # the evaluated model, packed: <output_dir>/packed (fqbench.packing)
        from fqbench.packing import save_run

        saved["packed"] = save_run(model, kept, method, output_dir, device=device, timm_name=cfg.model.name,
                                   timm_kwargs=dict(cfg.model.get("kwargs") or {}))
    return {
        "metrics": metrics,
        "layers": [record.to_dict() for record in records],
        "summary": summarize(records),
        "model": cfg.model.name,
        "family": cfg.model.family,
        "parameters": sum(p.numel() for p in model.parameters()),
        "full_precision_modules": list(layout.full_precision),
        "expected_top1": cfg.model.get("expected_top1"),
        "paper_top1": cfg.model.get("paper_top1"),
        "data_config": data_config,
        "dataset": dataset,
        "eval_images": result["images"],
        "calib_nsamples": len(images),
        "quantize_seconds": quantize_seconds,
        "eval_seconds": eval_seconds,
        **saved,
    }


def _evaluate(model, dataset, cfg, device, desc: str) -> dict:
    model.to(device)
    return evaluate_classifier(model, dataset, device=device, batch_size=cfg.eval.batch_size,
                               workers=cfg.eval.workers, progress=cfg.engine.progress,
                               desc=desc)
