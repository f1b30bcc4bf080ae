"""The vision command-line contract through the real CLI (a subprocess), activation quantization and
the ablation switches of paper Table 3, Figure 11 and Table 9."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fqbench.app import run_job
from fqbench.methods import build_method
from vision_helpers import compose_config

ROOT = Path(__file__).resolve().parents[1]
CONTRACT = ["model=vit_t", "model.pretrained=false", "method=framequant", "bits=2", "redundancy=1.1",
            "calib.nsamples=16", "eval.max_images=64"]


def run_cli(args, tmp_path, data_root):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "fqbench", *args, f"data.root={data_root}", f"hydra.run.dir={run_dir}",
               f"runs_root={tmp_path / 'runs'}", "device=cpu", "engine.progress=false", "eval.workers=0"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((run_dir / "result.json").read_text())


def check_contract_record(record, blocks):
    assert record["status"] == "ok"
    metrics = record["metrics"]
    assert 0 <= metrics["top1"] <= metrics["top5"] <= 100
    assert record["eval_images"] == 64 and record["calib_nsamples"] == 16
    assert record["nominal_bits"] == pytest.approx(2.2)
    # Honest: r = 1.125 on both sides costs 2 * 1.125^2 bits of codes, plus scales and zero points.
    assert 2.53 < record["bits_per_weight"] < 2.7 and record["effective_redundancy"] == pytest.approx(1.265625)
    names = [layer["name"] for layer in record["layers"]]
    assert names == [f"blocks.{i}.{n}" for i in range(blocks) for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    first = record["layers"][0]
    assert first["shape"] == [576, 192] and first["proxy_error"] > 0 and first["bits_per_weight"] > 2.5
    assert record["full_precision_modules"] == ["patch_embed", "head"]
    assert record["model"] == "vit_tiny_patch16_224.augreg_in21k_ft_in1k" and record["expected_top1"] == 75.452
    assert record["data_config"]["input_size"] == [3, 224, 224]
    assert {"python", "torch", "timm", "fqbench_git_sha"} <= set(record["versions"])


def test_cli_contract_on_real_images_with_two_blocks(data_root, tmp_path):
    record = run_cli([*CONTRACT, "+model.kwargs.depth=2", "eval.fp_baseline=true"], tmp_path, data_root)
    check_contract_record(record, blocks=2)
    assert 0 <= record["metrics"]["fp_top1"] <= 100


@pytest.mark.slow
def test_cli_contract_exactly(data_root, tmp_path):
    check_contract_record(run_cli(CONTRACT, tmp_path, data_root), blocks=12)


def test_missing_images_fail_the_job_with_the_path(tmp_path):
    cfg = compose_config(*CONTRACT, f"data.root={tmp_path}", f"runs_root={tmp_path / 'runs'}", "device=cpu")
    with pytest.raises(FileNotFoundError, match=f"no ImageNet folder at {tmp_path}/imagenet/val"):
        run_job(cfg, tmp_path / "run")
    record = json.loads((tmp_path / "run" / "result.json").read_text())
    assert record["status"] == "failed" and "data.root" in record["error"]


# Paper Table 3 (ablation ladder), Figure 11 (clip threshold), Table 9 (calibration size), Table 11
# (activations): the overrides the experiment presets use, and what they must mean.
ABLATIONS = {
    "gptq": (["method=gptq"], dict(name="gptq", bits=2)),
    "+frames": (["method=framequant", "redundancy=1.0", "method.clip_sigma=null"],
                dict(name="framequant", redundancy=1.0, clip_sigma=None)),
    "+clip": (["method=framequant", "redundancy=1.0"], dict(name="framequant", redundancy=1.0, clip_sigma=2.0)),
    "+redundancy": (["method=framequant", "redundancy=1.1"], dict(name="framequant", redundancy=1.1, clip_sigma=2.0)),
    **{f"clip {c} sigma": (["method=framequant", f"method.clip_sigma={c}"], dict(clip_sigma=float(c)))
       for c in (1, 2, 3, 4)},
    "W2/A8": (["method=framequant", "method.act_bits=8"], dict(act_bits=8, redundancy=1.1)),
    "W2.2/A6": (["method=framequant", "redundancy=1.1", "method.act_bits=6"], dict(act_bits=6, redundancy=1.1)),
    "ptq4vit 3 bit": (["method=ptq4vit", "bits=3"], dict(name="ptq4vit", bits=3, act_bits=None)),
    "ptq4vit W/A": (["method=ptq4vit_wa"], dict(name="ptq4vit", act_bits=8)),
}


@pytest.mark.parametrize("label", list(ABLATIONS))
def test_ablation_overrides_compose_into_the_intended_method(label):
    overrides, expected = ABLATIONS[label]
    cfg = compose_config("model=vit_s", *overrides, "calib.nsamples=32")
    method = build_method(cfg.method)
    assert cfg.calib.nsamples == 32
    for key, value in expected.items():
        assert (method.name if key == "name" else getattr(method.config, key)) == value, key


def test_swin_through_the_pipeline_on_real_images(data_root, tmp_path):
    """Patch merging and shifted windows through the engine: every unit's linears, in order."""
    cfg = compose_config("model=swin_t", "model.pretrained=false", "+model.kwargs.depths=[2,1,1,1]",
                         "+model.kwargs.img_size=64", "+model.pretrained_cfg.input_size=[3,64,64]",
                         "method=rtn", "bits=4", "calib.nsamples=4", "eval.max_images=8",
                         f"data.root={data_root}", f"runs_root={tmp_path / 'runs'}", "device=cpu",
                         "engine.progress=false", "eval.workers=0")
    record = run_job(cfg, tmp_path / "run")
    assert record["status"] == "ok" and record["eval_images"] == 8
    names = [layer["name"] for layer in record["layers"]]
    blocks = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    expected = [f"layers.0.blocks.{j}.{n}" for j in range(2) for n in blocks]
    for stage in (1, 2, 3):
        expected += [f"layers.{stage}.downsample.reduction"] + [f"layers.{stage}.blocks.0.{n}" for n in blocks]
    assert names == expected
    reduction = record["layers"][8]
    assert list(reduction["shape"]) == [192, 384] and reduction["bits_per_weight"] > 4
    assert tuple(record["data_config"]["input_size"]) == (3, 64, 64)
