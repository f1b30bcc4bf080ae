import math

import pytest
import torch

from fqbench.methods import build_method, registered_methods
from fqbench.quant.checks import proxy_error

ALL_METHODS = ["fp", "rtn", "gptq", "gptq_clip", "quip", "quip_clip", "quip_sharp", "framequant"]


def held_out_error(W, layer, X):
    """Relative output error on inputs the method never saw."""
    ref = X @ W.T
    return float((layer(X) - ref).square().sum() / ref.square().sum())


def test_registry_has_every_method():
    assert set(ALL_METHODS) <= set(registered_methods())


@pytest.mark.parametrize("name", ALL_METHODS)
@pytest.mark.parametrize("shape", [(96, 128), (172, 100)])
def test_layer_api(name, shape, layer_factory):
    W, H, X = layer_factory(*shape)
    options = {} if name == "fp" else {"bits": 3}
    layer = build_method(name, **options).quantize(W, H)
    w_hat = layer.weight()
    assert w_hat.shape == W.shape and w_hat.dtype == torch.float32
    assert torch.allclose(layer(X[:16]), X[:16] @ w_hat.T, atol=1e-4, rtol=1e-4)
    assert layer.bits_per_weight > 0 and layer.method == name
    if name == "fp":
        assert torch.equal(w_hat, W) and layer.bits_per_weight == 32
    else:
        assert 0 < proxy_error(W, w_hat, H) < 0.5
        assert layer.nominal_bits == 3


def test_honest_bits_gptq_and_rtn(layer_factory):
    W, H, _ = layer_factory(96, 128)
    out, inp = W.shape
    for name in ("gptq", "rtn"):
        layer = build_method(name, bits=2).quantize(W, H)
        # codes + a float16 scale and a 2-bit zero point per row
        assert layer.bits_per_weight == pytest.approx(2 + (16 + 2) / inp)
        groups = {"groupsize": 32} if name == "rtn" else {"solver": {"groupsize": 32}}
        grouped = build_method(name, bits=2, **groups).quantize(W, H)
        assert grouped.bits_per_weight == pytest.approx(2 + 4 * (16 + 2) / inp)
    act = build_method("gptq", bits=2, solver={"groupsize": 32, "act_order": True}).quantize(W, H)
    # act-order with dynamic groups must store each column's group (2 bits for 4 groups)
    assert act.bits_per_weight == pytest.approx(2 + 4 * (16 + 2) / inp + 2 / out)


def test_honest_bits_framequant_both_sides_and_input_only(layer_factory):
    W, H, _ = layer_factory(256, 512)
    both = build_method("framequant", bits=2, redundancy=1.1).quantize(W, H)
    r = both.in_op.effective_redundancy
    assert r == pytest.approx(1.125) and both.effective_redundancy == pytest.approx(r * r)
    rows = 256 * r
    expected = (2 * r * r * 256 * 512 + rows * (16 + 2) + 2 * 192) / (256 * 512)
    assert both.bits_per_weight == pytest.approx(expected)
    assert both.bits_per_weight > 2.53 and both.nominal_bits == pytest.approx(2.2)
    one = build_method("framequant", bits=2, redundancy=1.1, redundancy_sides="input").quantize(W, H)
    assert one.effective_redundancy == pytest.approx(1.125)
    assert one.bits_per_weight == pytest.approx((2 * 1.125 * 256 * 512 + 256 * 18 + 2 * 192) / (256 * 512))


def test_quip_bits_count_the_rescaling_vector(layer_factory):
    W, H, _ = layer_factory(96, 128)
    layer = build_method("quip", bits=2).quantize(W, H)
    assert layer.bits_per_weight == pytest.approx(2 + (16 + 128 * 16 + 2 * 192) / (96 * 128))


