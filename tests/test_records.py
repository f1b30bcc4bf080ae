import json
import os

import pytest

from fqbench.records import (
    NON_SEMANTIC_KEYS, RECORD_NAME, config_hash, effective_redundancy, find_finished, flatten, iter_records, load,
    load_layers, read_record, write_record,
)

CONFIG = {
    "model": {"task": "lm", "name": "m", "path": None},
    "method": {"_target_": "baselines.gptq.GPTQConfig", "bits": 2, "percdamp": 0.01},
    "bits": 2, "redundancy": 1.1, "seed": 0, "device": "auto", "runs_root": "runs", "rerun": False, "name": "adhoc",
    "data": {"root": "/data"}, "calib": {"nsamples": 128},
    "eval": {"batch_size": 64, "workers": 4, "seqlen": 2048},
    "engine": {"true_sequential": True, "progress": True}, "tracking": {"backend": "none"},
}


def _with(config, dotted, value):
    """A copy of ``config`` with ``dotted`` set to ``value`` (missing parents are created)."""
    config = json.loads(json.dumps(config))
    node = config
    *parents, last = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return config


@pytest.mark.parametrize("key", NON_SEMANTIC_KEYS)
def test_non_semantic_keys_leave_the_hash_unchanged(key):
    assert config_hash(_with(CONFIG, key, "changed")) == config_hash(CONFIG)


@pytest.mark.parametrize("key, value", [("method.bits", 3), ("method.percdamp", 0.02), ("seed", 1),
                                        ("calib.nsamples", 64), ("eval.seqlen", 4096), ("model.name", "other"),
                                        ("engine.true_sequential", False)])
def test_semantic_keys_change_the_hash(key, value):
    assert config_hash(_with(CONFIG, key, value)) != config_hash(CONFIG)


def test_hash_ignores_key_order():
    reordered = dict(reversed(list(CONFIG.items())))
    assert config_hash(reordered) == config_hash(CONFIG)


def _strict_json(path):
    """Parse a file as strict JSON: NaN and Infinity are not JSON."""
    def refuse(constant):
        raise ValueError(f"{constant} is not strict JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_write_record_is_atomic_strict_json_and_notes_non_finite_numbers(tmp_path):
    record = {"status": "failed", "metrics": {"ppl": float("inf"), "x": float("nan"), "y": 2.0},
              "layers": [{"seconds": float("nan")}]}
    path = write_record(tmp_path / "job", record)
    assert path.name == RECORD_NAME
    assert [p.name for p in path.parent.iterdir()] == [RECORD_NAME]  # no temporary file left behind
    back = _strict_json(path)
    assert back["metrics"] == {"ppl": None, "x": None, "y": 2.0} and back["layers"] == [{"seconds": None}]
    assert back["non_finite"] == ["metrics.ppl", "metrics.x", "layers.0.seconds"]
    assert "non_finite" not in _strict_json(write_record(tmp_path / "fine", {"status": "ok", "metrics": {"y": 1.0}}))


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_records_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = write_record(tmp_path / "job", {"status": "ok"})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_legacy_record_with_a_nan_metric_is_not_finished(tmp_path):
    """Records written before NaN results failed said ok with a NaN metric; they must not make re-runs skip."""
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / RECORD_NAME).write_text('{"status": "ok", "config_hash": "h1", "finished_at": "t", '
                                                '"metrics": {"ppl": NaN}}')
    assert find_finished(tmp_path, "h1") is None
    write_record(tmp_path / "new", _record("ok", "h1", "t2"))
    assert find_finished([tmp_path / "elsewhere", tmp_path], "h1") == tmp_path / "new" / RECORD_NAME


def test_write_record_failure_leaves_the_old_record(tmp_path):
    write_record(tmp_path, {"status": "running"})

    class Unwritable:
        def __str__(self):
            raise RuntimeError("cannot serialize")

    with pytest.raises(RuntimeError):
        write_record(tmp_path, {"status": "ok", "bad": Unwritable()})
    assert read_record(tmp_path / RECORD_NAME) == {"status": "running"}
    assert sorted(os.listdir(tmp_path)) == [RECORD_NAME]


def _record(status, digest, finished_at, **extra):
    return {"status": status, "config_hash": digest, "finished_at": finished_at,
            "config": {"method": {"bits": 2}, "model": {"name": "m"}}, "metrics": {"ppl": 10.0, "fp_ppl": 9.0},
            "layers": [{"name": "l0", "shape": [4, 8], "proxy_error": 0.1, "effective_redundancy": 1.125},
                       {"name": "l1", "shape": [8, 8], "proxy_error": 0.2, "effective_redundancy": 1.25}],
            **extra}


def test_find_finished_ignores_failed_and_running_records_and_takes_the_newest(tmp_path):
    write_record(tmp_path / "a", _record("failed", "h1", "2024-01-03"))
    write_record(tmp_path / "b", _record("running", "h1", None))
    assert find_finished(tmp_path, "h1") is None
    write_record(tmp_path / "c", _record("ok", "h1", "2024-01-01"))
    write_record(tmp_path / "d" / "e", _record("ok", "h1", "2024-01-02"))
    write_record(tmp_path / "f", _record("ok", "h2", "2024-01-05"))
    assert find_finished(tmp_path, "h1") == tmp_path / "d" / "e" / RECORD_NAME
    assert find_finished(tmp_path / "missing", "h1") is None


def test_unreadable_records_are_skipped(tmp_path, caplog):
    write_record(tmp_path / "good", _record("ok", "h1", "t"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / RECORD_NAME).write_text("{not json")
    assert [p.parent.name for p, _ in iter_records(tmp_path)] == ["good"]
    assert "unreadable" in caplog.text


def test_load_flattens_into_one_dataframe(tmp_path):
    write_record(tmp_path / "1", _record("ok", "h1", "2024-01-01"))
    write_record(tmp_path / "2", _record("ok", "h1", "2024-01-02", seed=5))
    write_record(tmp_path / "3", _record("failed", "h2", "2024-01-03", error="ValueError: x"))
    frame = load(tmp_path)
    assert len(frame) == 3
    assert {"metrics.ppl", "metrics.fp_ppl", "config.method.bits", "config.model.name", "status", "path"} <= set(frame)
    assert "layers" not in frame
    assert frame.loc[frame.status == "failed", "error"].item() == "ValueError: x"
    finished = load(tmp_path, status="ok", latest=True)
    assert len(finished) == 1 and finished["seed"].item() == 5
    assert load(tmp_path / "nothing").empty


def test_load_layers_has_one_row_per_layer(tmp_path):
    write_record(tmp_path / "1", _record("ok", "h1", "t"))
    layers = load_layers(tmp_path)
    assert list(layers["name"]) == ["l0", "l1"] and set(layers["config_hash"]) == {"h1"}


def test_effective_redundancy_weights_layers_by_size():
    layers = _record("ok", "h", "t")["layers"]
    assert effective_redundancy(layers) == pytest.approx((1.125 * 32 + 1.25 * 64) / 96)
    assert effective_redundancy([{"shape": [2, 2], "effective_redundancy": None}]) is None


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": {}}) == {"a.b": 1, "a.c.d": [1, 2], "e": {}}
