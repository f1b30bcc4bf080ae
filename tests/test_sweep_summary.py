"""The sweep callback in-process: stale records marked at the start, outcomes collected, exit status 1 on a failure."""

import pytest
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import RunMode
from omegaconf import OmegaConf

from fqbench.records import read_record, write_record
from fqbench.sweep_summary import SweepSummary


def config(tmp_path, number=0):
    return OmegaConf.create({"runs_root": str(tmp_path / "runs"), "claim_timeout": 600,
                             "hydra": {"mode": RunMode.MULTIRUN, "sweep": {"dir": str(tmp_path / "sweep")},
                                       "job": {"num": number},
                                       "runtime": {"output_dir": str(tmp_path / "sweep" / str(number))}}})


def job_return(overrides, status=JobStatus.COMPLETED, value=None):
    ret = JobReturn(overrides=overrides, status=status)
    ret.return_value = value
    return ret


def test_a_sweep_start_marks_dead_running_records_interrupted(tmp_path):
    killed = write_record(tmp_path / "runs" / "old", {"status": "running", "config_hash": "h1"})
    SweepSummary().on_multirun_start(config(tmp_path))
    assert read_record(killed)["status"] == "interrupted"


def test_the_summary_lists_every_job_and_a_failure_exits_1(tmp_path, capsys):
    callback = SweepSummary()
    callback.on_multirun_start(config(tmp_path))
    write_record(tmp_path / "sweep" / "1", {"status": "ok"})
    outcomes = [job_return(["m=a", "bits=2"], value={"skipped": "already finished: x/result.json"}),
                job_return(["m=a", "bits=3"], value={"status": "ok"}),
                job_return(["m=a", "bits=4"], status=JobStatus.FAILED, value=RuntimeError("boom")),
                job_return(["m=a", "bits=9"], value={"status": "failed", "error": "ValueError: bits=9"})]
    for number, ret in enumerate(outcomes):
        callback.on_job_end(config(tmp_path, number), ret)
    with pytest.raises(SystemExit) as exit_:
        callback.on_multirun_end(config(tmp_path))
    assert exit_.value.code == 1
    out = capsys.readouterr().out
    assert "4 jobs: 1 finished, 1 skipped, 2 failed" in out
    assert "skipped  #0 bits=2: already finished: x/result.json" in out
    assert f"finished #1 bits=3: {tmp_path / 'sweep' / '1' / 'result.json'}" in out
    assert "failed   #2 bits=4: RuntimeError: boom" in out and "(none written)" in out
    assert "failed   #3 bits=9: ValueError: bits=9" in out


def test_a_sweep_without_failures_ends_normally(tmp_path, capsys):
    callback = SweepSummary()
    callback.on_multirun_start(config(tmp_path))
    callback.on_job_end(config(tmp_path), job_return(["bits=2"], value={"status": "ok"}))
    callback.on_multirun_end(config(tmp_path))
    assert "1 jobs: 1 finished, 0 skipped, 0 failed" in capsys.readouterr().out