def test_frames_and_incoherence_win_at_two_bits_on_heavy_tails(layer_factory):
    """Paper's central claim at the layer level: outliers ruin GPTQ at 2 bits, not frames."""
    W, H, X = layer_factory(256, 512, samples=4096, heavy_tailed=True, outlier_channels=8)
    err = {}
    for name, options in [
        ("gptq", {}),
        ("quip_clip", {}),
        ("framequant_1.0", {"redundancy": 1.0}),
        ("framequant_1.1", {"redundancy": 1.1}),
        ("framequant_1.25", {"redundancy": 1.25}),
    ]:
        method = build_method(name.split("_1")[0], bits=2, **options)
        err[name] = proxy_error(W, method.quantize(W, H).weight(), H)
    assert err["framequant_1.0"] < 0.5 * err["gptq"]
    assert err["quip_clip"] < 0.5 * err["gptq"]
    assert err["framequant_1.25"] < err["framequant_1.1"] < err["framequant_1.0"]


def test_same_seed_is_bit_identical_and_seeds_differ(layer_factory):
    W, H, _ = layer_factory(96, 128)
    for name in ("framequant", "quip"):
        a = build_method(name, bits=2, seed=3).quantize(W, H)
        b = build_method(name, bits=2, seed=3).quantize(W, H)
        c = build_method(name, bits=2, seed=4).quantize(W, H)
        assert torch.equal(a.weight(), b.weight())
        assert torch.equal(a.inner.codes, b.inner.codes)
        assert not torch.equal(a.in_op.rotation.matrix(), c.in_op.rotation.matrix())
        assert not torch.equal(a.weight(), c.weight())
        # the per-call seed overrides the config (the engine seeds every layer)
        assert torch.equal(build_method(name, bits=2).quantize(W, H, seed=3).weight(), a.weight())


def test_framequant_options(layer_factory):
    W, H, X = layer_factory(96, 128, heavy_tailed=True)
    base = build_method("framequant", bits=2).quantize(W, H)
    for options in [dict(zero_point="float"), dict(clip_sigma=None), dict(clip_sigma=3.0), dict(rotation="kronecker"),
                    dict(frame_block=4, redundancy=1.25), dict(solver={"act_order": True}), dict(denoise=True)]:
        layer = build_method("framequant", bits=2, **options).quantize(W, H)
        assert not torch.equal(layer.weight(), base.weight()), options
        assert proxy_error(W, layer.weight(), H) < 0.5
    quantized_acts = build_method("framequant", bits=2, act_bits=8).quantize(W, H)
    y = quantized_acts(X[:8])
    assert torch.allclose(y, X[:8] @ quantized_acts.weight().T, rtol=0.05, atol=0.05 * y.abs().max().item())
    assert not torch.allclose(y, X[:8] @ quantized_acts.weight().T, rtol=1e-6, atol=1e-7)


def test_framequant_handles_awkward_dimensions():
    g = torch.Generator().manual_seed(0)
    for out_features, in_features in [(172, 1000), (33, 1032), (1, 64)]:
        W = torch.randn(out_features, in_features, generator=g)
        X = torch.randn(4 * in_features, in_features, generator=g, dtype=torch.float64)
        H = 2 * X.T @ X / X.shape[0]
        layer = build_method("framequant", bits=4, redundancy=1.1).quantize(W, H)
        assert layer.weight().shape == W.shape
        assert proxy_error(W, layer.weight(), H) < 0.05
        assert layer.effective_redundancy >= 1.0


BAD_INPUTS = [
    ("nan in W", lambda W, H: (W.index_put((torch.tensor([0]), torch.tensor([0])), torch.tensor(float("nan"))), H), "W contains"),
    ("inf in H", lambda W, H: (W, H.index_put((torch.tensor([1]), torch.tensor([1])), torch.tensor(float("inf"), dtype=H.dtype))), "H contains"),
    ("shapes", lambda W, H: (W, H[:-1, :-1]), "H must be"),
    ("1-D W", lambda W, H: (W[0], H), "2-D"),
    ("H not square", lambda W, H: (W, H[:, :-1]), "square"),
]


