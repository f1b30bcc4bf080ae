"""PTQ4ViT-style baseline: the quantizers and their two ranges, the scale search, honest bits, and the
model-level calibration (weight-only and weights+activations) on a small timm ViT and Swin."""

import pytest
import torch

from baselines.ptq4vit import PTQ4ViTConfig, search_scale, symmetric_weight
from fqbench.quantized.activations import GELU_MIN, twin_gelu_quantize, twin_softmax_quantize, uniform_quantize
from fqbench.methods import build_method
from fqbench.models.timm import adapter_for, load_timm_model
from fqbench.quantized import QuantLinear
from vision_helpers import model_config


def test_uniform_quantizer_is_symmetric_signed():
    delta = 0.5
    x = torch.linspace(-3, 3, 601)
    q = uniform_quantize(x, delta, bits=2)
    assert sorted(set((q / delta).round().tolist())) == [-2, -1, 0, 1]  # clamp(round(x/d), -2^(k-1), 2^(k-1)-1)
    inside = x.abs() <= 0.5  # within the grid the error is at most half a step
    assert (q[inside] - x[inside]).abs().max() <= delta / 2 + 1e-7
    assert torch.equal(uniform_quantize(x, delta, 8), torch.round(x / delta) * delta)  # no clamping needed


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_twin_softmax_has_a_fine_range_below_the_split_and_a_coarse_one_above(bits):
    steps = 2 ** (bits - 1) - 1
    split = 2.0 ** -4
    x = torch.rand(20000, generator=torch.Generator().manual_seed(0)) ** 3  # softmax-like: mostly tiny
    q = twin_softmax_quantize(x, split, bits)
    low, high = x <= split, x > split
    fine, coarse = split / steps, 1.0 / steps
    # Range 1: [0, split] with step split / (2^(k-1) - 1); range 2: [0, 1] with step 1 / (2^(k-1) - 1).
    assert torch.allclose(q[low] / fine, (q[low] / fine).round(), atol=1e-4)
    assert (q[low] - x[low]).abs().max() <= fine / 2 + 1e-7 and q[low].max() <= split + 1e-7
    assert torch.allclose(q[high] / coarse, (q[high] / coarse).round(), atol=1e-4)
    assert (q[high] - x[high]).abs().max() <= coarse / 2 + 1e-7
    assert len(set(q[low].tolist())) <= steps + 1 and len(set(q[high].tolist())) <= steps + 1
    # Small probabilities keep a resolution that one k-bit range over [0, 1] cannot give them.
    single = torch.round(x * (2 ** bits - 1)) / (2 ** bits - 1)
    assert (q[low] - x[low]).abs().max() < (single[low] - x[low]).abs().max()


def test_twin_softmax_at_two_bits_keeps_one_level_per_range():
    split = 0.25
    x = torch.tensor([0.0, 0.1, 0.2, 0.25, 0.3, 0.6, 1.0])
    assert twin_softmax_quantize(x, split, 2).tolist() == [0.0, 0.0, 0.25, 0.25, 0.0, 1.0, 1.0]


@pytest.mark.parametrize("bits", [3, 6, 8])
def test_twin_gelu_has_a_fixed_negative_range_and_a_searched_positive_one(bits):
    q = 2 ** (bits - 1)
    delta_pos = 0.05
    x = torch.nn.functional.gelu(torch.linspace(-6, 6, 5001))
    out = twin_gelu_quantize(x, delta_pos, bits)
    neg, pos = x < 0, x >= 0
    delta_neg = GELU_MIN / q
    assert torch.allclose(out[neg] / delta_neg, (out[neg] / delta_neg).round(), atol=1e-4)
    assert out[neg].min() >= -GELU_MIN - 1e-7 and (out[neg] - x[neg]).abs().max() <= delta_neg / 2 + 1e-7
    assert torch.allclose(out[pos] / delta_pos, (out[pos] / delta_pos).round(), atol=1e-4)
    assert out[pos].max() <= (q - 1) * delta_pos + 1e-6  # the positive range saturates at (2^(k-1) - 1) steps
    # The negative values, all within 0.17 of zero, keep a resolution a single signed grid would not give them.
    signed = uniform_quantize(x, delta_pos, bits)
    assert (out[neg] - x[neg]).abs().max() < (signed[neg] - x[neg]).abs().max()


def test_search_never_ends_worse_than_its_start():
    generator = torch.Generator().manual_seed(0)
    for trial in range(50):
        table = torch.rand(30, 3, generator=generator)  # arbitrary per-block metrics of 30 candidate steps
        start = torch.randint(0, 30, (3,), generator=generator).float()

        def score(values):
            return table[values.long(), torch.arange(3)]

        candidates = [torch.full((3,), float(i)) for i in torch.randperm(30, generator=generator).tolist()]
        best, best_score = search_scale(start, candidates[: trial % 30 + 1], score)
        assert torch.all(best_score <= score(start)) and torch.equal(best_score, score(best))
    # All candidates worse: the start is kept.
    best, _ = search_scale(torch.tensor([1.0]), [torch.tensor([2.0]), torch.tensor([3.0])], lambda s: s)
    assert best.item() == 1.0


