"""QuIP#: the E8P12 lattice codebook, exact nearest-codeword search, BlockLDLQ in the solver, the codebook
weight kind (honest bits, packed storage) and the method."""

import json

import pytest
import torch

from fqbench.methods import build_method
from fqbench.packing.format import pack_layer, unpack_layer
from fqbench.quant.codebook import DIM, E8_BALL_CODEBOOK, E8P12_CODEBOOK, VECTOR_CODEBOOKS
from fqbench.quant.quantizer import CodebookQuantizer, round_to_nearest
from fqbench.quant.solver import SolverOptions, gptq_solve
from fqbench.quantized import CodebookWeight, StateError, TransformedWeight

pytestmark = pytest.mark.usefixtures("one_thread")


def in_e8(v: torch.Tensor) -> torch.Tensor:
    """Whether each row of ``v`` (float64) is a point of E8 = D8 ∪ (D8 + 1/2)."""
    doubled = 2 * v
    integral = (v == v.round()).all(dim=1)
    half = (doubled == doubled.round()).all(dim=1) & ((doubled.round().long() % 2) == 1).all(dim=1)
    return (integral | half) & (v.sum(dim=1).round().long() % 2 == 0) & (v.sum(dim=1) == v.sum(dim=1).round())


# --- the codebooks -----------------------------------------------------------------------

def test_e8p12_is_2_to_16_distinct_points_of_e8_plus_a_quarter():
    points = E8P12_CODEBOOK.points().double()
    assert points.shape == (1 << 16, DIM) and E8P12_CODEBOOK.bits == 16
    assert torch.unique(points, dim=0).shape[0] == 1 << 16
    assert in_e8(points - 0.25).all()
    codes = torch.arange(1 << 16)
    shift = torch.where((codes >> 7) & 1 == 1, -0.25, 0.25).double()
    signed = points - shift.unsqueeze(1)  # the signed source: a point of D8 + 1/2
    assert in_e8(signed).all() and ((2 * signed).remainder(2) == 1).all()
    norms = signed.square().sum(dim=1)
    # 227 sources of squared norm at most 10 (the ball of D8 + 1/2), 29 of squared norm 12, 2^8 codewords each
    sources = codes >> 8
    assert ((norms <= 10) == (sources < 227)).all() and (norms[sources >= 227] == 12).all()
    assert torch.equal(signed.abs(), E8P12_CODEBOOK.sources().double()[sources])
    assert torch.unique(E8P12_CODEBOOK.sources(), dim=0).shape[0] == 256


def test_e8_ball_is_the_origin_the_roots_and_fifteen_axes():
    points = E8_BALL_CODEBOOK.points().double()
    assert points.shape == (256, DIM) and torch.unique(points, dim=0).shape[0] == 256
    assert in_e8(points).all()
    norms, counts = points.square().sum(dim=1).unique(return_counts=True)
    assert norms.tolist() == [0, 2, 4] and counts.tolist() == [1, 240, 15]


def brute_force_distance(codebook, x, mask=None):
    """Squared distances (float64) from each row of ``x`` to every codeword, over the kept entries."""
    weights = torch.ones(DIM, dtype=torch.float64) if mask is None else mask.double()
    points = codebook.points().double()
    x = x.double()
    return (x.square() @ weights).unsqueeze(1) + (points.square() @ weights) - 2 * (x * weights) @ points.T


@pytest.mark.parametrize("codebook", [E8P12_CODEBOOK, E8_BALL_CODEBOOK], ids=["e8p12", "e8_ball"])
@pytest.mark.parametrize("mask", [None, (1, 1, 0, 1, 0, 0, 1, 1), (1, 1, 1, 1, 0, 0, 0, 0)])
def test_nearest_codeword_is_exact_against_brute_force(codebook, mask):
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([0.3, 1.0, 2.0, 4.0]).repeat_interleave(100).unsqueeze(1)
    x = torch.randn(400, DIM, generator=g) * scales
    mask = None if mask is None else torch.tensor(mask, dtype=torch.bool)
    codes = codebook.nearest(x, mask)
    weights = torch.ones(DIM) if mask is None else mask.float()
    found = ((x - codebook.decode(codes)) ** 2 @ weights).double()
    assert torch.allclose(found, brute_force_distance(codebook, x, mask).min(dim=1).values, rtol=1e-5, atol=1e-6)


