"""Run records: one ``result.json`` per job, written atomically, and what a record must say.

A record carries the status, the metrics, honest and nominal bits, the effective
redundancy, per-layer records, time, peak memory, library versions, device, git
sha, seed, the resolved config and its hash. ``config_hash`` identifies a job by
what it computes, so that re-runs can find and skip jobs that are already
complete (``find_finished``); ``load(root)`` indexes every record under a runs
root into one pandas DataFrame.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from fqbench.finite import nonfinite_paths
from fqbench.umask import apply_umask

RECORD_NAME = "result.json"
FINISHED = "ok"

log = logging.getLogger(__name__)


@dataclass
class LayerRecord:
    """What a run records for every quantized linear (the ``layers`` list of ``result.json``)."""

    name: str
    shape: tuple[int, int]
    proxy_error: float
    seconds: float
    damping: float | None
    bits_per_weight: float
    nominal_bits: float
    effective_redundancy: float | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

# Config keys (dotted paths) that do not change what a job computes: where it
# runs and writes (runs_root, device, data.root and data.hub, threads, claim_timeout, evaluation batch size
# and loader workers), how it reports (tracking, progress bars, the sweep's
# name), whether it re-runs, and the
# top-level shortcuts ``bits``/``redundancy``, whose values reach the job only
# through the method config they interpolate (so ``method=fp`` at bits 2 and 3
# is one job). ``device`` is recorded with every result: a CUDA and a CPU run
# of one config differ only by floating-point rounding.
NON_SEMANTIC_KEYS = (
    "runs_root", "rerun", "tracking", "hydra", "save", "progress", "engine.progress",
    "device", "threads", "data.root", "data.hub", "eval.batch_size", "eval.workers", "name", "bits", "redundancy",
    "claim_timeout",
)


def config_hash(config: dict) -> str:
    """A stable hash of the resolved config, ignoring keys that do not change results."""
    semantic = _drop_paths(config, NON_SEMANTIC_KEYS)
    text = json.dumps(semantic, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _drop_paths(config: dict, paths) -> dict:
    heads: dict[str, list[str]] = {}
    dropped = set()
    for path in paths:
        head, _, rest = path.partition(".")
        if rest:
            heads.setdefault(head, []).append(rest)
        else:
            dropped.add(head)
    kept = {}
    for key, value in config.items():
        if key in dropped:
            continue
        if key in heads and isinstance(value, dict):
            value = _drop_paths(value, heads[key])
        kept[key] = value
    return kept


def write_record(directory: str | os.PathLike, record: dict) -> Path:
    """Write ``result.json`` atomically: a reader sees the old file or the new one, never half of one.

    Strict JSON: NaN/Inf numbers are written as null, their dotted paths listed under ``non_finite``.
    """
    return write_json(Path(directory) / RECORD_NAME, record)


def write_json(path: str | os.PathLike, value) -> Path:
    """Write ``value`` (a dict or a list) as strict JSON atomically, creating the folder; NaN/Inf numbers become
    null, and a dict lists their dotted paths under ``non_finite``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        payload = _jsonable(value)
        if isinstance(value, dict) and nonfinite_paths(value):
            payload["non_finite"] = nonfinite_paths(value)
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        apply_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_record(path: str | os.PathLike) -> dict:
    with open(path) as f:
        return json.load(f)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def versions() -> dict:
    import importlib.metadata as md

    found = {"python": platform.python_version(), "fqbench_git_sha": git_sha()}
    for package in ("torch", "transformers", "timm", "lm_eval", "hydra-core", "fqbench"):
        try:
            found[package] = md.version(package)
        except md.PackageNotFoundError:
            found[package] = None
    return found


