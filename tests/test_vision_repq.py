"""RepQ-ViT-style W/A quantization: the log-sqrt(2) -> log2 rewrite, the per-channel -> per-tensor
reparameterization (exact before rounding, found by checking rather than by names), the stored
quantizers in the model and the packed checkpoint, and a Swin through the vision pipeline."""

import json

import pytest
import timm
import torch
from torch import nn

from baselines.repq import dual_clip, find_folds, fold_channel_grid, uniform_grid
from fqbench.app import run_job
from fqbench.engine import BlockContext, BlockInputs, quantize_model
from fqbench.methods import build_method
from fqbench.models.adapter import Block
from fqbench.models.timm import FAMILIES
from fqbench.packing import load_quantized
from fqbench.pipelines.saving import save_run
from fqbench.quantized import QuantLinear
from fqbench.quantized.activations import (
    AffineQuantizer, Log2Quantizer, affine_codes, affine_quantize, log_sqrt2_codes, log_sqrt2_quantize,
)
from vision_helpers import SWIN_UNITS, small_swin_job

pytestmark = pytest.mark.usefixtures("one_thread")

VIT = ("vit_tiny_patch16_224", dict(depth=2, img_size=32, embed_dim=64, num_heads=2, num_classes=10))
SWIN = ("swin_tiny_patch4_window7_224", dict(depths=[2, 2], num_heads=[2, 4], embed_dim=32, img_size=32,
                                             window_size=4, num_classes=10))


def tiny(spec, seed=0):
    """A small timm model (random init) with random LayerNorm affine parameters, so that folding into them matters."""
    name, kwargs = spec
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            module.weight.data = torch.empty_like(module.weight).uniform_(0.2, 3.0, generator=generator)
            module.bias.data = torch.randn(module.bias.shape, generator=generator)
    return model, FAMILIES["vit" if name.startswith("vit") else "swin"]


def images(count=2, batch=4, seed=0):
    return [torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed + i)) for i in range(count)]


def block_inputs(model, blocks, x):
    """Every block's (args, kwargs) on one forward pass."""
    seen = {}
    handles = [b.module.register_forward_pre_hook(lambda m, a, k, name=b.name: seen.__setitem__(name, (a, k)),
                                                  with_kwargs=True) for b in blocks]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return seen


# --- the log2 rewrite of the log-sqrt(2) quantizer -------------------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_log2_rewrite_gives_the_log_sqrt2_codes_and_values(bits):
    generator = torch.Generator().manual_seed(bits)
    probs = torch.softmax(4 * torch.randn(3000, 64, generator=generator), dim=-1).flatten()
    edges = torch.tensor([0.0, 1.0, 2.0, 1e-30, 0.5, 0.25, 2 ** -0.25, 2 ** -0.75, -0.1])
    x = torch.cat([probs, edges])
    for scale in (1.0, 0.7, 0.31, 0.0123):
        scale = torch.tensor([scale])
        quantizer = Log2Quantizer(bits, scale=scale)
        exponent, parity = quantizer.encode(x)
        codes = log_sqrt2_codes(x, scale, bits)
        assert torch.equal((2 * exponent - parity).float(), codes)  # q = 2 ceil(q / 2) - (q mod 2)
        assert codes.min() >= 0 and codes.max() <= 2 ** bits - 1  # k bits hold every level and zero
        assert torch.allclose(quantizer(x), log_sqrt2_quantize(x, scale, bits), rtol=1e-6, atol=0)
        levels = log_sqrt2_quantize(x, scale, bits)
        nonzero = levels > 0
        steps = -2 * torch.log2(levels[nonzero] / scale)
        assert torch.allclose(steps, steps.round(), atol=1e-4)  # every level is scale * sqrt(2)^-q
    assert quantizer(torch.tensor([0.0, -1.0])).tolist() == [0.0, 0.0]


