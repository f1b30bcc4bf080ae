"""The end of a sweep: a summary of its jobs and a non-zero exit code when any failed (a Hydra callback).

Hydra calls ``on_job_end`` where the job ran (this process with the basic launcher,
a worker process with joblib, a cluster node with submitit), so each job writes its
outcome to ``<sweep dir>/.outcomes/<job number>.json``; ``on_multirun_end`` runs in
the launching process after every job has returned, prints the summary (finished,
skipped and why, failed with the error and the record) and exits with status 1
when a job failed. Hydra turns exceptions raised by callbacks into warnings, so
the exit is a ``SystemExit``, raised after the summary is printed.

At the start of a sweep (or a single run), ``running`` records whose job is gone
(``fqbench.claims.mark_stale_records``) are marked ``interrupted``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from hydra.core.utils import JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from fqbench.claims import mark_stale_records
from fqbench.records import RECORD_NAME

OUTCOMES_DIR = ".outcomes"
EXIT_FAILED = 1

log = logging.getLogger("fqbench")


class SweepSummary(Callback):
    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        _mark_stale(config)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        shutil.rmtree(Path(config.hydra.sweep.dir) / OUTCOMES_DIR, ignore_errors=True)  # a re-used sweep folder
        _mark_stale(config)

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        write_outcome(Path(config.hydra.sweep.dir), config.hydra.job.num,
                      outcome(job_return, Path(config.hydra.runtime.output_dir)))

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        outcomes = read_outcomes(Path(config.hydra.sweep.dir))
        print(summary(outcomes, config.hydra.sweep.dir), flush=True)
        if any(o["status"] == "failed" for o in outcomes):
            sys.stderr.flush()
            raise SystemExit(EXIT_FAILED)


def _mark_stale(config: DictConfig) -> None:
    marked = mark_stale_records(config.runs_root, timeout=config.claim_timeout)
    if marked:
        log.warning("marked %d stale running record(s) interrupted: %s", len(marked), ", ".join(map(str, marked)))


def outcome(job_return, output_dir: Path) -> dict:
    """What became of one job: ``finished``, ``skipped`` (with the reason) or ``failed`` (with the error)."""
    record = output_dir / RECORD_NAME
    found = {"overrides": list(job_return.overrides or []), "record": str(record) if record.is_file() else None}
    if job_return.status != JobStatus.COMPLETED:
        error = job_return._return_value  # the public accessor re-raises it
        return {**found, "status": "failed", "error": f"{type(error).__name__}: {error}"}
    value = job_return.return_value if isinstance(job_return.return_value, dict) else {}
    if value.get("skipped"):
        return {**found, "status": "skipped", "reason": value["skipped"]}
    if value.get("status") == "ok":
        return {**found, "status": "finished"}
    return {**found, "status": "failed", "error": value.get("error") or f"status {value.get('status')!r}"}


def write_outcome(sweep_dir: Path, number: int, found: dict) -> None:
    directory = sweep_dir / OUTCOMES_DIR
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump({"job": number, **found}, f)
    os.replace(tmp, directory / f"{number}.json")


def read_outcomes(sweep_dir: Path) -> list[dict]:
    outcomes = []
    for path in (sweep_dir / OUTCOMES_DIR).glob("*.json"):
        try:
            outcomes.append(json.loads(path.read_text()))
        except (OSError, ValueError) as error:
            log.warning("unreadable job outcome %s: %s", path, error)
    return sorted(outcomes, key=lambda o: o["job"])


def summary(outcomes: list[dict], sweep_dir) -> str:
    """One line per job, named by the overrides that differ between the jobs."""
    shared = set.intersection(*(set(o["overrides"]) for o in outcomes)) if len(outcomes) > 1 else set()
    counts = {status: sum(o["status"] == status for o in outcomes) for status in ("finished", "skipped", "failed")}
    lines = [f"sweep summary ({sweep_dir}): {len(outcomes)} jobs: "
             + ", ".join(f"{n} {status}" for status, n in counts.items())]
    for o in outcomes:
        head = f"  {o['status']:<8} #{o['job']} {' '.join(x for x in o['overrides'] if x not in shared)}"
        if o["status"] == "skipped":
            lines.append(f"{head}: {o['reason']}")
        elif o["status"] == "failed":
            lines.append(f"{head}: {o['error']}")
            lines.append(f"  {'':<8} record: {o['record'] or '(none written)'}")
        else:
            lines.append(f"{head}: {o['record']}")
    return "\n".join(lines)
