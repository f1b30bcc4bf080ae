"""A timm ViT quantized on real ImageNet images, saved packed and loaded back: the vision pipeline's own
evaluation (top-1 / top-5) gives the same numbers, and the vision CLI saves with save=true."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import timm.data
import torch
from torch.utils.data import TensorDataset

from fqbench.data.vision import calibration_images, load_split
from fqbench.engine import capture_block_inputs, quantize_blocks
from fqbench.eval.imagenet import evaluate_classifier
from fqbench.methods import build_method
from fqbench.models.timm import FAMILIES
from fqbench.packing import load_quantized
from fqbench.pipelines.saving import save_run

KWARGS = {"depth": 2}  # ViT-T at 224 px with two blocks
ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")


def data_config(root):
    from omegaconf import OmegaConf

    return OmegaConf.create({"root": str(root), "imagenet": "imagenet", "imagenet_hf": None})


def test_loaded_packed_vit_gives_the_evaluated_accuracy(data_root, tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **KWARGS).eval()
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model), is_training=False)
    val = load_split("imagenet", data_config(data_root), "val", transform)
    images = torch.stack([val[i][0] for i in range(48)])
    with torch.no_grad():  # labels: the full-precision model's own top-1, so that accuracy means something
        labels = model(images).argmax(-1)
    dataset = TensorDataset(images, labels)

    calibration = calibration_images(load_split("imagenet", data_config(data_root), "train", transform), 8, seed=0)
    units = FAMILIES["vit"].blocks(model)
    inputs = capture_block_inputs(model, units, list(calibration.split(4)), lambda m, x: m(x), "cpu")
    method = build_method("framequant", bits=2, redundancy=1.1)
    layers = quantize_blocks(units, inputs, method, device="cpu", keep_layers=True, progress=False).layers
    evaluated = evaluate_classifier(model, dataset, device="cpu", batch_size=16, progress=False)
    assert 0 < evaluated["top1"] < 100  # 2 bits moved some predictions

    saved = save_run(model, layers, method, tmp_path, device="cpu", timm_name="vit_tiny_patch16_224",
                     timm_kwargs=KWARGS)
    for mode in ("dequantized", "packed"):
        loaded = load_quantized(saved["directory"], mode=mode)
        assert timm.data.resolve_model_data_config(loaded) == timm.data.resolve_model_data_config(model)
        assert evaluate_classifier(loaded, dataset, device="cpu", batch_size=16, progress=False) == evaluated
    with torch.no_grad():
        assert torch.equal(load_quantized(saved["directory"])(images[:4]), model(images[:4]))


def test_vision_cli_saves_the_packed_model(data_root, tmp_path):
    common = ["model=vit_t", "model.pretrained=false", "+model.kwargs.depth=1", f"data.root={data_root}",
              "calib.nsamples=4", "eval.max_images=8", "eval.workers=0", "save=true", "device=cpu", "threads=1",
              "engine.progress=false", f"runs_root={tmp_path / 'runs'}"]
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "fqbench", *common, "method=gptq", "bits=3",
                           f"hydra.run.dir={run}"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    record = json.loads((run / "result.json").read_text())
    assert record["packed"]["directory"] == str(run / "packed")
    assert record["packed"]["bits_per_weight"] == pytest.approx(record["bits_per_weight"], abs=0.01)
    config = json.loads((run / "packed" / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    assert config["model_args"] == {"depth": 1} and config["quantization_config"]["method"] == "gptq"


def test_model_level_weights_and_activations_save_and_reload(tmp_path):
    """PTQ4ViT-style W/A: its activation quantizers (linear inputs, q/k/v, attention probabilities) are stored."""
    from fqbench.engine import quantize_model
    from fqbench.quantized.activations import TwinSoftmaxQuantizer

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **KWARGS).eval()
    images = [torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    method = build_method("ptq4vit", bits=4, act_bits=6, candidates=8, rounds=1)
    layers = quantize_model(model, FAMILIES["vit"], images, method, device="cpu", keep_layers=True,
                            progress=False).layers
    saved = save_run(model, layers, method, tmp_path, device="cpu", timm_name="vit_tiny_patch16_224",
                     timm_kwargs=KWARGS)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = model(x)
        for mode in ("dequantized", "packed"):
            loaded = load_quantized(saved["directory"], mode=mode)
            assert isinstance(loaded.blocks[0].attn.attn_drop, TwinSoftmaxQuantizer)
            assert loaded.blocks[0].attn.fused_attn is False
            got = loaded(x)
            if mode == "dequantized":
                assert torch.equal(got, expected)
            else:
                assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
