import hashlib

import pytest
import torch

from fqbench.frames import rotation as rotation_module
from fqbench.frames.hadamard import (
    SUPPORTED_ORDERS,
    apply_hadamard,
    fwht,
    hadamard_factor,
    hadamard_matrix,
)
from fqbench.frames.rotation import KINDS, make_rotation

REQUIRED_ORDERS = (1, 12, 20, 28, 36, 52, 60, 108, 116, 124, 140, 156, 172)
RANDOM_KINDS = ("hadamard", "kronecker", "orthogonal", "block_hadamard")
DENSE_DIMS = (1, 64, 96, 172, 384, 768, 1000, 1009, 1032)
LARGE_DIMS = (4096, 11008)


def sylvester(n):
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), h)
    return h


def randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def rotation_or_skip(dim, kind, seed=0):
    if kind == "hadamard" and hadamard_factor(dim) is None:
        pytest.skip(f"no Hadamard matrix of order {dim}")
    return make_rotation(dim, kind, seed)


# --- Hadamard matrices ---------------------------------------------------------


def test_required_orders_are_supported():
    assert set(REQUIRED_ORDERS) <= set(SUPPORTED_ORDERS)


@pytest.mark.parametrize("order", SUPPORTED_ORDERS)
def test_hadamard_matrix_of_every_supported_order(order):
    h = hadamard_matrix(order)
    assert h.dtype == torch.float64 and h.shape == (order, order)
    assert torch.all(h.abs() == 1)
    assert torch.equal(h @ h.T, order * torch.eye(order, dtype=torch.float64))


def test_hadamard_constructions_are_pinned():
    # Rotations are regenerated from (dim, seed): a change to any construction
    # silently changes every stored rotation, so it has to show up here.
    digest = hashlib.sha256()
    for order in SUPPORTED_ORDERS:
        digest.update(hadamard_matrix(order).to(torch.int8).numpy().tobytes())
    assert digest.hexdigest()[:16] == "b490865d3eed1de8"


@pytest.mark.parametrize(
    "n, factor",
    [(1, (1, 1)), (2, (1, 2)), (4096, (1, 4096)), (12, (12, 1)), (768, (12, 64)), (172, (172, 1)),
     (688, (172, 4)), (11008, (172, 64)), (1000, None), (1032, None), (6, None), (3, None), (188, None),
     (0, None)],
)
def test_hadamard_factor(n, factor):
    assert hadamard_factor(n) == factor


def test_hadamard_matrix_is_kronecker_of_small_and_sylvester():
    h = hadamard_matrix(172 * 4)
    assert torch.equal(h, torch.kron(hadamard_matrix(172), sylvester(4)))
    assert torch.equal(h @ h.T, 688 * torch.eye(688, dtype=torch.float64))


def test_hadamard_matrix_rejects_unsupported_order():
    with pytest.raises(ValueError, match=r"1000.*172"):
        hadamard_matrix(1000)


@pytest.mark.parametrize("d", [1, 2, 8, 128, 256, 512, 1024])
def test_fwht_matches_dense_sylvester(d):
    x = randn(2, 3, d)
    torch.testing.assert_close(fwht(x), x @ sylvester(d).T, rtol=0, atol=1e-9)


def test_fwht_is_its_own_inverse_up_to_scale_at_large_size():
    d = 2**15
    x = randn(4, d)
    torch.testing.assert_close(fwht(fwht(x)) / d, x, rtol=0, atol=1e-9)


def test_fwht_rejects_non_power_of_two():
    with pytest.raises(ValueError, match="12"):
        fwht(torch.zeros(3, 12))


@pytest.mark.parametrize("d", [12, 20 * 2, 96, 116 * 2, 156, 172 * 4])
def test_apply_hadamard_matches_dense(d):
    h = hadamard_matrix(d)
    x = randn(5, d)
    torch.testing.assert_close(apply_hadamard(x), x @ h.T, rtol=0, atol=1e-9)
    torch.testing.assert_close(apply_hadamard(x, transpose=True), x @ h, rtol=0, atol=1e-9)


# --- rotations: orthogonality and consistency ----------------------------------


@pytest.mark.parametrize("dim", DENSE_DIMS)
@pytest.mark.parametrize("kind", KINDS)
def test_rotation_is_orthogonal_and_apply_matches_matrix(kind, dim):
    rot = rotation_or_skip(dim, kind, seed=3)
    r = rot.matrix()
    assert r.dtype == torch.float64 and r.shape == (dim, dim)
    torch.testing.assert_close(r @ r.T, torch.eye(dim, dtype=torch.float64), rtol=0, atol=1e-10)
    x = randn(2, 3, dim, seed=1)
    torch.testing.assert_close(rot.apply(x), x @ r.T, rtol=0, atol=1e-10)
    torch.testing.assert_close(rot.apply_transpose(x), x @ r, rtol=0, atol=1e-10)


@pytest.mark.parametrize("dim", LARGE_DIMS)
@pytest.mark.parametrize("kind", ["auto", "hadamard", "kronecker", "block_hadamard"])
def test_large_rotation_preserves_norms_and_inverts(kind, dim):
    rot = make_rotation(dim, kind, seed=5)
    x = randn(4, dim, seed=2)
    y = rot.apply(x)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=0)
    torch.testing.assert_close(rot.apply_transpose(y), x, rtol=0, atol=1e-10)
    assert not torch.allclose(y, x)


