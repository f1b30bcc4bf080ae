"""The Hydra application: ``python -m fqbench model=... method=... bits=2 redundancy=1.1 [-m]``.

One job = one model, one method configuration: run the task's pipeline and
write ``result.json`` atomically in the job's output directory, whether the
job succeeds or fails (a failed job in a sweep is recorded and the sweep goes on).
A job whose config already has a finished record under ``runs_root`` (or the
sweep's folder) is skipped (``rerun=true`` runs it again): Hydra sweeps resume by
re-running the command. A job claims its config hash first (``fqbench.claims``):
concurrent sweeps on one runs root run each job once.
"""

from __future__ import annotations

import logging
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import call
from omegaconf import DictConfig, OmegaConf, open_dict

from fqbench.claims import Claim, claim, keep_replaced_record
from fqbench.config import CONF_DIR, register_schemas
from fqbench.config_checks import check_config
from fqbench.finite import check_metrics
from fqbench.methods import build_method
from fqbench.pipelines import run_pipeline
from fqbench.records import (
    RECORD_NAME, config_hash, device_info, effective_redundancy, find_finished, peak_memory_bytes, read_record,
    versions, write_record,
)
from fqbench.seeding import seed_everything
from fqbench.tracking import make_tracker

log = logging.getLogger("fqbench")

# Config groups recorded with every job (the choices behind the resolved config).
GROUPS = ("model", "method", "data", "tracking", "variant", "experiment", "method/solver")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device={name!r} is not a device; use device=auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but no CUDA device is available; use device=cpu or device=auto")
    return device


def prepare_model(cfg: DictConfig) -> str:
    """Build the checkpoint a model config describes (``model.build``, e.g. the offline default's
    tiny trained model; cached by the builder) and point ``model.path`` at it."""
    path = str(call(cfg.model.build))
    with open_dict(cfg.model):
        cfg.model.path = path
    return path


def run_job(cfg: DictConfig, output_dir: Path, choices: dict | None = None) -> dict:
    """Run one job (or skip it when its config already has a finished record, or another job holds its
    claim) and return its record; a skipped job's record says why under ``skipped``."""
    check_config(cfg)  # before any work: a bad number is an error, not a record
    resolved = OmegaConf.to_container(cfg, resolve=True)
    digest = config_hash(resolved)
    roots = _resume_roots(cfg, output_dir)
    if not cfg.rerun and (previous := _finished_record(cfg, roots, digest)) is not None:
        return previous
    held = claim(cfg.runs_root, digest, Path(output_dir) / RECORD_NAME, timeout=cfg.claim_timeout)
    if not isinstance(held, Claim):
        log.info("skipping: config %s is being run by %s", digest, held.describe())
        return {"status": "skipped", "skipped": f"claimed by {held.describe()}", "config_hash": digest,
                "config": resolved, "choices": choices or {}}
    with held:
        # a job of this config may have finished between the look-up and the claim
        if not cfg.rerun and (previous := _finished_record(cfg, roots, digest)) is not None:
            return previous
        keep_replaced_record(output_dir, digest)
        return _run_claimed(cfg, output_dir, choices, resolved, digest)


def _resume_roots(cfg: DictConfig, output_dir: Path) -> list[Path]:
    """Where finished records are looked up: the runs root, the sweep folder (which may lie elsewhere), the job's."""
    roots = [Path(cfg.runs_root), Path(output_dir)]
    if _in_multirun():
        roots.append(Path(HydraConfig.get().sweep.dir))
    return roots


def _finished_record(cfg: DictConfig, roots: list[Path], digest: str) -> dict | None:
    """The finished record that makes this job a skip, marked with why; None when the job must run."""
    existing = find_finished(roots, digest)
    if existing is None:
        return None
    previous = read_record(existing)
    # save=true is not part of the hash, but a record without its packed model does not satisfy it.
    if cfg.get("save"):
        packed = (previous.get("packed") or {}).get("directory")
        if not packed or not (Path(packed) / "config.json").is_file():
            log.warning("running again: the finished record %s has no packed checkpoint%s; save=true writes one",
                        existing, f" (missing: {packed})" if packed else "")
            return None
    log.info("skipping: config %s already has a finished record %s (rerun=true runs it again)", digest, existing)
    return {**previous, "skipped": f"already finished: {existing}"}


