"""Real multiruns of the app on the offline default model (a tiny recipe of it), through the CLI.

Sweep 1 (joblib launcher, two processes): GPTQ and RTN at 2 and 3 bits write four
finished records. Sweep 2, the identical command, skips all four. Sweep 3 (basic
launcher, one process, W&B offline): a job with an invalid bit width fails and is
recorded, the next job still runs, the sweep exits with status 1 after its
summary, and each job's W&B run was finished and has its config and metrics.
"""

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fqbench.records import load, read_record

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.build.hidden_size=32", "model.build.intermediate_size=64", "model.build.layers=2",
        "model.build.heads=2", "model.build.steps=2", "model.build.warmup=1", "calib.nsamples=4",
        "eval.fp_baseline=false", "engine.progress=false", "threads=1"]


def fqbench(*args, env=None, exit_code=0):
    result = subprocess.run([sys.executable, "-m", "fqbench", *args], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "HYDRA_FULL_ERROR": "1", **(env or {})}, timeout=900)
    assert result.returncode == exit_code, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    env = {"FQBENCH_CACHE": str(root / "cache"), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    args = ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "method=gptq,rtn", "bits=2,3",
            f"runs_root={root / 'runs'}", "name=pair", *TINY]
    first = fqbench(*args, env=env)
    first_records = sorted((root / "runs").rglob("result.json"))
    second = fqbench(*args, env=env)
    third = fqbench("-m", "method=gptq", "bits=9,4", "tracking=wandb", f"tracking.dir={root / 'wandb'}",
                    f"runs_root={root / 'runs'}", "name=failing", *TINY, env=env, exit_code=1)
    return {"root": root, "runs": root / "runs", "first": first, "first_records": first_records, "second": second,
            "third": third}


def test_a_sweep_writes_one_finished_record_per_job(sweep):
    records = [read_record(p) for p in sweep["first_records"]]
    assert len(records) == 4
    assert sorted((r["method"], r["config"]["method"]["bits"]) for r in records) == [
        ("gptq", 2), ("gptq", 3), ("rtn", 2), ("rtn", 3)]
    for r in records:
        assert r["status"] == "ok" and r["sweep"] == "pair"
        assert r["metrics"]["pystdlib_ppl"] > 1
        assert r["bits_per_weight"] > r["config"]["method"]["bits"]  # codes plus per-row scales and zeros
        assert r["nominal_bits"] == r["config"]["method"]["bits"]
        assert len(r["layers"]) == 2 * 7 and all(layer["proxy_error"] >= 0 for layer in r["layers"])
        assert r["choices"]["model"] == "pystdlib_llama" and r["choices"]["method"] == r["method"]
        assert r["versions"]["torch"] and "fqbench_git_sha" in r["versions"]
        assert r["device"] == "cpu" and r["seconds"] > 0 and r["peak_memory_bytes"]["cpu_rss"] > 0
    assert len({r["config_hash"] for r in records}) == 4
    # the four jobs shared one trained checkpoint (built once under the cache lock)
    checkpoints = [p for p in (sweep["root"] / "cache").iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(checkpoints) == 1 and {r["model_path"] for r in records} == {str(checkpoints[0])}


def test_the_identical_sweep_skips_every_finished_job(sweep):
    pair = [p for p in sweep["runs"].rglob("result.json") if read_record(p)["sweep"] == "pair"]
    assert sorted(pair) == sweep["first_records"]
    assert sweep["second"].count("skipping: config") == 4


def test_a_failed_job_is_recorded_and_the_sweep_goes_on(sweep):
    failing = {read_record(p)["config"]["method"]["bits"]: read_record(p)
               for p in sweep["runs"].rglob("result.json") if read_record(p)["sweep"] == "failing"}
    assert failing[9]["status"] == "failed"
    assert "bits=9 is not supported" in failing[9]["error"] and "Traceback" in failing[9]["traceback"]
    assert failing[4]["status"] == "ok" and failing[4]["metrics"]["pystdlib_ppl"] > 1
    assert "2 jobs: 1 finished, 0 skipped, 1 failed" in sweep["third"]  # the summary; the exit status was 1


def test_records_load_into_one_dataframe(sweep):
    frame = load(sweep["runs"])
    assert len(frame) == 6
    assert set(frame["status"]) == {"ok", "failed"}
    ok = frame[frame.status == "ok"]
    assert ok["metrics.pystdlib_ppl"].notna().all() and set(ok["config.method.bits"]) == {2, 3, 4}
    assert {"bits_per_weight", "nominal_bits", "config_hash", "choices.model", "versions.torch"} <= set(frame)


def read_run(run_dir: Path, timeout: float = 60.0) -> dict:
    """What a finished offline W&B run wrote, waiting for W&B's service process to flush the exit record."""
    deadline = time.monotonic() + timeout
    while True:
        run = read_run_log(run_dir)
        if "exit_code" in run or time.monotonic() > deadline:
            return run
        time.sleep(0.2)


def read_run_log(run_dir: Path) -> dict:
    """An offline W&B run's ``run-<id>.wandb`` log (LevelDB log format of protobuf records), as far as written."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    run = {"history": {}, "summary": {}, "tables": []}
    position, block, pending = 7, 32768, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        chunk = data[position + 7:position + 7 + length]
        position += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # FULL/FIRST start a record
        if kind not in (1, 4):  # not FULL/LAST: the record continues
            continue
        record = pb.Record()
        record.ParseFromString(pending)
        field = record.WhichOneof("record_type")
        if field == "run":
            run.update(id=record.run.run_id, group=record.run.run_group, job_type=record.run.job_type,
                       config={u.key: json.loads(u.value_json) for u in record.run.config.update})
        elif field == "history":
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                if key == "layers/_type" and json.loads(item.value_json) == "table-file":
                    run["tables"].append("layers")
                run["history"][key] = json.loads(item.value_json)
        elif field == "summary":
            run["summary"].update({u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in record.summary.update})
        elif field == "exit":
            run["exit_code"] = record.exit.exit_code
    return run


def test_wandb_offline_runs_hold_config_and_metrics(sweep):
    runs = sorted((sweep["root"] / "wandb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2  # one run per job, each finished before the next began
    records = {read_record(p)["config_hash"]: read_record(p)
               for p in sweep["runs"].rglob("result.json") if read_record(p)["sweep"] == "failing"}
    for run_dir in runs:
        run = read_run(run_dir)
        record = records[run["id"]]  # the run id is the job's config hash
        assert run["group"] == "failing" and run["job_type"] == "gptq"
        assert run["config"]["method"]["bits"] == record["config"]["method"]["bits"]
        assert run["exit_code"] == (0 if record["status"] == "ok" else 1)
        if record["status"] == "ok":
            assert run["history"]["metrics/pystdlib_ppl"] == pytest.approx(record["metrics"]["pystdlib_ppl"])
            assert run["summary"]["bits_per_weight"] == pytest.approx(record["bits_per_weight"])
            assert run["tables"] == ["layers"]
