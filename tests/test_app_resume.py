"""When a job is skipped (in-process, with jobs that fail fast when they do run)."""

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from fqbench.app import CONF_DIR, run_job
from fqbench.records import config_hash, read_record, write_record

# A config whose job fails at once when it runs (bits=9 is rejected), so that "it ran" is cheap to see.
FAST_FAIL = ["method=gptq", "method.bits=9", "engine.progress=false"]


@pytest.fixture
def job(tmp_path):
    def compose_job(*overrides):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=[*FAST_FAIL, f"runs_root={tmp_path / 'runs'}", *overrides])
        return cfg

    def finished(cfg, **config_changes):
        resolved = OmegaConf.to_container(cfg, resolve=True)
        write_record(tmp_path / "runs" / "old", {"status": "ok", "config": {**resolved, **config_changes},
                                                 "config_hash": config_hash(resolved), "finished_at": "t",
                                                 "metrics": {"pystdlib_ppl": 1.0}})

    return compose_job, finished


def test_a_finished_config_is_skipped_without_running(job, tmp_path):
    compose_job, finished = job
    cfg = compose_job()
    finished(cfg)
    record = run_job(cfg, tmp_path / "new")
    assert record["skipped"] and record["metrics"] == {"pystdlib_ppl": 1.0}
    assert not (tmp_path / "new").exists()


def test_non_semantic_changes_still_skip(job, tmp_path):
    compose_job, finished = job
    finished(compose_job())
    cfg = compose_job("device=cpu", "name=another_sweep", "threads=1", "tracking=wandb", "redundancy=1.5")
    assert run_job(cfg, tmp_path / "new")["skipped"]


@pytest.mark.parametrize("overrides", [["rerun=true"], ["save=true"], ["seed=1"], ["calib.nsamples=8"]])
def test_rerun_save_and_semantic_changes_run_the_job(job, tmp_path, overrides):
    compose_job, finished = job
    finished(compose_job())
    with pytest.raises(ValueError, match="bits=9 is not supported"):  # it ran (and failed at once)
        run_job(compose_job(*overrides), tmp_path / "new")
    failed = read_record(tmp_path / "new" / "result.json")
    assert failed["status"] == "failed" and "bits=9" in failed["error"]


def test_save_is_satisfied_by_a_record_that_saved(job, tmp_path):
    compose_job, finished = job
    cfg = compose_job("save=true")
    finished(cfg)  # its config says save: true
    assert run_job(cfg, tmp_path / "new")["skipped"]


def test_failed_and_running_records_do_not_count(job, tmp_path):
    compose_job, _ = job
    cfg = compose_job()
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for status in ("failed", "running"):
        write_record(tmp_path / "runs" / status, {"status": status, "config": resolved,
                                                  "config_hash": config_hash(resolved)})
    with pytest.raises(ValueError):
        run_job(cfg, tmp_path / "new")