def test_hadamard_rotation_is_signed_normalized_hadamard():
    for dim in (172, 768):
        r = make_rotation(dim, "hadamard", seed=7).matrix()
        h = hadamard_matrix(dim)
        signs = r[0] * dim**0.5 / h[0]
        assert torch.allclose(signs.abs(), torch.ones(dim, dtype=torch.float64))
        torch.testing.assert_close(r, h * signs / dim**0.5, rtol=0, atol=1e-15)


@pytest.mark.parametrize("dim, d1", [(64, 8), (1000, 25), (1032, 24)])
def test_kronecker_rotation_has_two_independent_factors(dim, d1):
    d2 = dim // d1
    r = make_rotation(dim, "kronecker", seed=0).matrix()
    # R = Q1 ⊗ Q2 exactly when this rearrangement is the rank-1 vec(Q1) vec(Q2)^T.
    m = r.reshape(d1, d2, d1, d2).permute(0, 2, 1, 3).reshape(d1 * d1, d2 * d2)
    u, s, vh = torch.linalg.svd(m)
    assert s[0] == pytest.approx(dim**0.5) and s[1] < 1e-10
    q1, q2 = u[:, 0].reshape(d1, d1) * d1**0.5, vh[0].reshape(d2, d2) * d2**0.5
    torch.testing.assert_close(q1 @ q1.T, torch.eye(d1, dtype=torch.float64), rtol=0, atol=1e-10)
    if d1 == d2:
        assert (q1 - q2).abs().max() > 0.1 and (q1 + q2).abs().max() > 0.1


def test_random_orthogonal_factors_are_sign_symmetric():
    # Haar-distributed Q has Q[0, 0] > 0 half of the time; QR without the sign
    # fix gives one sign always (LAPACK's Householder convention).
    positive = [make_rotation(3, "orthogonal", seed=s).matrix()[0, 0] > 0 for s in range(400)]
    assert 0.4 < sum(positive) / 400 < 0.6


def test_block_hadamard_384_has_three_identical_hadamard_blocks():
    r = make_rotation(384, "block_hadamard", seed=1).matrix()
    blocks = r.reshape(3, 128, 3, 128).permute(0, 2, 1, 3)
    for i in range(3):
        for j in range(3):
            if i != j:
                assert torch.all(blocks[i, j] == 0)
        assert torch.equal(blocks[i, i], blocks[0, 0])
    h = sylvester(128)
    signs = blocks[0, 0][0] * 128**0.5
    torch.testing.assert_close(blocks[0, 0], h * signs / 128**0.5, rtol=0, atol=1e-15)
    assert not torch.all(signs == signs[0])


# --- kinds and arguments -------------------------------------------------------


@pytest.mark.parametrize(
    "dim, kind",
    [(4096, "hadamard"), (11008, "hadamard"), (768, "hadamard"), (172, "hadamard"), (116 * 8, "hadamard"),
     (1, "hadamard"), (1000, "kronecker"), (1032, "kronecker"), (1009, "kronecker"), (3, "kronecker")],
)
def test_auto_resolution(dim, kind):
    rot = make_rotation(dim)
    assert (rot.kind, rot.dim, rot.seed) == (kind, dim, 0)


def test_auto_is_bitwise_the_resolved_kind():
    for dim in (768, 1000):
        auto = make_rotation(dim, "auto", seed=4)
        assert torch.equal(auto.matrix(), make_rotation(dim, auto.kind, seed=4).matrix())


def test_hadamard_kind_rejects_unsupported_dim():
    with pytest.raises(ValueError, match=r"1000.*auto.*kronecker"):
        make_rotation(1000, "hadamard")


def test_unknown_kind_lists_valid_kinds():
    with pytest.raises(ValueError, match=r"'dct'.*hadamard.*kronecker.*orthogonal.*block_hadamard.*identity"):
        make_rotation(64, "dct")


@pytest.mark.parametrize("dim", [0, -4, 2.0])
def test_invalid_dim(dim):
    with pytest.raises(ValueError):
        make_rotation(dim)


def test_input_checks():
    rot = make_rotation(64)
    with pytest.raises(ValueError, match="64"):
        rot.apply(torch.zeros(3, 32))
    with pytest.raises(TypeError):
        rot.apply(torch.zeros(3, 64, dtype=torch.int64))


# --- determinism and dtypes ----------------------------------------------------


@pytest.mark.parametrize("kind", RANDOM_KINDS)
def test_same_seed_same_matrix_different_seed_different_matrix(kind):
    first = make_rotation(768, kind, seed=11).matrix()
    # Rebuild from the generators instead of the parameter cache.
    rotation_module._parameters.cache_clear()
    assert torch.equal(make_rotation(768, kind, seed=11).matrix(), first)
    assert not torch.allclose(make_rotation(768, kind, seed=12).matrix(), first)


@pytest.mark.parametrize("dim", [768, 1000])
@pytest.mark.parametrize("kind", KINDS)
def test_float32_apply_matches_float64(kind, dim):
    rot = rotation_or_skip(dim, kind, seed=2)
    x = randn(8, dim, seed=3)
    for method in (rot.apply, rot.apply_transpose):
        y = method(x.float())
        assert y.dtype == torch.float32 and y.shape == x.shape
        torch.testing.assert_close(y, method(x).float(), rtol=1e-4, atol=1e-5)


def test_half_precision_inputs_keep_their_dtype():
    rot = make_rotation(11008, "auto", seed=0)
    x = randn(2, 11008)
    y = rot.apply(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), rot.apply(x), rtol=0, atol=0.05)


def test_identity_returns_a_copy():
    x = randn(3, 16)
    y = make_rotation(16, "identity").apply(x)
    assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()