def test_log_sqrt2_levels_are_nearest_in_the_log_domain():
    scale = torch.tensor([1.0])
    x = torch.tensor([1.0, 0.8, 0.72, 0.5, 0.36, 2.0 ** -7.6])
    # -2 log2 x = 0, 0.64, 0.95, 2, 2.95, 15.2 -> codes 0, 1, 1, 2, 3 and (at 4 bits) the zero code 15.
    assert log_sqrt2_codes(x, scale, 4).tolist() == [0, 1, 1, 2, 3, 15]


# --- uniform grids and their search ----------------------------------------------------------------

def test_affine_quantizer_has_one_grid_per_chunk():
    q = AffineQuantizer(4, scale=torch.tensor([0.1, 0.2, 0.4]), zero=torch.tensor([3.0, 8.0, 0.0]))
    x = torch.randn(5, 7, 12, generator=torch.Generator().manual_seed(0))
    out = q(x)
    for chunk, got, scale, zero in zip(x.chunk(3, -1), out.chunk(3, -1), (0.1, 0.2, 0.4), (3.0, 8.0, 0.0)):
        codes = affine_codes(chunk, scale, zero, 4)
        assert codes.min() >= 0 and codes.max() <= 15
        assert torch.allclose(got, (codes - zero) * scale)
    with pytest.raises(ValueError, match="do not split into 3 chunks"):
        q(torch.randn(2, 10))


def test_dual_clipping_clips_heavy_tails_per_channel_and_not_at_high_bits():
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(20000, 3, generator=generator) * torch.tensor([0.1, 1.0, 5.0])
    X[:4, 1] = 12.0  # a few outliers in channel 1
    low, high = X.amin(0), X.amax(0)
    ratios = [1 - i * 0.0375 for i in range(25)]
    lower, upper = dual_clip(X, low, high, 4, ratios, rounds=2)
    assert upper[1] < 0.5 * high[1]  # the outliers are clipped, the bulk keeps its resolution
    error = (affine_quantize(X, *uniform_grid(lower, upper, 4), 4) - X).square().sum(0)
    full = (affine_quantize(X, *uniform_grid(low, high, 4), 4) - X).square().sum(0)
    assert torch.all(error <= full) and error[1] < 0.5 * full[1]
    lower, upper = dual_clip(X[4:], X[4:].amin(0), X[4:].amax(0), 12, ratios, rounds=2)
    assert torch.allclose(upper, X[4:].amax(0)) and torch.allclose(lower, X[4:].amin(0))  # 12 bits: no clipping


# --- the reparameterization ----------------------------------------------------------------------

@pytest.mark.parametrize("spec", [VIT, SWIN], ids=["vit", "swin"])
def test_folding_per_channel_grids_leaves_the_model_unchanged(spec):
    model, adapter = tiny(spec)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        reference = model(x)
    blocks = adapter.blocks(model)
    seen = block_inputs(model, blocks, x)
    generator = torch.Generator().manual_seed(1)
    folded = []
    for block in blocks:
        args, kwargs = seen[block.name]
        folds = find_folds(block.module, block.groups, args, kwargs, seed=0)
        expected = ({("reduction",): "norm"} if block.name.endswith("downsample")
                    else {("attn.qkv",): "norm1", ("mlp.fc1",): "norm2"})
        assert folds == expected
        for group, norm in folds.items():
            channels = block.module.get_submodule(norm).weight.numel()
            scale = torch.empty(channels).uniform_(0.05, 0.5, generator=generator)
            shared = group == ("reduction",)  # no bias: one zero point for all channels
            zero = torch.randint(0, 16, (1 if shared else channels,), generator=generator).float().expand(channels)
            fold_channel_grid(block.module.get_submodule(norm), [block.module.get_submodule(n) for n in group],
                              scale, zero)
            folded.append(norm)
    assert len(folded) == 2 * sum(not b.name.endswith("downsample") for b in blocks) + \
        sum(b.name.endswith("downsample") for b in blocks)
    with torch.no_grad():
        out = model(x)
    assert not torch.equal(out, reference)  # the parameters did change
    assert torch.allclose(out, reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())