def test_residual_codebooks_lower_the_error_per_bit():
    x = torch.randn(2000, DIM, generator=torch.Generator().manual_seed(1))
    errors = {}
    for name, codebook in VECTOR_CODEBOOKS.items():
        scaled = x * codebook.rms_ratio
        decoded = codebook.decode(codebook.encode(scaled)) / codebook.rms_ratio
        errors[codebook.bits_per_weight] = float((decoded - x).square().mean())
    assert sorted(errors) == [2, 3, 4]
    # E8P12 at 2 bits: about 0.09 of the variance on Gaussian data; each further bit cuts it about 3x
    assert 0.08 < errors[2] < 0.1 and errors[3] < errors[2] / 2.5 and errors[4] < errors[3] / 2.5


# --- BlockLDLQ in the solver ---------------------------------------------------------------

def quantizer():
    return CodebookQuantizer(VECTOR_CODEBOOKS["e8p12"])


@pytest.mark.parametrize("cols", [64, 44])  # 44: a last group of four columns
def test_block_ldlq_on_a_diagonal_hessian_is_nearest_codeword_rounding(cols, layer_factory):
    W, _, _ = layer_factory(24, cols)
    H = torch.diag(torch.rand(cols, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) + 0.5)
    solved = gptq_solve(W, H, quantizer(), SolverOptions(blocksize=16))
    rounded = round_to_nearest(W, quantizer())
    assert torch.equal(solved.weight.stage_codes()[0], rounded.stage_codes()[0])
    assert torch.equal(solved.dequantized, rounded.weight())
    assert torch.equal(solved.weight.weight(), solved.dequantized)


def block_ldlq_reference(W: torch.Tensor, H: torch.Tensor, scale: float) -> torch.Tensor:
    """QuIP#'s BlockLDLQ written from its definition, in float64: ``H = (I + A) D (I + A)^T`` with A strictly
    block upper triangular (blocks of 8), and ``W_hat_k = Q(W_k + (W - W_hat)_{<k} A_{<k, k})`` in column order."""
    n = H.shape[0]
    flip = torch.arange(n - 1, -1, -1)
    C = torch.linalg.cholesky(H[flip][:, flip])  # the reversed H = C C^T gives an upper-lower factor of H
    blocks = torch.block_diag(*[C[k:k + DIM, k:k + DIM] for k in range(0, n, DIM)])
    unit_lower = C @ torch.linalg.inv(blocks)
    A = unit_lower[flip][:, flip] - torch.eye(n, dtype=H.dtype)
    W_hat = torch.zeros_like(W)
    codebook = VECTOR_CODEBOOKS["e8p12"]
    for k in range(0, n, DIM):
        target = W[:, k:k + DIM] + (W - W_hat)[:, :k] @ A[:k, k:k + DIM]
        codes = codebook.encode((target / scale).float())
        W_hat[:, k:k + DIM] = codebook.decode(codes).double() * scale
    return W_hat


def test_block_ldlq_follows_its_definition(layer_factory):
    W, H, _ = layer_factory(16, 64, correlated=True)
    W, H = W.double() * 50, H / torch.diag(H).mean() + 0.1 * torch.eye(64, dtype=torch.float64)
    solver = quantizer()
    solved = gptq_solve(W, H, solver, SolverOptions(blocksize=32, percdamp=0))
    reference = block_ldlq_reference(W, H, float(solver.scale))
    assert torch.allclose(solved.dequantized.double(), reference, atol=1e-4)
    # error feedback matters here: rounding each group on its own is clearly worse on this Hessian
    rounded = round_to_nearest(W.float(), quantizer()).weight().double()

    def proxy(W_hat):
        return float(torch.trace((W - W_hat) @ H @ (W - W_hat).T))

    assert proxy(reference) < 0.8 * proxy(rounded)


def test_act_order_is_refused(layer_factory):
    W, H, _ = layer_factory(8, 16)
    with pytest.raises(ValueError, match="act_order"):
        gptq_solve(W, H, quantizer(), SolverOptions(act_order=True))
    with pytest.raises(ValueError, match="act_order=false"):
        build_method("quip_sharp", solver={"act_order": True})