@pytest.mark.parametrize("name", ["rtn", "gptq", "quip", "framequant"])
@pytest.mark.parametrize("case,corrupt,message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_are_named(name, case, corrupt, message, layer_factory):
    W, H, _ = layer_factory(32, 64)
    W, H = corrupt(W, H)
    with pytest.raises(ValueError, match=message):
        build_method(name, bits=2).quantize(W, H)


@pytest.mark.parametrize("options,message", [
    (dict(bits=0), "bits=0"),
    (dict(bits=9), "bits=9"),
    (dict(redundancy=0.9), "redundancy=0.9"),
    (dict(redundancy=float("nan")), "redundancy=nan"),
    (dict(redundancy_sides="output"), "redundancy_sides"),
    (dict(rotation="fourier"), "fourier"),
    (dict(frame_block=0), "block"),
])
def test_bad_framequant_options(options, message, layer_factory):
    W, H, _ = layer_factory(32, 64)
    with pytest.raises(ValueError, match=message):
        build_method("framequant", **options).quantize(W, H)


def test_unknown_method_and_option():
    with pytest.raises(ValueError, match="unknown method 'gptx'.*framequant"):
        build_method("gptx")
    with pytest.raises(ValueError, match="unknown option.*'blocks'.*valid options: bits, symmetric, mse"):
        build_method("gptq", blocks=3)
    with pytest.raises(ValueError, match="method.solver.blocks: Key 'blocks' not in 'SolverOptions'"):
        build_method("gptq", solver={"blocks": 3})
    with pytest.raises(ValueError, match="blocksize"):
        build_method("gptq", solver={"blocksize": "many"})


def test_nominal_bits():
    assert build_method("framequant", bits=2, redundancy=1.1).nominal_bits == pytest.approx(2.2)
    assert build_method("gptq", bits=3).nominal_bits == 3
    assert math.isclose(build_method("quip_clip", bits=2).nominal_bits, 2)


@pytest.mark.parametrize("redundancy", [1.0, 1.1])
def test_wiener_denoising_lowers_the_error(redundancy, layer_factory):
    W, H, X = layer_factory(128, 256, samples=2048, heavy_tailed=True, outlier_channels=4)
    plain = build_method("framequant", bits=2, redundancy=redundancy).quantize(W, H)
    denoised = build_method("framequant", bits=2, redundancy=redundancy, denoise=True).quantize(W, H)
    assert torch.equal(plain.inner.codes, denoised.inner.codes)  # only the scales change
    assert proxy_error(W, denoised.weight(), H) < proxy_error(W, plain.weight(), H)
    assert held_out_error(W, denoised, X) < held_out_error(W, plain, X)
    assert denoised.bits_per_weight == plain.bits_per_weight


def frame_proxy(W, H, layer, hessian_reg=0.01, percdamp=0.01):
    """The calibration proxy FrameQuant's solver minimises, ``tr(dD H_F dD^T)``, computed anew from the layer:
    frame coefficients of the weights, the trace-normalised regularised Hessian in frame space, damped."""
    n = H.shape[0]
    H = H * (n / torch.trace(H))
    H.diagonal().add_(hessian_reg)
    in_op, out_op = layer.in_op, layer.out_op
    W = W if layer.output_scale is None else W / layer.output_scale.float()[:, None]
    D = out_op.analysis(in_op.analysis(W.float()).T).T.double()
    H_frame = in_op.analysis(in_op.analysis(H.float()).T).double()
    H_frame.diagonal().add_(percdamp * float(H_frame.diagonal().mean()))
    dD = D - layer.inner.weight().double()
    return float(((dD @ H_frame) * dD).sum())


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("redundancy", [1.0, 1.1])
def test_auto_clip_is_never_worse_than_the_paper_clip(bits, redundancy, layer_factory):
    from fqbench.methods.framequant import CLIP_THRESHOLDS

    chosen = set()
    for seed, shape in enumerate([(96, 128), (64, 172), (128, 64)]):
        W, H, X = layer_factory(*shape, heavy_tailed=bool(seed % 2), outlier_channels=seed, seed=seed)
        paper = build_method("framequant", bits=bits, redundancy=redundancy).quantize(W, H, seed=seed)
        auto = build_method("framequant", bits=bits, redundancy=redundancy, clip_sigma="auto").quantize(W, H, seed=seed)
        sigma = auto.info["clip_sigma"]
        assert sigma in CLIP_THRESHOLDS or sigma == "none"
        chosen.add(sigma)
        assert frame_proxy(W, H, auto) <= frame_proxy(W, H, paper) * (1 + 1e-5)
        assert auto.info["clip_error_vs_reference"] <= 1
        if sigma == 2.0:  # the paper's threshold won: the very same solution
            assert torch.equal(auto.weight(), paper.weight())
        assert auto.bits_per_weight == paper.bits_per_weight
    if bits == 4:  # the paper's 2-sigma clip is a 2-bit choice: at 4 bits the search always moves away from it
        assert 2.0 not in chosen


def test_auto_clip_at_four_bits_matches_gptq_where_the_paper_clip_does_not(layer_factory):
    W, H, X = layer_factory(128, 256)  # Gaussian weights: no tails for a frame to tame
    gptq = held_out_error(W, build_method("gptq", bits=4).quantize(W, H), X)
    paper = held_out_error(W, build_method("framequant", bits=4).quantize(W, H), X)
    auto = held_out_error(W, build_method("framequant", bits=4, clip_sigma="auto").quantize(W, H), X)
    auto_mse = held_out_error(W, build_method("framequant", bits=4, clip_sigma="auto", grid_fit="mse").quantize(W, H), X)
    assert paper > 2 * gptq and auto < 1.05 * gptq and auto_mse < gptq


def test_normalized_rows_spread_the_error_relative_to_each_row(layer_factory):
    W, H, X = layer_factory(64, 128, heavy_tailed=True)
    W = W * torch.logspace(-2, 0, 64)[:, None]  # rows a hundred times apart in size
    plain = build_method("framequant", bits=3).quantize(W, H)
    normalized = build_method("framequant", bits=3, normalize_rows=True).quantize(W, H)
    assert normalized.output_scale.dtype == torch.float16 and normalized.output_scale.shape == (64,)
    assert normalized.bits_per_weight == pytest.approx(plain.bits_per_weight + 16 / 128)

    def worst_row_error(layer):
        ref = X @ W.T
        return float(((layer(X) - ref).square().sum(0) / ref.square().sum(0)).max())

    assert worst_row_error(normalized) < 0.2 * worst_row_error(plain)


def test_mse_grid_fit_lowers_the_error_of_frame_coefficients(layer_factory):
    W, H, X = layer_factory(96, 128, heavy_tailed=True, outlier_channels=2)
    for bits in (2, 3, 4):
        sigma = build_method("framequant", bits=bits, clip_sigma=None).quantize(W, H)
        mse = build_method("framequant", bits=bits, clip_sigma=None, grid_fit="mse").quantize(W, H)
        assert mse.inner.integer_zero and mse.bits_per_weight == sigma.bits_per_weight
        assert held_out_error(W, mse, X) < held_out_error(W, sigma, X)
        centred = build_method("framequant", bits=bits, clip_sigma=None, grid_fit="mse", zero_point="float")
        assert not centred.quantize(W, H).inner.integer_zero


@pytest.mark.parametrize("options,message", [
    (dict(clip_sigma="often"), "clip_sigma='often'"),
    (dict(clip_sigma=-1.0), "clip_sigma=-1.0"),
    (dict(grid_fit="kmeans"), "grid_fit"),
    (dict(zero_point="half"), "zero_point"),
    (dict(budget_bits=0.0), "budget_bits=0"),
    (dict(budget_bits=2.5, budget_redundancies=[0.5]), "budget_redundancies"),
    (dict(budget_bits=2.5, budget_bit_widths=[2, 12]), "bits=12"),
])
def test_bad_clip_grid_and_budget_options(options, message):
    with pytest.raises(ValueError, match=message):
        build_method("framequant", **options)
