"""Sweeps under faults, through the CLI on the offline default model (a tiny recipe of it).

A failing job makes a joblib sweep print a summary and exit non-zero; two identical
sweeps started together into one runs root run each job exactly once.
"""

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from fqbench.records import read_record

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.build.hidden_size=32", "model.build.intermediate_size=64", "model.build.layers=2",
        "model.build.heads=2", "model.build.steps=2", "model.build.warmup=1", "calib.nsamples=4",
        "eval.fp_baseline=false", "engine.progress=false", "threads=1"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return {**os.environ, "FQBENCH_CACHE": str(cache), "HYDRA_FULL_ERROR": "1"}


def start(env, *args):
    return subprocess.Popen([sys.executable, "-m", "fqbench", "-m", *args, *TINY], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process) -> tuple[int, str]:
    output, _ = process.communicate(timeout=600)
    return process.returncode, output


def test_a_failing_job_makes_a_joblib_sweep_exit_nonzero_after_a_summary(env, tmp_path):
    sweep_dir = tmp_path / "sweep"
    code, output = finish(start(env, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "method=gptq", "bits=0,2",
                                f"runs_root={tmp_path / 'runs'}", f"hydra.sweep.dir={sweep_dir}"))
    assert code == 1, output[-3000:]
    summary = output[output.index("sweep summary"):]
    assert "2 jobs: 1 finished, 0 skipped, 1 failed" in summary
    assert "failed   #0 bits=0: ValueError: bits=0 is not supported" in summary
    assert f"record: {sweep_dir / '0' / 'result.json'}" in summary
    assert f"finished #1 bits=2: {sweep_dir / '1' / 'result.json'}" in summary
    assert read_record(sweep_dir / "1" / "result.json")["status"] == "ok"


def test_two_identical_sweeps_started_together_run_each_job_once(env, tmp_path):
    args = ["method=rtn", "bits=2,3,4", f"runs_root={tmp_path / 'runs'}", "name=twin"]
    sweeps = [start(env, *args), start(env, *args)]
    results = [finish(s) for s in sweeps]
    assert [code for code, _ in results] == [0, 0], [out[-3000:] for _, out in results]
    records = [read_record(p) for p in (tmp_path / "runs").rglob("result.json")]
    assert len(records) == 3 and all(r["status"] == "ok" for r in records)
    assert Counter(r["config"]["method"]["bits"] for r in records) == {2: 1, 3: 1, 4: 1}
    summaries = [out[out.index("sweep summary"):] for _, out in results]
    assert sum(int(s.split(" finished")[0].rsplit(" ", 1)[1]) for s in summaries) == 3
    assert sum(s.count("claimed by") + s.count("already finished") for s in summaries) == 3
    assert not list((tmp_path / "runs" / ".claims").iterdir())  # every claim released