# --- the method and its weights ------------------------------------------------------------

def test_same_seed_same_codes_and_another_seed_other_codes(layer_factory):
    W, H, _ = layer_factory(64, 128)
    method = build_method("quip_sharp", bits=2)
    first, again, other = method.quantize(W, H, seed=3), method.quantize(W, H, seed=3), method.quantize(W, H, seed=4)
    assert torch.equal(first.inner.codes, again.inner.codes) and torch.equal(first.weight(), again.weight())
    assert not torch.equal(first.inner.codes, other.inner.codes)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_honest_bits_are_the_codes_the_scale_and_the_seeds(bits, layer_factory):
    W, H, _ = layer_factory(64, 128)
    layer = build_method("quip_sharp", bits=bits).quantize(W, H)
    assert isinstance(layer, TransformedWeight) and isinstance(layer.inner, CodebookWeight)
    stored = layer.stored()
    codes = sum(s.bits for name, s in stored.items() if name.startswith("inner.") and name.endswith("codes"))
    assert codes / W.numel() == bits  # exactly: 16 bits per 8 weights per E8P12 stage, 8 for the E8 ball
    assert stored["inner.scale"].bits == 32
    # plus the two Hadamard operators' specs (dimension, seed, ...), nothing else
    assert layer.stored_bits == codes + 32 + 2 * 192 and set(stored) - {"inner.codes", "inner.residual_codes"} == {
        "inner.scale", "in_op.spec", "in_op.redundancy", "out_op.spec", "out_op.redundancy"}
    assert layer.nominal_bits == bits


def test_quip_sharp_beats_quip_at_two_bits(layer_factory):
    W, H, X = layer_factory(128, 256, heavy_tailed=True, outlier_channels=2)

    def error(name):
        W_hat = build_method(name, bits=2).quantize(W, H).weight()
        return float((X @ (W_hat - W).T).square().sum() / (X @ W.T).square().sum())

    assert error("quip_sharp") < 0.8 * error("quip")


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("shape", [(48, 64), (40, 172)])  # 172 = 172 * 1: a last group of four columns
def test_layer_format_reloads_bit_identical(bits, shape, layer_factory):
    W, H, X = layer_factory(*shape)
    layer = build_method("quip_sharp", bits=bits).quantize(W, H)
    tensors, meta = pack_layer(layer)
    json.dumps(meta)
    assert meta["inner"]["kind"] == "codebook" and meta["inner"]["codebook"] == ("e8p12", "e8p12_rvq3")[bits - 2]
    for layout in ("plain", "packed"):
        rebuilt, _ = unpack_layer("layer", meta, tensors, layout)
        assert rebuilt.layout == layout and rebuilt.inner.layout == layout
        assert torch.equal(rebuilt.weight(), layer.weight())
        assert torch.equal(rebuilt(X[:8]), layer(X[:8]))
        assert rebuilt.bits_per_weight == layer.bits_per_weight
    stored = sum(t.numel() * t.element_size() * 8 for t in tensors.values())
    assert 0 <= stored - layer.stored_bits < 8 * 8 * len(tensors)
    assert layer.with_layout("kernel").layout == "packed"  # no inference kernel takes codebook codes


def test_dimensions_without_a_hadamard_transform_are_refused(layer_factory):
    W, H, _ = layer_factory(37, 64)
    with pytest.raises(ValueError, match="out dimension 37 .* not K \\* 2\\^m"):
        build_method("quip_sharp").quantize(W, H)


def test_bad_codebook_state_is_refused():
    codes = (torch.zeros(4, 2, dtype=torch.int32),)
    with pytest.raises(StateError, match="unknown codebook"):
        CodebookWeight(codes, torch.ones(1), codebook="e7", shape=(4, 16))
    with pytest.raises(StateError, match="2 stage"):
        CodebookWeight(codes, torch.ones(1), codebook="e8p12_rvq4", shape=(4, 16))
    with pytest.raises(ValueError, match="bits=5"):
        build_method("quip_sharp", bits=5)
