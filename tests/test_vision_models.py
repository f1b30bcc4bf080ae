"""timm model configs and adapters: every paper model builds, the adapter finds every linear in order,
running the units in sequence is the model's forward, and method=fp leaves the logits unchanged."""

import pytest
import torch
from torch import nn

from fqbench.engine import capture_block_inputs, quantize_blocks, run_block
from fqbench.methods import build_method
from fqbench.models.timm import FAMILIES, TimmAdapter, adapter_for, load_timm_model
from fqbench.quantized import QuantLinear
from vision_helpers import model_config

PAPER_MODELS = ["vit_t", "vit_s", "vit_s32", "vit_b", "vit_l", "vit_h", "deit_t", "deit_s", "deit_b",
                "deit3_s", "deit3_b", "deit3_l", "deit3_h", "swin_t", "swin_s", "swin_b", "swin_b384", "swin_l"]
# Plain ViT, LayerScale ViT and Swin in the default run; the wide ones (slow Hessians) with -m slow.
QUICK = {"vit_t", "deit3_s", "swin_t"}


def reduced(name):
    """The architecture with its full widths but one block per stage (two in Swin's first: a shifted window)
    and a tiny input."""
    if name.startswith("swin"):
        return model_config(name, "+model.kwargs.depths=[2,1,1,1]", "+model.kwargs.img_size=64")
    return model_config(name, "+model.kwargs.depth=2", "+model.kwargs.img_size=56")


@pytest.mark.parametrize("name", PAPER_MODELS)
def test_config_names_a_tag_and_the_adapter_finds_every_linear_in_order(name):
    cfg = model_config(name)
    assert cfg.task == "vision" and cfg.family in FAMILIES
    assert "." in cfg.name, "an explicit pretrained tag (plain names resolve to different weights across timm versions)"
    assert cfg.expected_top1 is not None
    if cfg.paper_top1 is not None:
        # The tag's published top-1 is the paper's FP figure; no timm Swin tag matches the paper's (the
        # configs take the nearest, 0.4-0.6 above it, and say so).
        assert abs(cfg.expected_top1 - cfg.paper_top1) < (0.65 if cfg.family == "swin" else 0.05)
    with torch.device("meta"):  # full size without allocating: the adapter check covers every block
        model = load_timm_model(cfg)
    layout = adapter_for(cfg.family, model)
    units = layout.blocks(model)
    found = [f"{u.name}.{n}" for u in units for n in u.linears()]
    every = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
             and not any(n == p or n.startswith(p + ".") for p in layout.full_precision)]
    assert found == every
    if cfg.family == "vit":
        assert len(found) == 4 * len(model.blocks)
        assert found[:4] == ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]
    else:
        stages = len(model.layers)
        assert len(found) == 4 * sum(len(s.blocks) for s in model.layers) + stages - 1
        assert "layers.1.downsample.reduction" in found
        assert found.index("layers.1.downsample.reduction") < found.index("layers.1.blocks.0.attn.qkv")
    # The pretrained config gives the preprocessing; the input size matches the architecture.
    assert tuple(model.pretrained_cfg["input_size"][1:]) == tuple(model.patch_embed.img_size)


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in QUICK else pytest.mark.slow) for n in PAPER_MODELS])
def test_units_in_sequence_are_the_forward_and_fp_keeps_logits(name):
    cfg = reduced(name)
    torch.manual_seed(0)
    model = load_timm_model(cfg)
    layout = adapter_for(cfg.family, model)
    size = tuple(model.patch_embed.img_size)
    images = [torch.randn(2, 3, *size), torch.randn(1, 3, *size)]
    with torch.no_grad():
        reference = [model(x) for x in images]
    units = layout.blocks(model)
    inputs = capture_block_inputs(model, units, images, lambda m, x: m(x), "cpu")
    hidden = inputs
    for unit in units:
        hidden = hidden.replace_hidden(run_block(unit.module, hidden))
    with torch.no_grad():
        replayed = [model.forward_head(model.norm(args[0])) for args in hidden.args]
    for got, want in zip(replayed, reference):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    records, _ = quantize_blocks(units, inputs, build_method("fp"), device="cpu", progress=False)
    assert [r.name for r in records] == [f"{u.name}.{n}" for u in units for n in u.linears()]
    with torch.no_grad():
        for x, want in zip(images, reference):
            assert torch.equal(model(x), want)


def test_unknown_family_and_layout_mismatch_are_clear_errors():
    swin = load_timm_model(reduced("swin_t"))
    with pytest.raises(ValueError, match="unknown timm model family 'convnext'"):
        adapter_for("convnext", swin)
    with pytest.raises(ValueError, match="expected nn.Linear modules"):
        TimmAdapter("wrong", blocks_path="layers").blocks(swin)  # a ViT layout on a Swin: stages are not blocks


def test_checkpoint_loads_through_timm_and_reproduces_the_model(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    original = load_timm_model(reduced("deit3_s"))
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in original.state_dict().items()}, str(path))
    cfg = model_config("deit3_s", "+model.kwargs.depth=2", "+model.kwargs.img_size=56", f"model.checkpoint={path}")
    loaded = load_timm_model(cfg)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(loaded(x), original(x))


def test_missing_checkpoint_names_the_file_and_the_fix(tmp_path):
    cfg = model_config("vit_t", f"model.checkpoint={tmp_path}/nope.safetensors")
    with pytest.raises(FileNotFoundError, match="nope.safetensors: no such file"):
        load_timm_model(cfg)


def test_units_of_a_model_with_packed_linears():
    """A loaded packed checkpoint has QuantLinear in place of nn.Linear: the adapter still finds them."""
    model = load_timm_model(reduced("vit_t"))
    qkv = model.blocks[0].attn.qkv
    qlayer = build_method("framequant", bits=2).quantize(qkv.weight.detach(), torch.eye(qkv.in_features))
    model.blocks[0].attn.qkv = QuantLinear(qlayer.with_layout("packed"), qkv.bias.detach())
    units = FAMILIES["vit"].blocks(model)
    assert units[0].module.attn.qkv is model.blocks[0].attn.qkv and len(units) == 2