def test_folded_per_tensor_codes_equal_the_per_channel_codes():
    model, adapter = tiny(VIT)
    block = adapter.blocks(model)[0]
    norm, qkv = block.module.norm1, block.module.attn.qkv
    tokens = torch.randn(64, 17, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y = norm(tokens)
        W, b = qkv.weight.clone(), qkv.bias.clone()
    scale, zero = uniform_grid(y.flatten(0, 1).amin(0), y.flatten(0, 1).amax(0), 4)  # per channel, 4 bits
    target_scale, target_zero = fold_channel_grid(norm, [qkv], scale, zero)
    assert scale.std() / scale.mean() > 0.3 and zero.unique().numel() > 3  # channels really differ
    with torch.no_grad():
        y_folded = norm(tokens)
        per_channel = affine_codes(y, scale, zero, 4)
        per_tensor = affine_codes(y_folded, target_scale, target_zero, 4)
        assert torch.equal(per_tensor, per_channel)
        # ... and the next linear computes the same output from the per-tensor codes
        expected = nn.functional.linear((per_channel - zero) * scale, W, b)
        got = qkv(affine_quantize(y_folded, target_scale, target_zero, 4))
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_a_norm_that_also_feeds_the_residual_is_not_folded():
    class PostNorm(nn.Module):  # the norm's output is both the linear's input and the block's residual
        def __init__(self):
            super().__init__()
            self.norm, self.fc = nn.LayerNorm(8), nn.Linear(8, 8)

        def forward(self, x):
            y = self.norm(x)
            return y + self.fc(y)

    class PreNorm(PostNorm):
        def forward(self, x):
            return x + self.fc(self.norm(x))

    x = torch.randn(4, 5, 8)
    assert find_folds(PostNorm(), (("fc",),), (x,), {}, seed=0) == {}
    assert find_folds(PreNorm(), (("fc",),), (x,), {}, seed=0) == {("fc",): "norm"}


# --- the method ----------------------------------------------------------------------------------

def test_repq_puts_its_quantizers_in_the_block():
    model, adapter = tiny(VIT)
    x = torch.randn(2, 3, 32, 32)
    method = build_method("repq", bits=4, act_bits=4)
    assert method.tier == "block" and method.nominal_bits == 4
    records = quantize_model(model, adapter, images(), method, device="cpu", progress=False).records
    assert [r.name for r in records] == [f"blocks.{i}.{n}" for i in range(2)
                                         for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    by_name = {r.name: r for r in records}
    assert by_name["blocks.0.attn.qkv"].extra["reparameterized_norm"] == "norm1"
    assert by_name["blocks.0.mlp.fc1"].extra["reparameterized_norm"] == "norm2"
    assert by_name["blocks.0.attn.proj"].extra["reparameterized_norm"] is None
    assert by_name["blocks.0.attn.qkv"].extra["probs_quantizer"] == "log2"
    assert all(r.extra["act_bits"] == 4 and r.nominal_bits == 4 for r in records)
    assert all(4 < r.bits_per_weight < 5 for r in records)  # 4-bit codes plus a float16 scale and zero per row
    block = model.blocks[0]
    assert block.attn.fused_attn is False and isinstance(block.attn.attn_drop, Log2Quantizer)
    assert block.attn.qkv.output_quantizer.scale.numel() == 3  # q, k, v
    seen = {}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, a, y, n=n: seen.__setitem__(n, y))
             for n in ("blocks.0.attn.qkv.input_quantizer", "blocks.0.mlp.fc2.input_quantizer",
                       "blocks.0.attn.qkv.output_quantizer", "blocks.0.attn.attn_drop")]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    for name in ("blocks.0.attn.qkv.input_quantizer", "blocks.0.mlp.fc2.input_quantizer"):
        assert isinstance(model.get_submodule(name), AffineQuantizer) and seen[name].unique().numel() <= 16
    assert all(t.unique().numel() <= 16 for t in seen["blocks.0.attn.qkv.output_quantizer"].chunk(3, dim=-1))
    assert seen["blocks.0.attn.attn_drop"].unique().numel() <= 16
    for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
        assert isinstance(block.get_submodule(n), QuantLinear)


