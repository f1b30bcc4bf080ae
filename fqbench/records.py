"""Run records: one ``result.json`` per job, written atomically, and what a record must say.

A record carries the status, the metrics, honest and nominal bits, per-layer
records, time, peak memory, library versions, device, git sha, seed, the
resolved config and its hash. ``config_hash`` identifies a job by what it
computes, so that re-runs can find and skip jobs that are already complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

RECORD_NAME = "result.json"

# Top-level config keys that do not change what a job computes.
NON_SEMANTIC_KEYS = ("runs_root", "rerun", "tracking", "hydra", "save", "progress")


def config_hash(config: dict) -> str:
    """A stable hash of the resolved config, ignoring keys that do not change results."""
    semantic = {k: v for k, v in config.items() if k not in NON_SEMANTIC_KEYS}
    text = json.dumps(semantic, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_record(directory: str | os.PathLike, record: dict) -> Path:
    """Write ``result.json`` atomically: a reader sees the old file or the new one, never half of one."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / RECORD_NAME
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".result.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_jsonable(record), f, indent=1, allow_nan=True)
            f.flush()
            os.fsync(f.fileno())
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
        return value  # json writes NaN/Infinity; the loader reads them back
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
