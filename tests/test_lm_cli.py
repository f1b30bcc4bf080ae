"""The command-line contract of the language-model pipeline, through the real CLI (a subprocess)."""

import json
import math
import subprocess
import sys

import pytest
from lm_tiny import ROOT, convert_stories, write_story_task


def copy_head(source, target, lines):
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(source, encoding="utf-8") as f:
        target.write_text("".join(line for _, line in zip(range(lines), f)), encoding="utf-8")


@pytest.fixture(scope="module")
def small_real_root(data_root, tmp_path_factory):
    """The head of each real file, in the shared-data layout (the full files are the slow test's)."""
    root = tmp_path_factory.mktemp("data")
    copy_head(data_root / "wikitext-2-raw" / "wiki.test.raw", root / "wikitext-2-raw" / "wiki.test.raw", 300)
    copy_head(data_root / "ptb" / "ptb.test.txt", root / "ptb" / "ptb.test.txt", 300)
    c4 = "c4-train.00000-of-01024.first1000.jsonl"
    copy_head(data_root / "c4" / c4, root / "c4" / c4, 100)
    return root


def run_cli(args, tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "fqbench", *args, f"hydra.run.dir={run_dir}", f"runs_root={tmp_path / 'runs'}",
               "device=cpu", "threads=1", "engine.progress=false"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((run_dir / "result.json").read_text())


def test_cli_contract(data_root, small_real_root, tmp_path):
    model = convert_stories(data_root, tmp_path / "stories")
    tasks = write_story_task(tmp_path / "tasks")
    record = run_cli([
        "model=hf_causal_lm", f"model.path={model}", "method=framequant", "bits=2", "redundancy=1.1",
        "calib.nsamples=16", "calib.seqlen=256", "eval.seqlen=256", f"data.root={small_real_root}",
        # The shared folder has no C4 validation shard: the train sample stands in for it.
        "data.c4_eval=c4/c4-train.00000-of-01024.first1000.jsonl", "eval.fp_baseline=true",
        "eval.lm_eval.enabled=true", "eval.lm_eval.tasks=[stories_choice]", f"eval.lm_eval.include_path={tasks}",
    ], tmp_path)

    assert record["status"] == "ok"
    metrics = record["metrics"]
    for name in ("wikitext2", "c4", "ptb"):
        assert math.isfinite(metrics[f"{name}_ppl"]) and metrics[f"{name}_ppl"] > metrics[f"fp_{name}_ppl"] > 1
    assert 0 <= metrics["stories_choice_acc"] <= 1 and metrics["fp_stories_choice_acc"] >= 0.85
    assert record["nominal_bits"] == pytest.approx(2.2) and record["bits_per_weight"] > 2.5  # r^2 codes + scales
    assert len(record["layers"]) == 5 * 7
    layer = record["layers"][0]
    assert layer["name"] == "model.layers.0.self_attn.q_proj" and layer["shape"] == [64, 64]
    assert layer["proxy_error"] > 0 and layer["seconds"] > 0 and layer["damping"] > 0
    assert record["seconds"] > 0 and record["peak_memory_bytes"]["cpu_rss"] > 0
    assert {"python", "torch", "transformers", "timm", "fqbench_git_sha"} <= set(record["versions"])
    assert record["device"] == "cpu"
    assert record["config"]["eval"]["seqlen"] == 256 and record["config"]["model"]["path"] == str(model)
    assert record["eval_seqlen"] == record["calib_seqlen"] == 256 and record["calib_tokens"] == 16 * 256
    assert record["eval_sources"]["c4"].endswith("c4-train.00000-of-01024.first1000.jsonl")
    assert record["perplexity"]["wikitext2"]["seqlen"] == 256


def test_cli_names_a_missing_dataset_file(data_root, small_real_root, tmp_path):
    model = convert_stories(data_root, tmp_path / "stories")
    command = [sys.executable, "-m", "fqbench", "model=hf_causal_lm", f"model.path={model}", "method=rtn",
               "calib.seqlen=256", "eval.seqlen=256", f"data.root={small_real_root}", "data.hub=false",
               f"hydra.run.dir={tmp_path / 'run'}", f"runs_root={tmp_path / 'runs'}", "device=cpu"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert "c4-validation.00000-of-00008" in done.stderr and str(small_real_root / "c4") in done.stderr
    record = json.loads((tmp_path / "run" / "result.json").read_text())
    assert record["status"] == "failed" and "c4_eval" in record["error"]


@pytest.mark.slow
def test_cli_full_protocol_on_the_real_files(data_root, tmp_path):
    """The whole WikiText-2 test, PTB test and the C4 sample (standing in for C4 validation) at seqlen 256."""
    model = convert_stories(data_root, tmp_path / "stories")
    record = run_cli([
        "model=hf_causal_lm", f"model.path={model}", "method=framequant", "bits=2", "redundancy=1.1",
        "calib.nsamples=128", "calib.seqlen=256", "eval.seqlen=256", f"data.root={data_root}",
        "data.c4_eval=c4/c4-train.00000-of-01024.first1000.jsonl", "eval.fp_baseline=true",
    ], tmp_path)
    assert record["status"] == "ok"
    windows = {name: record["perplexity"][name]["windows"] for name in ("wikitext2", "c4", "ptb")}
    assert windows["c4"] == 256 and windows["wikitext2"] > 2000 and windows["ptb"] > 700
    for name in windows:
        assert record["metrics"][f"fp_{name}_ppl"] < record["metrics"][f"{name}_ppl"] < 20 * record["metrics"][f"fp_{name}_ppl"]


EXTERNAL_METHOD = '''
from dataclasses import dataclass

from fqbench.methods import LayerMethod, register_method
from fqbench.quant.grids import GridSpec
from fqbench.quant.quantizer import GridQuantizer, round_to_nearest


@dataclass
class HalfRangeConfig:
    bits: int = 4


@register_method("half_range")
class HalfRange(LayerMethod):
    """Round-to-nearest on a symmetric grid: a method outside the package, one file and one yaml."""

    Config = HalfRangeConfig

    def _quantize(self, W, H, seed):
        return round_to_nearest(W.float(), GridQuantizer(GridSpec(self.config.bits, "minmax", symmetric=True)))
'''


def test_a_method_outside_the_package_is_one_file_and_one_yaml(data_root, small_real_root, tmp_path):
    """`_target_` names the config dataclass of an importable module; `hydra.searchpath` finds its yaml."""
    (tmp_path / "plugin" / "conf" / "method").mkdir(parents=True)
    (tmp_path / "plugin" / "half_range_method.py").write_text(EXTERNAL_METHOD)
    (tmp_path / "plugin" / "conf" / "method" / "half_range.yaml").write_text(
        "_target_: half_range_method.HalfRangeConfig\nbits: ${bits}\n")
    model = convert_stories(data_root, tmp_path / "stories")
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "fqbench", "model=hf_causal_lm", f"model.path={model}", "method=half_range",
               "bits=3", f"hydra.searchpath=[file://{tmp_path / 'plugin' / 'conf'}]", "calib.nsamples=4",
               "calib.seqlen=128", "eval.seqlen=128", "eval.datasets=[wikitext2]", f"data.root={small_real_root}",
               f"hydra.run.dir={run_dir}", f"runs_root={tmp_path / 'runs'}", "device=cpu", "threads=1",
               "engine.progress=false"]
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path / "plugin")}
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    record = json.loads((run_dir / "result.json").read_text())
    assert record["status"] == "ok" and record["method"] == "half_range"
    assert record["config"]["method"]["bits"] == 3 and len(record["layers"]) == 5 * 7
    assert all(layer["bits_per_weight"] > 3 for layer in record["layers"])
