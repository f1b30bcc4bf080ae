"""The small ViT trained on real MNIST digits (fqbench.tools.train_vit), quantized by every method of the
paper's vision tables and scored on the held-out digits. Slow: it trains the model on first use (cached)."""

import pytest

from fqbench.app import run_job
from fqbench.tools.train_vit import ensure_trained
from vision_helpers import compose_config

pytestmark = pytest.mark.slow

RUNS = {
    "fp": ["variant=fp"],
    "gptq": ["variant=gptq_w2"],
    "fq_r1.0": ["variant=fq_w2_r1.0"],
    "fq_r1.1": ["variant=fq_w2_r1.1"],
    "ptq4vit_w2": ["variant=ptq4vit_w2"],
    "ptq4vit_w3": ["variant=ptq4vit_w3"],
    "fq_r1.1_a8": ["variant=fq_w2_r1.1_a8"],
    "fq_r1.1_a6": ["variant=fq_w2_r1.1_a6"],
    "ptq4vit_w4a8": ["method=ptq4vit_wa", "bits=4", "calib.nsamples=32"],
}


@pytest.fixture(scope="module")
def records(data_root, tmp_path_factory):
    checkpoint = ensure_trained(data_root, progress=False)
    root = tmp_path_factory.mktemp("evidence")
    found = {}
    for label, overrides in RUNS.items():
        cfg = compose_config("model=mnist_vit", f"model.checkpoint={checkpoint}", *overrides, f"data.root={data_root}",
                             f"runs_root={root / 'runs'}", "device=cpu", "engine.progress=false", "eval.workers=0")
        found[label] = run_job(cfg, root / label)
        assert found[label]["status"] == "ok"
    return found


def drop(records, label):
    return records["fp"]["metrics"]["top1"] - records[label]["metrics"]["top1"]


def test_the_evidence_model_is_a_trained_classifier_scored_on_held_out_digits(records):
    fp = records["fp"]
    assert fp["metrics"]["top1"] >= 85 and fp["eval_images"] == 2000 and fp["dataset"] == "mnist"
    assert fp["bits_per_weight"] == 32 and len(fp["layers"]) == 8


def test_ptq4vit_style_two_bit_collapses_relative_to_the_others(records):
    worst = drop(records, "ptq4vit_w2")
    assert worst >= 3
    assert worst >= 2 * max(drop(records, "gptq"), drop(records, "fq_r1.0"), drop(records, "fq_r1.1"))
    assert drop(records, "ptq4vit_w3") < worst / 2  # 3 bits recovers, as in the paper's last row
    assert records["ptq4vit_w2"]["bits_per_weight"] == pytest.approx(2.016, abs=1e-3)  # codes + one step per block


def test_gptq_and_framequant_keep_accuracy_at_two_bits(records):
    for label in ("gptq", "fq_r1.0", "fq_r1.1"):
        assert drop(records, label) < 3.5, label
    # Honest bits on 32-wide layers: per-row scales weigh 0.56 bits, and r = 1.125 on both sides 1.27x codes.
    assert records["gptq"]["bits_per_weight"] == pytest.approx(2.5625)
    assert records["fq_r1.1"]["bits_per_weight"] > records["fq_r1.0"]["bits_per_weight"] > 2.7


def test_activation_quantization_in_frame_space_costs_little_at_eight_bits(records):
    w_only = records["fq_r1.1"]["metrics"]["top1"]
    assert abs(records["fq_r1.1_a8"]["metrics"]["top1"] - w_only) <= 1.0
    assert abs(records["fq_r1.1_a6"]["metrics"]["top1"] - w_only) <= 3.0
    assert records["fq_r1.1_a8"]["config"]["method"]["act_bits"] == 8
    assert drop(records, "ptq4vit_w4a8") < drop(records, "ptq4vit_w2")
