"""The vision pipeline (``model.task: vision``): timm classifiers on ImageNet (or the small MNIST model).

1. Load the model through timm (CPU); preprocessing is the model's own data
   config (``resolve_model_data_config`` + ``create_transform(is_training=False)``).
2. Load the evaluation split and draw ``calib.nsamples`` random training images
   (seeded by ``seed``) first, so that missing data fails the job early.
3. Optionally evaluate the full-precision model (``eval.fp_baseline``).
4. Quantize with the engine (``fqbench.engine.quantize_model``), whatever the method's tier:
   layer and block methods block by block over the adapter's blocks, model methods (the
   PTQ4ViT-style baseline) on the whole model, with the same calibration images and device.
5. Top-1 / top-5 accuracy on the evaluation split.
"""

from __future__ import annotations

import logging
import time

import timm.data

from fqbench.data.vision import calibration_images, evaluation_subset, load_split
from fqbench.engine import quantize_model, summarize
from fqbench.eval.imagenet import evaluate_classifier
from fqbench.models.timm import adapter_for, load_timm_model
from fqbench.pipelines.saving import save_run

log = logging.getLogger("fqbench")


def run(cfg, method, device, output_dir) -> dict:
    save = bool(cfg.get("save", False))
    model = load_timm_model(cfg.model)
    adapter = adapter_for(cfg.model.get("family", "auto"), model)
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
    quantized = quantize_model(model, adapter, batches, method, device=device, seed=cfg.seed,
                               true_sequential=cfg.engine.true_sequential, keep_layers=save,
                               progress=cfg.engine.progress)
    quantize_seconds = time.perf_counter() - start

    start = time.perf_counter()
    result = _evaluate(model, eval_set, cfg, device, f"{method.name} accuracy")
    metrics.update(top1=result["top1"], top5=result["top5"])
    log.info("top-1 %.2f%% top-5 %.2f%% on %d images%s", result["top1"], result["top5"], result["images"],
             f" (full precision: {metrics['fp_top1']:.2f}%)" if "fp_top1" in metrics else "")
    eval_seconds = time.perf_counter() - start
    saved = {}
    if save:  # the evaluated model, packed: <output_dir>/packed (fqbench.packing)
        saved["packed"] = save_run(model, quantized.layers, method, output_dir, device=device,
                                   timm_name=cfg.model.name, timm_kwargs=dict(cfg.model.get("kwargs") or {}))
    return {
        "metrics": metrics,
        "layers": [record.to_dict() for record in quantized.records],
        "summary": summarize(quantized.records),
        "model": cfg.model.name,
        "family": cfg.model.get("family", "auto"),
        "adapter": adapter.name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "full_precision_modules": list(adapter.full_precision),
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
