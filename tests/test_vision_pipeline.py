"""The vision command-line contract through the real CLI (a subprocess), activation quantization and
the ablation switches of paper Table 3, Figure 11 and Table 9."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fqbench.app import run_job
from fqbench.methods import build_method
from vision_helpers import SWIN_UNITS, compose_config, small_swin_job

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
    record = run_job(small_swin_job(data_root, tmp_path, "method=rtn", "bits=4"), tmp_path / "run")
    assert record["status"] == "ok" and record["eval_images"] == 8
    assert [layer["name"] for layer in record["layers"]] == SWIN_UNITS
    reduction = record["layers"][8]
    assert list(reduction["shape"]) == [192, 384] and reduction["bits_per_weight"] > 4
    assert tuple(record["data_config"]["input_size"]) == (3, 64, 64)


def _timm_run(data_root, tmp_path, name, *overrides):
    cfg = compose_config("model=timm", f"model.name={name}", "model.pretrained=false", *overrides, "method=gptq",
                         "bits=4", "calib.nsamples=4", "calib.batch_size=4", "eval.max_images=8",
                         f"data.root={data_root}", f"runs_root={tmp_path / 'runs'}", "device=cpu",
                         "engine.progress=false", "eval.workers=0", "threads=1")
    assert cfg.model.family == "auto"  # no family named: the adapter is read off the model
    return run_job(cfg, tmp_path / "run")


SWINV2_SMALL = ("+model.kwargs.depths=[2,1,1,1]", "+model.kwargs.embed_dim=48", "+model.kwargs.num_heads=[2,2,2,2]")
EVA_SMALL = ("+model.kwargs.depth=2",)


@pytest.mark.parametrize("overrides", [SWINV2_SMALL, pytest.param((), marks=pytest.mark.slow)], ids=["small", "full"])
def test_swin_v2_through_the_pipeline_with_its_linears_discovered(data_root, tmp_path, overrides):
    """Swin V2 adds its q/v biases through F.linear(x, self.qkv.weight, ...) and has a position-bias MLP on
    fixed coordinates: qkv is captured through its weight, the position-bias MLP is not quantized."""
    import timm
    from torch import nn

    record = _timm_run(data_root, tmp_path, "swinv2_tiny_window8_256", *overrides)
    assert record["status"] == "ok" and record["adapter"] == "auto:SwinTransformerV2"
    kwargs = dict(arg.split("=", 1) for arg in (o.removeprefix("+model.kwargs.") for o in overrides))
    model = timm.create_model("swinv2_tiny_window8_256", pretrained=False,
                              **{k: json.loads(v) for k, v in kwargs.items()})
    expected = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and "cpb_mlp" not in n
                and not n.startswith("head")]
    assert [layer["name"] for layer in record["layers"]] == expected  # one record per quantized linear, in order
    assert any(n.endswith("downsample.reduction") for n in expected)


@pytest.mark.parametrize("overrides", [EVA_SMALL, pytest.param((), marks=pytest.mark.slow)], ids=["small", "full"])
def test_eva02_through_the_pipeline_with_its_linears_discovered(data_root, tmp_path, overrides):
    """EVA-02: rotary embeddings as a block keyword argument, SwiGLU MLP, qkv through F.linear."""
    import timm
    from torch import nn

    record = _timm_run(data_root, tmp_path, "eva02_tiny_patch14_224", *overrides)
    assert record["status"] == "ok" and record["adapter"] == "auto:Eva"
    depth = 2 if overrides else 12
    model = timm.create_model("eva02_tiny_patch14_224", pretrained=False, depth=depth)
    expected = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks.")]
    assert [layer["name"] for layer in record["layers"]] == expected
    assert all(layer["proxy_error"] > 0 for layer in record["layers"])
