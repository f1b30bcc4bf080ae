"""Tracking backends in-process: W&B offline (no network) resumes a run by its deterministic id; none logs nothing."""

import pytest
from omegaconf import OmegaConf

from fqbench.tracking import TRACKERS, Tracker, WandbTracker, make_tracker
from test_app_sweep import read_run

RECORD = {
    "status": "ok", "method": "framequant", "bits_per_weight": 2.56, "nominal_bits": 2.2,
    "effective_redundancy": 1.27, "seconds": 1.5, "config_hash": "0123456789abcdef",
    "metrics": {"pystdlib_ppl": 7.5, "fp_pystdlib_ppl": 6.25},
    "layers": [{"name": "model.layers.0.mlp.up_proj", "shape": [256, 128], "proxy_error": 0.01,
                "bits_per_weight": 2.56, "nominal_bits": 2.2, "effective_redundancy": 1.27, "damping": 0.01,
                "seconds": 0.1}],
}


def wandb_cfg(tmp_path, **overrides):
    return OmegaConf.create({"backend": "wandb", "project": "fqbench-test", "entity": None, "mode": "offline",
                             "group": None, "tags": ["test"], "dir": str(tmp_path), **overrides})


def run_once(tmp_path, run_id="0123456789abcdef", failed=False):
    tracker = make_tracker(wandb_cfg(tmp_path))
    assert isinstance(tracker, WandbTracker)
    tracker.start(run_id=run_id, name="pystdlib_llama/framequant/w2", group="sweep-a", job_type="framequant",
                  config={"method": {"bits": 2, "redundancy": 1.1}, "config_hash": run_id})
    if not failed:
        tracker.log_result(RECORD)
    tracker.finish(failed=failed)
    assert tracker.run is None


def test_wandb_offline_writes_config_metrics_and_layer_table(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_once(tmp_path)
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*-0123456789abcdef")
    run = read_run(run_dir)
    assert (run["id"], run["group"], run["job_type"]) == ("0123456789abcdef", "sweep-a", "framequant")
    assert run["config"]["method"] == {"bits": 2, "redundancy": 1.1}
    assert run["history"]["metrics/pystdlib_ppl"] == 7.5 and run["history"]["metrics/fp_pystdlib_ppl"] == 6.25
    assert run["summary"]["bits_per_weight"] == 2.56 and run["summary"]["status"] == "ok"
    assert run["tables"] == ["layers"] and run["exit_code"] == 0
    (table,) = run_dir.glob("files/media/table/layers_*.table.json")
    content = OmegaConf.to_container(OmegaConf.load(table))
    assert content["columns"][:3] == ["name", "rows", "cols"]
    assert content["data"] == [["model.layers.0.mlp.up_proj", 256, 128, 0.01, 2.56, 2.2, 1.27, 0.01, 0.1]]


def test_a_rerun_resumes_the_same_run_id_and_a_failure_exits_nonzero(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_once(tmp_path)
    run_once(tmp_path, failed=True)
    runs = [read_run(r) for r in sorted((tmp_path / "wandb").glob("offline-run-*"))]
    assert [(r["id"], r["exit_code"]) for r in runs] == [("0123456789abcdef", 0), ("0123456789abcdef", 1)]


def test_tracking_none_logs_nothing(tmp_path):
    tracker = make_tracker(OmegaConf.create({"backend": "none"}))
    assert type(tracker) is Tracker
    tracker.start(run_id="x", name="n", group="g", job_type="fp", config={})
    tracker.log_result(RECORD)
    tracker.finish()
    assert not list(tmp_path.iterdir())


def test_unknown_backend_lists_the_choices():
    with pytest.raises(ValueError, match="choose tracking= one of none, wandb"):
        make_tracker(OmegaConf.create({"backend": "mlflow"}))
    assert set(TRACKERS) == {"none", "wandb"}