def test_candidates_follow_the_reference_formula():
    factors = PTQ4ViTConfig(alpha=0.01, beta=1.2, candidates=100).factors()
    assert len(factors) == 101 and factors[0] == 0.01 and abs(factors[-1] - 1.2) < 1e-12
    assert abs(factors[50] - (0.01 + 50 * 1.19 / 100)) < 1e-12
    with pytest.raises(ValueError, match="need 0 < alpha < beta"):
        PTQ4ViTConfig(alpha=1.2, beta=0.01)
    with pytest.raises(ValueError, match="at least 2 bits"):
        PTQ4ViTConfig(bits=1)


def test_symmetric_layer_stores_codes_and_one_step_per_block():
    W = torch.randn(96, 40)
    deltas = torch.tensor([0.1, 0.2, 0.3]).half().float()
    layer = symmetric_weight(W, deltas, bits=3)
    expected = torch.cat([uniform_quantize(b, d, 3) for b, d in zip(W.split(32), deltas)])
    assert torch.equal(layer.weight(), expected)
    assert {name: s.bits for name, s in layer.stored().items()} == {"codes": 96 * 40 * 3, "scale": 3 * 16}
    assert layer.bits_per_weight == 3 + 48 / (96 * 40)


def test_is_a_model_level_method():
    method = build_method("ptq4vit", bits=2)
    assert method.tier == "model" and not hasattr(method, "quantize")


def small_model(name):
    if name.startswith("swin"):
        cfg = model_config(name, "+model.kwargs.depths=[2,2]", "+model.kwargs.num_heads=[2,4]",
                           "+model.kwargs.embed_dim=32", "+model.kwargs.img_size=32", "+model.kwargs.window_size=4",
                           "+model.kwargs.num_classes=10")
    else:
        cfg = model_config(name, "+model.kwargs.depth=2", "+model.kwargs.img_size=32", "+model.kwargs.embed_dim=64",
                           "+model.kwargs.num_heads=2", "+model.kwargs.num_classes=10")
    torch.manual_seed(0)
    model = load_timm_model(cfg)
    return model, adapter_for(cfg.family, model)


@pytest.mark.parametrize("name", ["vit_t", "swin_t"])
def test_weight_only_calibration_puts_every_linear_on_its_grid(name):
    model, layout = small_model(name)
    images = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    before = {n: p.clone() for n, p in model.named_parameters()}
    method = build_method("ptq4vit", bits=3, candidates=20)
    records, layers = method.quantize_model(model, layout, images, device="cpu", progress=False)
    units = layout.blocks(model)
    assert list(layers) == [r.name for r in records]
    assert [r.name for r in records] == [f"{u.name}.{n}" for u in units for n in u.linears()]
    for record in records:
        weight = model.get_submodule(record.name).weight
        blocks = len(record.extra["weight_scales"])
        assert blocks == (3 if record.name.endswith("qkv") else 1)
        for rows, delta in zip(weight.split(weight.shape[0] // blocks), record.extra["weight_scales"]):
            codes = rows / delta
            assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.min() >= -4 and codes.max() <= 3
        assert record.bits_per_weight == 3 + 16 * blocks / weight.numel() and record.nominal_bits == 3
        assert 0 < record.proxy_error < 1
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {r.name + ".weight" for r in records}  # patch embedding, norms, biases and head untouched
    assert all(p.requires_grad for p in model.parameters())


def test_weights_and_activations_quantize_the_forward():
    model, layout = small_model("vit_t")
    images = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    weight_only, _ = small_model("vit_t")
    build_method("ptq4vit", bits=4, candidates=10).quantize_model(weight_only, layout, images, device="cpu",
                                                                   progress=False)
    records, _ = build_method("ptq4vit", bits=4, act_bits=4, candidates=10, rounds=2).quantize_model(
        model, layout, images, device="cpu", progress=False)
    fc2 = next(r for r in records if r.name == "blocks.0.mlp.fc2")
    assert fc2.extra["act_quantizer"] == "twin_gelu" and fc2.extra["act_bits"] == 4
    seen = {}
    assert isinstance(model.blocks[0].attn.qkv, QuantLinear) and isinstance(model.blocks[0].mlp.fc1, QuantLinear)
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, a, y, n=n: seen.__setitem__(n, (a[0], y)))
             for n in ("blocks.0.attn.qkv.input_quantizer", "blocks.0.attn.qkv", "blocks.0.mlp.fc1.input_quantizer",
                       "blocks.0.attn.attn_drop")]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        reference = weight_only(x)
    for hook in hooks:
        hook.remove()
    assert not torch.equal(out, reference)
    for name in ("blocks.0.attn.qkv", "blocks.0.mlp.fc1"):
        assert len(seen[f"{name}.input_quantizer"][1].unique()) <= 16  # the input reached the weights on a 4-bit grid
    q, k, v = seen["blocks.0.attn.qkv"][1].chunk(3, dim=-1)  # the hook's output: q, k and v on their grids
    assert all(len(t.unique()) <= 16 for t in (q, k, v))
    assert len(seen["blocks.0.attn.attn_drop"][1].unique()) <= 16  # two 3-bit ranges
    assert model.blocks[0].attn.fused_attn is False
