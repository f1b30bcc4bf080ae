"""Downstream accuracy with lm-evaluation-harness 0.4 on the in-memory (quantized) model.

``HFLM(pretrained=model, tokenizer=...)`` wraps the model as it is, quantized
weights included, and ``simple_evaluate`` runs the tasks. ``include_path`` adds
task YAMLs from a folder (a task over local JSON files runs offline); the six
tasks of the paper's Table 14 need their datasets from the hub (or its cache).
"""

from __future__ import annotations

import math

PAPER_TASKS = ("arc_challenge", "arc_easy", "boolq", "hellaswag", "piqa", "winogrande")


def evaluate_tasks(model, tokenizer, tasks=PAPER_TASKS, *, include_path: str | None = None,
                   num_fewshot: int | None = None, batch_size: int = 1, limit: int | float | None = None,
                   seed: int = 0) -> dict[str, float]:
    """``{"<task>_<metric>": value}`` (e.g. ``arc_easy_acc``, ``arc_easy_acc_norm``) for every task.

    The model must be on the device it should run on (lm-eval runs it whole).
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    tasks = list(tasks)
    manager = task_manager(tasks, include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" or in include_path={include_path}" if include_path else " (set eval.lm_eval.include_path for local task YAMLs)"
        raise ValueError(f"unknown lm-eval task(s) {unknown}: not in lm-evaluation-harness{where}")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    output = simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                             log_samples=False, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                             fewshot_random_seed=seed)
    return flatten_results(output["results"])


def task_manager(tasks, include_path):
    """Only the local task folder when it defines every task (indexing lm-eval's ~15k built-in YAMLs takes seconds)."""
    from lm_eval.tasks import TaskManager

    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(task in local.all_tasks for task in tasks):
            return local
    return TaskManager(include_path=include_path)


def flatten_results(results: dict) -> dict[str, float]:
    """lm-eval's ``{"task": {"acc,none": 0.5, "acc_stderr,none": ...}}`` as flat metric names (``arc_easy_acc``, ``arc_easy_acc_stderr``)."""
    flat = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if not isinstance(value, (int, float)) or isinstance(value, bool) or metric in ("sample_len",):
                continue
            suffix = "" if filter_name in ("", "none") else f"_{filter_name}"
            flat[f"{task}_{metric}{suffix}"] = float(value) if math.isfinite(value) else float("nan")
    return flat
