"""Experiment tracking behind one small interface: ``tracking=none`` (default) or ``tracking=wandb``.

A tracker lives for one job: ``start`` before the work, ``log_result`` with the
finished record, ``finish`` always (also when the job failed), so that Hydra
multiruns that run many jobs in one process never leak a W&B run into the next
job. The W&B run id is derived from the job's config hash: re-running a job
resumes its run instead of creating a new one.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fqbench.records import flatten

log = logging.getLogger(__name__)

TRACKERS: dict[str, type["Tracker"]] = {}

# The per-layer table: one row per quantized linear.
LAYER_COLUMNS = ("name", "rows", "cols", "proxy_error", "bits_per_weight", "nominal_bits",
                 "effective_redundancy", "damping", "seconds")
# Record fields summarised next to the metrics.
SUMMARY_FIELDS = ("status", "method", "bits_per_weight", "nominal_bits", "effective_redundancy",
                  "seconds", "peak_memory_bytes", "config_hash", "device", "error")


def register_tracker(name: str):
    def decorate(cls):
        TRACKERS[name] = cls
        return cls

    return decorate


def make_tracker(tracking_cfg) -> "Tracker":
    backend = tracking_cfg.get("backend", "none")
    if backend not in TRACKERS:
        raise ValueError(f"unknown tracking backend {backend!r}; choose tracking= one of {', '.join(sorted(TRACKERS))}")
    return TRACKERS[backend](tracking_cfg)


@register_tracker("none")
class Tracker:
    """No tracking: results go to the run records only."""

    def __init__(self, tracking_cfg=None):
        self.cfg = tracking_cfg

    def start(self, *, run_id: str, name: str, group: str, job_type: str, config: dict) -> None:
        pass

    def log_result(self, record: dict) -> None:
        pass

    def finish(self, failed: bool = False) -> None:
        pass


@register_tracker("wandb")
class WandbTracker(Tracker):
    """Weights & Biases: offline by default (``wandb sync <dir>`` uploads later), online by config."""

    def __init__(self, tracking_cfg):
        super().__init__(tracking_cfg)
        self.run = None

    def start(self, *, run_id, name, group, job_type, config):
        import wandb

        c = self.cfg
        directory = Path(c.dir)
        directory.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=c.project,
            entity=c.get("entity"),
            group=c.get("group") or group,
            job_type=job_type,
            name=name,
            id=run_id,
            resume="allow",
            reinit="finish_previous",
            mode=c.mode,
            dir=str(directory),
            tags=list(c.get("tags") or []),
            config=config,
        )
        log.info("W&B run %s (%s, group %s) in %s", run_id, c.mode, self.run.group, directory)

    def log_result(self, record):
        import wandb

        metrics = {f"metrics/{k}": v for k, v in flatten(record.get("metrics") or {}).items() if _is_number(v)}
        if metrics:
            self.run.log(metrics)
        for field in SUMMARY_FIELDS:
            if record.get(field) is not None:
                value = record[field]
                self.run.summary[field] = value if not isinstance(value, dict) else flatten(value)
        layers = record.get("layers") or []
        if layers:
            rows = [[_layer_value(layer, column) for column in LAYER_COLUMNS] for layer in layers]
            self.run.log({"layers": wandb.Table(columns=list(LAYER_COLUMNS), data=rows)})

    def finish(self, failed=False):
        if self.run is not None:
            self.run.finish(exit_code=1 if failed else 0)
            self.run = None


def _layer_value(layer: dict, column: str):
    if column in ("rows", "cols"):
        return layer["shape"][0 if column == "rows" else 1]
    return layer.get(column)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
