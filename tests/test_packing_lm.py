"""A real pretrained model (llama2.c stories260K), quantized, saved packed and loaded back: the LM
pipeline's own evaluation (perplexity on real text, lm-eval on a local task) gives the same numbers."""

import json
import math
import subprocess
import sys

import pytest
import torch
from lm_tiny import ROOT, compose, convert_stories, write_story_task

from fqbench.data.text import DataFiles, calibration_windows, eval_tokens
from fqbench.engine import capture_block_inputs, quantize_blocks
from fqbench.methods import build_method
from fqbench.models.hf import load_causal_lm
from fqbench.packing import checkpoint_sizes, load_quantized
from fqbench.pipelines.lm import evaluate
from fqbench.pipelines.saving import save_run

SEQLEN = 128


@pytest.fixture(scope="module")
def stories(data_root, tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield convert_stories(data_root, tmp_path_factory.mktemp("stories") / "hf")
    torch.set_num_threads(threads)


def pipeline_config(data_root, tasks):
    return compose(["model=hf_causal_lm", "model.path=unused", f"data.root={data_root}", f"eval.seqlen={SEQLEN}",
                    "eval.datasets=[wikitext2]", "engine.progress=false", "data.hub=false", "eval.lm_eval.enabled=true",
                    "eval.lm_eval.tasks=[stories_choice]", f"eval.lm_eval.include_path={tasks}"])


@pytest.mark.parametrize("method_name,options", [
    ("framequant", {"bits": 2, "redundancy": 1.1}),
    pytest.param("gptq", {"bits": 3}, marks=pytest.mark.slow),  # packed GPTQ's exactness: test_packing.py, quicker
])
def test_loaded_packed_model_gives_the_evaluated_numbers(stories, data_root, tmp_path, method_name, options):
    cfg = pipeline_config(data_root, write_story_task(tmp_path / "tasks"))
    model, tokenizer, adapter = load_causal_lm(str(stories))
    data = DataFiles.from_config(cfg.data)
    eval_sets = {"wikitext2": eval_tokens("wikitext2", data, tokenizer, SEQLEN)}
    eval_sets["wikitext2"].ids = eval_sets["wikitext2"].ids[: 24 * SEQLEN]  # 24 windows of real text
    calibration = calibration_windows("ptb", data, tokenizer, nsamples=8, seqlen=SEQLEN, seed=0)
    blocks = adapter.blocks(model)
    inputs = capture_block_inputs(model, blocks, calibration.windows, lambda m, ids: m(input_ids=ids), "cpu")
    method = build_method(method_name, **options)
    layers = quantize_blocks(blocks, inputs, method, device="cpu", keep_layers=True, progress=False).layers

    evaluated: dict = {}
    evaluate(model, tokenizer, adapter, eval_sets, cfg, "cpu", evaluated, {}, prefix="")
    saved = save_run(model, layers, method, tmp_path, device="cpu", tokenizer=tokenizer)
    assert saved["bits_per_weight"] == pytest.approx(saved["accounting_bits_per_weight"], abs=0.01)

    for mode in ("dequantized", "packed"):
        loaded = load_quantized(saved["directory"], mode=mode)
        again: dict = {}
        evaluate(loaded, tokenizer, adapter, eval_sets, cfg, "cpu", again, {}, prefix="")
        assert set(again) == set(evaluated)
        assert again["stories_choice_acc"] == evaluated["stories_choice_acc"]
        if mode == "dequantized" or method_name == "gptq":  # dense kernels on long sequences: bit-identical
            assert again["wikitext2_ppl"] == evaluated["wikitext2_ppl"]
        else:  # frame space: float rounding only
            assert again["wikitext2_ppl"] == pytest.approx(evaluated["wikitext2_ppl"], rel=1e-5)


@pytest.mark.slow
def test_cli_saves_the_packed_model(stories, data_root, tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "fqbench", "model=hf_causal_lm", f"model.path={stories}", "method=framequant",
               "bits=2", "redundancy=1.1", "calib.nsamples=4", f"calib.seqlen={SEQLEN}", "calib.dataset=ptb",
               f"eval.seqlen={SEQLEN}", "eval.datasets=[wikitext2]", f"data.root={data_root}", "data.hub=false", "save=true",
               f"hydra.run.dir={run_dir}", f"runs_root={tmp_path / 'runs'}", "device=cpu", "threads=1",
               "engine.progress=false"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    record = json.loads((run_dir / "result.json").read_text())
    packed = record["packed"]
    assert packed["directory"] == str(run_dir / "packed")
    assert packed == json.loads(json.dumps(checkpoint_sizes(run_dir / "packed") | {"directory": packed["directory"]}))
    assert packed["bits_per_weight"] == pytest.approx(record["bits_per_weight"], abs=0.01)
    assert (run_dir / "packed" / "tokenizer_config.json").exists()
    assert math.isfinite(record["metrics"]["wikitext2_ppl"])