def git_sha() -> str | None:
    """The commit of the fqbench checkout, with ``-dirty`` when it has uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha + ("-dirty" if dirty else "")


def device_info(device: torch.device) -> dict:
    info = {"device": str(device), "host": platform.node(), "platform": platform.platform(),
            "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def peak_memory_bytes(device: torch.device) -> dict:
    """Peak accelerator memory (when on a GPU) and peak resident CPU memory of this process."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = {"cpu_rss": rss if sys.platform == "darwin" else rss * 1024}
    if device.type == "cuda":
        peak["accelerator"] = torch.cuda.max_memory_allocated(device)
    return peak


def effective_redundancy(layers: list[dict]) -> float | None:
    """The model's redundancy: layers' effective redundancies weighted by their weight counts."""
    pairs = [(l["effective_redundancy"], l["shape"][0] * l["shape"][1]) for l in layers
             if l.get("effective_redundancy") is not None]
    total = sum(w for _, w in pairs)
    return sum(r * w for r, w in pairs) / total if total else None


def iter_records(root: str | os.PathLike) -> Iterator[tuple[Path, dict]]:
    """Every ``result.json`` under ``root`` (sorted by path), with its path; unreadable files are skipped with a warning."""
    root = Path(root)
    if not root.is_dir():
        return
    paths = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith(".") and d != "wandb")  # .hydra, .submitit
        if RECORD_NAME in files:
            paths.append(Path(directory) / RECORD_NAME)
    for path in sorted(paths):
        try:
            yield path, read_record(path)
        except (OSError, ValueError) as error:
            log.warning("skipping unreadable record %s: %s", path, error)


def find_finished(roots: str | os.PathLike | list, config_hash: str) -> Path | None:
    """The newest finished record under ``roots`` (a folder or several) for a config hash, or None.

    A record whose metrics are NaN/Inf (written before such jobs failed) is not finished.
    """
    roots = [roots] if isinstance(roots, (str, os.PathLike)) else roots
    records = {path.resolve(): record for root in roots for path, record in iter_records(root)}
    found = [(record.get("finished_at") or "", path) for path, record in records.items()
             if record.get("config_hash") == config_hash and record.get("status") == FINISHED
             and not nonfinite_paths(record.get("metrics") or {})]
    return max(found)[1] if found else None


def flatten(value, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    if not isinstance(value, dict):
        return {prefix: value}
    flat = {}
    for key, item in value.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(item, dict) and item:
            flat.update(flatten(item, name))
        else:
            flat[name] = item
    return flat


_INDEX_SKIP = ("layers", "traceback")


def load(root: str | os.PathLike, *, status: str | None = None, latest: bool = False):
    """All records under ``root`` as one pandas DataFrame, one row per record.

    Nested fields are flattened to dotted columns (``metrics.wikitext2.ppl``,
    ``config.method.redundancy``, ``versions.torch``, ``choices.model``); ``path``
    is the record's directory. Per-layer records are left out (``load_layers``).
    ``status="ok"`` keeps finished jobs; ``latest=True`` keeps the newest record
    of every config hash.
    """
    import pandas as pd

    rows = []
    for path, record in iter_records(root):
        if status is not None and record.get("status") != status:
            continue
        row = flatten({k: v for k, v in record.items() if k not in _INDEX_SKIP})
        row["path"] = str(path.parent)
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    if latest:
        order = frame["finished_at"].fillna("") if "finished_at" in frame else frame["path"]
        frame = frame.assign(_order=order).sort_values("_order").drop_duplicates("config_hash", keep="last")
        frame = frame.drop(columns="_order").sort_values("path")
    return frame.reset_index(drop=True)


def load_layers(root: str | os.PathLike, *, status: str | None = FINISHED):
    """The per-layer records of every record under ``root``: one row per quantized layer."""
    import pandas as pd

    rows = []
    for path, record in iter_records(root):
        if status is not None and record.get("status") != status:
            continue
        for layer in record.get("layers") or []:
            rows.append({"path": str(path.parent), "config_hash": record.get("config_hash"),
                         "method": record.get("method"), **flatten(layer)})
    return pd.DataFrame(rows)
