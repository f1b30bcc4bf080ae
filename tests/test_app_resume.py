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


def test_save_is_satisfied_by_a_record_with_its_packed_checkpoint(job, tmp_path):
    compose_job, finished = job
    cfg = compose_job("save=true")
    packed = tmp_path / "runs" / "old" / "packed"
    finished(cfg, save=True)
    with pytest.raises(ValueError, match="bits=9 is not supported"):  # says save: true, but has no packed model
        run_job(cfg, tmp_path / "new")
    record = read_record(tmp_path / "runs" / "old" / "result.json")
    write_record(tmp_path / "runs" / "old", {**record, "packed": {"directory": str(packed)}})
    packed.mkdir()
    (packed / "config.json").write_text("{}")
    assert run_job(cfg, tmp_path / "newer")["skipped"]
    (packed / "config.json").unlink()  # the packed folder was deleted: run again, and write it
    with pytest.raises(ValueError, match="bits=9 is not supported"):
        run_job(cfg, tmp_path / "newest")


def test_a_finished_record_in_the_job_folder_is_never_overwritten_silently(job, tmp_path, caplog):
    compose_job, finished = job
    cfg = compose_job("rerun=true")
    finished(cfg)
    old = tmp_path / "runs" / "old"
    (old / "packed").mkdir()
    with pytest.raises(ValueError, match="bits=9"):
        run_job(cfg, old)  # rerun=true into the folder of its own finished record
    (kept,) = old.glob("result.replaced-*.json")
    assert read_record(kept)["status"] == "ok" and read_record(old / "result.json")["status"] == "failed"
    assert list(old.glob("packed.replaced-*")) and "kept as" in caplog.text
    other = compose_job("seed=5")
    write_record(old, {**read_record(kept), "config_hash": "another"})
    with pytest.raises(FileExistsError, match="finished record of another config"):
        run_job(other, old)
    assert read_record(old / "result.json")["config_hash"] == "another"


@pytest.mark.parametrize("override, key", [("eval.seqlen=0", "eval.seqlen=0"), ("calib.nsamples=0", "calib.nsamples=0"),
                                           ("calib.seqlen=-8", "calib.seqlen=-8"), ("threads=0", "threads=0"),
                                           ("claim_timeout=-1", "claim_timeout=-1")])
def test_invalid_numbers_fail_before_any_work(job, tmp_path, override, key):
    compose_job, _ = job
    with pytest.raises(ValueError, match=f"^{key} is invalid"):
        run_job(compose_job(override), tmp_path / "new")
    assert not (tmp_path / "new").exists() and not (tmp_path / "runs").exists()


def test_failed_and_running_records_do_not_count(job, tmp_path):
    compose_job, _ = job
    cfg = compose_job()
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for status in ("failed", "running"):
        write_record(tmp_path / "runs" / status, {"status": status, "config": resolved,
                                                  "config_hash": config_hash(resolved)})
    with pytest.raises(ValueError):
        run_job(cfg, tmp_path / "new")


def test_a_sweep_folder_outside_the_runs_root_is_searched_too(job, tmp_path):
    """hydra.sweep.dir may lie outside runs_root: re-running the sweep must find what finished there."""
    from hydra.core.hydra_config import HydraConfig

    compose_job, _ = job
    sweep_dir = tmp_path / "elsewhere"
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        full = compose("config", overrides=[*FAST_FAIL, f"runs_root={tmp_path / 'runs'}",
                                            f"hydra.sweep.dir={sweep_dir}", "hydra.mode=MULTIRUN"],
                       return_hydra_config=True)
    cfg = compose_job()
    resolved = OmegaConf.to_container(cfg, resolve=True)
    write_record(sweep_dir / "0", {"status": "ok", "config": resolved, "config_hash": config_hash(resolved),
                                   "finished_at": "t", "metrics": {"pystdlib_ppl": 1.0}})
    HydraConfig.instance().set_config(full)
    try:
        record = run_job(cfg, sweep_dir / "1")
    finally:
        HydraConfig.instance().cfg = None
    assert record["skipped"] == f"already finished: {sweep_dir / '0' / 'result.json'}"
    assert not (sweep_dir / "1").exists()