def _run_claimed(cfg: DictConfig, output_dir: Path, choices: dict | None, resolved: dict, digest: str) -> dict:
    """Run a job whose claim this process holds: its record says running, then ok or failed."""
    record = {
        "status": "running",
        "sweep": cfg.name,
        "choices": choices or {},
        "config": resolved,
        "config_hash": digest,
        "seed": cfg.seed,
        "versions": versions(),
        "started_at": _now(),
    }
    write_record(output_dir, record)  # a killed job leaves status "running", never a half-written file
    tracker = make_tracker(cfg.tracking)
    start = time.perf_counter()
    device = torch.device("cpu")
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        device = resolve_device(cfg.device)
        record.update(device_info(device))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        tracker.start(run_id=digest, name=job_label(choices or {}, resolved), group=cfg.name,
                      job_type=(choices or {}).get("method") or "method",
                      config={**resolved, "config_hash": digest, "choices": choices or {}})
        method = build_method(cfg.method)
        record["method"] = method.name
        if cfg.model.get("build") is not None:
            record["model_path"] = prepare_model(cfg)
        seed_everything(cfg.seed)
        result = run_pipeline(cfg, method, device, output_dir)
        summary = result.get("summary", {})
        layers = result.get("layers", [])
        record.update(
            status="ok",
            metrics=result["metrics"],
            bits_per_weight=summary.get("bits_per_weight"),
            nominal_bits=summary.get("nominal_bits"),
            effective_redundancy=summary.get("effective_redundancy", effective_redundancy(layers)),
            summary=summary,
            layers=layers,
            **{k: v for k, v in result.items() if k not in ("metrics", "layers", "summary")},
        )
        check_metrics(record["metrics"])  # a NaN result is a failure, not a finished record
    except Exception as error:  # recorded, then re-raised unless a sweep must go on
        record.update(status="failed", error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
        log.error("job failed: %s", record["error"])
        _finish(record, start, device, output_dir, tracker)
        if not _in_multirun():
            raise
        return record
    print(describe(record, _finish(record, start, device, output_dir, tracker)))
    return record


def job_label(choices: dict, resolved: dict) -> str:
    """A short human name for a job: model, variant or method, bits."""
    model = choices.get("model") or resolved.get("model", {}).get("name", "model")
    recipe = choices.get("variant") or choices.get("method") or "method"
    return f"{model}/{recipe}/w{resolved.get('method', {}).get('bits', '-')}"


def describe(record: dict, path: Path | None = None) -> str:
    """The end-of-job summary: quality at full precision (when measured in the job) and quantized, and the bits."""
    method = record["config"].get("method", {})
    options = ", ".join(f"{k} {method[k]}" for k in ("bits", "redundancy") if k in method)
    lines = [f"{job_label(record.get('choices', {}), record['config'])} ({record.get('method')}"
             f"{': ' + options if options else ''}): {record['status']} in {record.get('seconds', float('nan')):.0f} s"]
    numbers = dict(_flat_numbers(record.get("metrics") or {}))
    names = [n for n in numbers if not n.startswith("fp_")]
    if names:
        lines.append(f"  {'metric':<28} {'full precision':>15} {'quantized':>12}")
        for name in names:
            fp = numbers.get(f"fp_{name}")
            lines.append(f"  {name:<28} {'-' if fp is None else f'{fp:.4g}':>15} {numbers[name]:>12.4g}")
    bits = record.get("bits_per_weight")
    if bits is not None:
        line = f"  bits per weight: {bits:.4g} honest (codes, scales, zero points, transform seeds)"
        if record.get("nominal_bits") is not None:
            line += f", {record['nominal_bits']:.4g} nominal"
        lines.append(line)
    if record.get("effective_redundancy") is not None:
        lines.append(f"  stored coefficients per weight: {record['effective_redundancy']:.4g}")
    if path is not None:
        lines.append(f"  record: {path}")
    return "\n".join(lines)


def _flat_numbers(metrics: dict, prefix: str = ""):
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flat_numbers(value, name + ".")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield name, value


def _finish(record, start, device, output_dir, tracker) -> Path:
    record["seconds"] = time.perf_counter() - start
    record["peak_memory_bytes"] = peak_memory_bytes(device)
    record["finished_at"] = _now()
    try:
        if record["status"] == "ok":
            tracker.log_result(record)
    finally:
        tracker.finish(failed=record["status"] != "ok")
        path = write_record(output_dir, record)
        log.info("wrote %s (status %s)", path, record["status"])
    return path


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


register_schemas()  # the method yaml files name their schemas; Hydra composes when main() runs


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> dict:
    hydra_cfg = HydraConfig.get()
    choices = {group: hydra_cfg.runtime.choices.get(group) for group in GROUPS}
    try:
        return run_job(cfg, Path(hydra_cfg.runtime.output_dir), choices)
    except Exception as error:  # failed before its record existed; the sweep's summary lists it
        if not _in_multirun():
            raise
        log.error("job failed: %s: %s", type(error).__name__, error)
        return {"status": "failed", "error": f"{type(error).__name__}: {error}"}
