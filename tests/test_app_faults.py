"""Jobs under faults, in-process on a tiny Llama: NaN results, NaN weights, missing model or data, save=true re-runs."""

import json
import shutil

import pytest
import torch

from fqbench.app import run_job
from fqbench.finite import NonFiniteError
from fqbench.records import read_record
from lm_tiny import compose, save_tiny_model, write_data_root

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_data_root(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model("llama", tmp_path_factory.mktemp("llama"))


def broken_model(model_dir, tmp_path, parameter: str, index: tuple):
    """A copy of the tiny model with one NaN in ``parameter``."""
    from transformers import AutoModelForCausalLM

    copy = tmp_path / "broken"
    shutil.copytree(model_dir, copy)
    model = AutoModelForCausalLM.from_pretrained(copy)
    with torch.no_grad():
        model.get_parameter(parameter)[index] = float("nan")
    model.save_pretrained(copy)
    return copy


def job(tmp_path, model_path, data_dir, *overrides):
    return compose(["model=hf_causal_lm", f"model.path={model_path}", "method=rtn", "bits=4", "calib.nsamples=4",
                    "calib.seqlen=16", "eval.seqlen=16", "eval.datasets=[wikitext2]", f"data.root={data_dir}",
                    "device=cpu", "engine.progress=false", f"runs_root={tmp_path / 'runs'}", *overrides])


def strict_json(path):
    def refuse(constant):
        raise ValueError(f"{constant} is not strict JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_a_nan_output_fails_the_job_naming_the_metric_and_the_module(model_dir, data_dir, tmp_path):
    broken = broken_model(model_dir, tmp_path, "model.norm.weight", (0,))
    with pytest.raises(NonFiniteError, match="metric wikitext2_ppl is nan.*model.norm"):
        run_job(job(tmp_path, broken, data_dir), tmp_path / "out")
    record = strict_json(tmp_path / "out" / "result.json")
    assert record["status"] == "failed"
    assert "wikitext2_ppl" in record["error"] and "model.norm" in record["error"]


def test_a_nan_in_the_full_precision_baseline_fails_before_quantizing(model_dir, data_dir, tmp_path):
    broken = broken_model(model_dir, tmp_path, "model.norm.weight", (3,))
    with pytest.raises(NonFiniteError, match="metric fp_wikitext2_ppl is nan.*model.norm"):
        run_job(job(tmp_path, broken, data_dir, "eval.fp_baseline=true"), tmp_path / "out")
    assert not read_record(tmp_path / "out" / "result.json").get("layers")


def test_a_nan_weight_names_the_layer(model_dir, data_dir, tmp_path):
    broken = broken_model(model_dir, tmp_path, "model.layers.1.mlp.up_proj.weight", (3, 5))
    with pytest.raises(ValueError, match=r"layer model\.layers\.1\.mlp\.up_proj: W contains 1 NaN/Inf values "
                                         r"\(first at \[\(3, 5\)\]\)"):
        run_job(job(tmp_path, broken, data_dir), tmp_path / "out")


def test_a_missing_model_directory_says_so(data_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="model.path=/no/such/dir: no such directory"):
        run_job(job(tmp_path, "/no/such/dir", data_dir), tmp_path / "out")


def test_missing_local_data_fails_at_once_without_the_hub(model_dir, tmp_path, monkeypatch):
    import fqbench.data.text as text

    asked = []

    def hub(path, *args, **kwargs):
        def read():
            asked.append(path)
            raise ConnectionError("no network")

        return read

    monkeypatch.setattr(text, "_hub_column", hub)
    empty = tmp_path / "empty_data"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"wikitext2_test file .* not found.*data.hub=true"):
        run_job(job(tmp_path, model_dir, empty), tmp_path / "out")
    assert asked == []  # data.root is set: a missing file is a mistake, not a reason to wait on the hub
    with pytest.raises(FileNotFoundError, match="hub fallback failed too"):
        run_job(job(tmp_path, model_dir, empty, "data.hub=true"), tmp_path / "out2")
    assert asked == ["Salesforce/wikitext"]  # asked for: tried


def test_save_true_writes_the_checkpoint_a_finished_record_lost(model_dir, data_dir, tmp_path):
    first = run_job(job(tmp_path, model_dir, data_dir, "save=true"), tmp_path / "runs" / "first")
    packed = tmp_path / "runs" / "first" / "packed"
    assert first["status"] == "ok" and (packed / "model.safetensors").is_file()
    assert run_job(job(tmp_path, model_dir, data_dir, "save=true"), tmp_path / "runs" / "again")["skipped"]
    shutil.rmtree(packed)
    second = run_job(job(tmp_path, model_dir, data_dir, "save=true"), tmp_path / "runs" / "second")
    assert not second.get("skipped") and second["status"] == "ok"
    assert (tmp_path / "runs" / "second" / "packed" / "model.safetensors").is_file()
    assert "already finished" in run_job(job(tmp_path, model_dir, data_dir, "save=true"), tmp_path / "runs" / "third")["skipped"]
