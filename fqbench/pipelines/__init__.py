"""End-to-end pipelines, one per task: load the model, calibrate, quantize, evaluate.

A pipeline module exposes ``run(cfg, method, device, output_dir) -> dict`` returning
at least ``metrics`` (dict), ``layers`` (per-layer records) and ``summary``
(``fqbench.engine.summarize``). The model config's ``task`` key selects it.
"""

from __future__ import annotations

import importlib

PIPELINES = {
    "lm": "fqbench.pipelines.lm",
    "vision": "fqbench.pipelines.vision",
}


def run_pipeline(cfg, method, device, output_dir) -> dict:
    task = cfg.model.task
    if task not in PIPELINES:
        raise ValueError(f"unknown task {task!r} in the model config; known tasks: {', '.join(sorted(PIPELINES))}")
    return importlib.import_module(PIPELINES[task]).run(cfg, method, device, output_dir)