def test_weight_methods_quantize_the_folded_weights():
    model, adapter = tiny(VIT)
    fq = build_method("repq", bits=3, act_bits=4, weight_method="framequant", weight_options={"redundancy": 1.0})
    assert fq.weight_method.name == "framequant" and fq.weight_method.config.bits == 3
    records = quantize_model(model, adapter, images(), fq, device="cpu", progress=False).records
    assert {r.extra["weight_method"] for r in records} == {"framequant"}
    assert all(r.extra["in_transform"] for r in records)  # frames around every folded weight
    assert model.blocks[0].attn.qkv.quantized.kind == "transformed"
    with pytest.raises(ValueError, match="model-level method"):
        build_method("repq", weight_method="ptq4vit")
    with pytest.raises(ValueError, match="quantizes the activations itself"):
        build_method("repq", weight_method="framequant", weight_options={"act_bits": 8})
    with pytest.raises(ValueError, match="are method.bits"):
        build_method("repq", weight_options={"bits": 2})


def test_language_model_blocks_are_refused_with_the_reason():
    from transformers import OPTConfig
    from transformers.models.opt.modeling_opt import OPTDecoderLayer

    layer = OPTDecoderLayer(OPTConfig(hidden_size=16, num_attention_heads=2, ffn_dim=32), layer_idx=0)
    block = Block("model.decoder.layers.0", layer, (("self_attn.q_proj",),))
    inputs = BlockInputs([(torch.randn(1, 4, 16),)], [{}])
    context = BlockContext([torch.randn(1, 4, 16)], torch.device("cpu"), 0, True)
    with pytest.raises(ValueError, match="RMSNorm has no bias"):
        build_method("repq").quantize_block(block, inputs, context)


@pytest.mark.parametrize("spec", [VIT, SWIN], ids=["vit", "swin"])
def test_stored_quantizers_reload_bit_identical(spec, tmp_path):
    model, adapter = tiny(spec)
    method = build_method("repq", bits=4, act_bits=4)
    layers = quantize_model(model, adapter, images(), method, device="cpu", keep_layers=True, progress=False).layers
    saved = save_run(model, layers, method, tmp_path, device="cpu", timm_name=spec[0], timm_kwargs=spec[1])
    config = json.loads((tmp_path / "packed" / "config.json").read_text())["quantization_config"]
    assert {m["kind"] for m in config["activation_quantizers"].values()} == {"log2"}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        for mode in ("dequantized", "packed"):
            loaded = load_quantized(saved["directory"], mode=mode)
            attention = loaded.blocks[0].attn if spec is VIT else loaded.layers[0].blocks[0].attn
            assert isinstance(attention.attn_drop, Log2Quantizer) and attention.fused_attn is False
            assert isinstance(attention.qkv.input_quantizer, AffineQuantizer)
            got = loaded(x)
            if mode == "dequantized":
                assert torch.equal(got, expected)
            else:
                assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_swin_through_the_pipeline_on_real_images(data_root, tmp_path):
    record = run_job(small_swin_job(data_root, tmp_path, "variant=repq_w4a4"), tmp_path / "run")
    assert record["status"] == "ok" and record["eval_images"] == 8
    assert [layer["name"] for layer in record["layers"]] == SWIN_UNITS
    reduction = record["layers"][8]
    assert reduction["extra"]["reparameterized_norm"] == "norm" and reduction["extra"]["shared_zero"] is True
    folded = {layer["name"]: layer["extra"]["reparameterized_norm"] for layer in record["layers"]}
    # At 64 px the first stages (16x16 and 8x8 tokens) pad their 7x7 windows with zeros after norm1, which a
    # fold would change: those norms stay as they are; the later stages (window = resolution) are folded.
    assert folded["layers.0.blocks.0.attn.qkv"] is None and folded["layers.1.blocks.0.attn.qkv"] is None
    assert folded["layers.2.blocks.0.attn.qkv"] == "norm1" and folded["layers.0.blocks.0.mlp.fc1"] == "norm2"
    assert record["summary"]["act_bits"] == 4 and record["nominal_bits"] == 4
    assert 4 < record["bits_per_weight"] < 4.5
