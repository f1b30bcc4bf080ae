"""The Hydra application: ``python -m fqbench model=... method=... bits=2 redundancy=1.1 [-m]``.

One job = one model, one method configuration: run the task's pipeline and
write ``result.json`` atomically in the job's output directory, whether the
job succeeds or fails (a failed job in a sweep is recorded and the sweep goes on).
"""

from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fqbench.methods import method_from_config
from fqbench.pipelines import run_pipeline
from fqbench.records import config_hash, device_info, peak_memory_bytes, versions, write_record
from fqbench.seeding import seed_everything

log = logging.getLogger("fqbench")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but no CUDA device is available; use device=cpu or device=auto")
    return device


def run_job(cfg: DictConfig, output_dir: Path) -> dict:
    resolved = OmegaConf.to_container(cfg, resolve=True)
    record = {
        "status": "running",
        "config": resolved,
        "config_hash": config_hash(resolved),
        "seed": cfg.seed,
        "versions": versions(),
    }
    start = time.perf_counter()
    device = torch.device("cpu")
    try:
        device = resolve_device(cfg.device)
        record.update(device_info(device))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seed_everything(cfg.seed)
        method = method_from_config(instantiate(cfg.method))
        record["method"] = method.name
        result = run_pipeline(cfg, method, device, output_dir)
        summary = result.get("summary", {})
        record.update(
            status="ok",
            metrics=result["metrics"],
            bits_per_weight=summary.get("bits_per_weight"),
            nominal_bits=summary.get("nominal_bits"),
            summary=summary,
            layers=result.get("layers", []),
            **{k: v for k, v in result.items() if k not in ("metrics", "layers", "summary")},
        )
    except Exception as error:  # recorded, then re-raised unless a sweep must go on
        record.update(status="failed", error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
        log.error("job failed: %s", record["error"])
        if not _in_multirun():
            _finish(record, start, device, output_dir)
            raise
    _finish(record, start, device, output_dir)
    return record


def _finish(record, start, device, output_dir):
    record["seconds"] = time.perf_counter() - start
    record["peak_memory_bytes"] = peak_memory_bytes(device)
    path = write_record(output_dir, record)
    log.info("wrote %s (status %s)", path, record["status"])


def _in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    run_job(cfg, Path(HydraConfig.get().runtime.output_dir))
