import pytest
import torch

from fqbench.quant.grids import GridSpec, clip_rows


def test_minmax_grid_represents_zero_and_covers_the_range():
    w = torch.tensor([[0.5, 1.0, 2.0, 3.0], [-3.0, -1.0, 0.2, 0.4]])
    grid = GridSpec(2).fit(w)
    assert torch.all(grid.decode(grid.encode(torch.zeros(2))) == 0)
    levels = grid.decode(torch.arange(4.0).expand(2, 4))
    assert levels[0].min() <= 0 and levels[0].max() >= 2.9
    assert levels[1].min() <= -2.9


def test_symmetric_grid_is_centred_gptq_style():
    grid = GridSpec(3, symmetric=True).fit(torch.tensor([[-1.0, 0.25, 0.5]]))
    assert grid.zero.item() == 4  # (maxq + 1) / 2
    assert torch.allclose(grid.scale, torch.tensor([2.0 / 7]), rtol=1e-3)


def test_mse_search_never_increases_error():
    w = torch.randn(64, 256) ** 3
    plain, searched = GridSpec(3).fit(w), GridSpec(3, mse=True).fit(w)
    err = lambda g: (g.decode(g.encode(w)) - w).abs().pow(2.4).sum(dim=1)  # noqa: E731
    assert torch.all(err(searched) <= err(plain) + 1e-6)
    assert err(searched).sum() < 0.9 * err(plain).sum()


@pytest.mark.parametrize("zero_point", ["integer", "float"])
def test_sigma_grid_spans_mean_plus_minus_c_std(zero_point):
    torch.manual_seed(0)
    w = torch.randn(8, 4096) * 0.1 + 0.03
    grid = GridSpec(2, "sigma", clip_sigma=2.0, zero_point=zero_point).fit(w)
    levels = grid.decode(torch.arange(4.0).expand(8, 4))
    mean, std = w.mean(1, keepdim=True), w.std(1, keepdim=True)
    assert torch.allclose(levels[:, -1] - levels[:, 0], (4 * std).squeeze(1), rtol=2e-3)
    if zero_point == "float":
        # centred: mean + {-2, -2/3, 2/3, 2} * std
        expected = mean + torch.tensor([-2, -2 / 3, 2 / 3, 2]) * std
        assert torch.allclose(levels, expected, atol=3e-3 * std.max())
    else:
        assert torch.equal(grid.zero, grid.zero.round())
        # the integer zero point moves the grid by less than one step off centre
        centre = levels.mean(dim=1, keepdim=True)
        assert torch.all((centre - mean).abs() <= grid.scale.unsqueeze(1) / 2 + 1e-6)


def test_quip_grid_levels():
    torch.manual_seed(0)
    w = torch.randn(16, 512)
    grid = GridSpec(2, "quip").fit(w)
    s = 2.4 * w.square().mean().sqrt()
    levels = grid.decode(torch.arange(4.0).expand(16, 4))[0]
    assert torch.allclose(levels, torch.stack([-s, -s / 3, s / 3, s]), rtol=2e-3)


def test_scales_are_float16_exact():
    grid = GridSpec(4, "sigma", zero_point="float").fit(torch.randn(32, 100))
    assert torch.equal(grid.scale, grid.scale.half().float())
    assert torch.equal(grid.zero, grid.zero.half().float())


def test_constant_rows_are_represented_exactly():
    w = torch.tensor([[0.3] * 5, [0.0] * 5])
    for spec in (GridSpec(2, "sigma"), GridSpec(2)):
        grid = spec.fit(w)
        assert torch.allclose(grid.decode(grid.encode(w)), w, atol=1e-3)


def test_clip_rows():
    w = torch.tensor([[0.0, 0.0, 0.0, 0.0, 10.0]])
    clipped = clip_rows(w, 1.0)
    assert clipped.max() == pytest.approx(float(w.mean() + w.std()))


@pytest.mark.parametrize("bad", [0, 9, 2.5, True, -1])
def test_bad_bits(bad):
    with pytest.raises(ValueError, match="bits"):
        GridSpec(bad)


def test_bad_grid_options():
    with pytest.raises(ValueError, match="kind"):
        GridSpec(2, "kmeans")
    with pytest.raises(ValueError, match="zero_point"):
        GridSpec(2, "sigma", zero_point="half")
    with pytest.raises(ValueError, match="clip_sigma"):
        GridSpec(2, "sigma", clip_sigma=0)


def test_codes_are_integers_for_float_zero_points():
    w = torch.randn(16, 300)
    for spec in (GridSpec(2, "sigma", zero_point="float"), GridSpec(3, "quip"), GridSpec(2, "sigma")):
        grid = spec.fit(w)
        q = grid.encode(w)
        assert torch.equal(q, q.round()) and q.min() >= 0 and q.max() <= spec.maxq
        # every value lands on its nearest level inside the range
        levels = grid.decode(torch.arange(spec.maxq + 1.0).expand(16, -1))
        nearest = (w.unsqueeze(2) - levels.unsqueeze(1)).abs().argmin(dim=2).float()
        assert (nearest == q).float().mean() > 0.999


@pytest.mark.parametrize("bits, gaussian_mse", [(2, 0.1188), (3, 0.03744), (4, 0.01154)])
def test_lloyd_grid_has_least_squared_error(bits, gaussian_mse):
    torch.manual_seed(0)
    w = torch.randn(32, 8192) * 0.05 + 0.01
    err = lambda g: (g.decode(g.encode(w)) - w).square().sum(dim=1)  # noqa: E731
    lloyd = GridSpec(bits, "lloyd", zero_point="float").fit(w)
    assert not lloyd.integer_zero and torch.equal(lloyd.scale, lloyd.scale.half().float())
    for start in (GridSpec(bits), GridSpec(bits, "sigma", zero_point="float")):
        assert torch.all(err(lloyd) <= err(start.fit(w)) * (1 + 1e-3))
    # the optimum uniform quantizer of a Gaussian (Max 1960): the grid finds it from data
    assert float(err(lloyd).mean()) / w.shape[1] / 0.05**2 == pytest.approx(gaussian_mse, rel=0.01)
    # an integer zero point (stored at `bits` bits) costs some error (2 bits: four levels cannot be centred)
    integer = GridSpec(bits, "lloyd").fit(w)
    assert integer.integer_zero and torch.equal(integer.zero, integer.zero.round())
    assert err(integer).sum() <= min(1.1 * err(lloyd).sum(), err(GridSpec(bits, "sigma").fit(w)).sum())


def test_lloyd_grid_on_skewed_rows_moves_its_zero_point():
    torch.manual_seed(0)
    w = torch.randn(4, 4096).exp()  # log-normal: the least-error grid is not centred on the mean
    lloyd, centred = GridSpec(3, "lloyd", zero_point="float").fit(w), GridSpec(3, "sigma", zero_point="float").fit(w)
    err = lambda g: (g.decode(g.encode(w)) - w).square().sum()  # noqa: E731
    assert err(lloyd) < 0.8 * err(centred)
