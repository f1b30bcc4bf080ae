import math

import pytest
import torch

from fqbench.frames.tff import (
    BlockFrame,
    FramePlan,
    plan_frame,
    real_tight_fusion_frame,
    spectral_tetris,
    tff_exists,
    tight_fusion_frame,
)


def _sparse_eye(n: int) -> torch.Tensor:
    diagonal = torch.arange(n).expand(2, n)
    ones = torch.ones(n, dtype=torch.float64)
    return torch.sparse_coo_tensor(diagonal, ones, (n, n), check_invariants=True)


def _max_abs(sparse: torch.Tensor) -> float:
    values = sparse.coalesce().values()
    return values.abs().max().item() if values.numel() else 0.0


# ---------------------------------------------------------------- Spectral Tetris


def test_spectral_tetris_paper_example_entries():
    # Appendix J, (5, 4, 11): rows of squared norm 11/4, remainders 3/4, 1/2, 1/4.
    s = math.sqrt
    expected = torch.zeros(4, 11, dtype=torch.float64)
    expected[0, :2] = 1
    expected[0, 2:4] = s(3 / 8)
    expected[1, 2], expected[1, 3] = s(5 / 8), -s(5 / 8)
    expected[1, 4] = 1
    expected[1, 5:7] = s(1 / 4)
    expected[2, 5], expected[2, 6] = s(3 / 4), -s(3 / 4)
    expected[2, 7] = 1
    expected[2, 8:10] = s(1 / 8)
    expected[3, 8], expected[3, 9] = s(7 / 8), -s(7 / 8)
    expected[3, 10] = 1
    torch.testing.assert_close(spectral_tetris(4, 11), expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("l, n", [(4, 11), (3, 10), (2, 5), (7, 23), (4, 16), (5, 5), (1, 6)])
def test_spectral_tetris_is_unit_norm_tight(l, n):
    t = spectral_tetris(l, n)
    assert t.shape == (l, n) and t.dtype == torch.float64
    torch.testing.assert_close(t.norm(dim=0), torch.ones(n, dtype=torch.float64), rtol=0, atol=1e-14)
    torch.testing.assert_close(t @ t.T, (n / l) * torch.eye(l, dtype=torch.float64), rtol=0, atol=1e-14)


@pytest.mark.parametrize("l, n", [(2, 3), (4, 7), (5, 4)])
def test_spectral_tetris_rejects_ratio_below_two(l, n):
    with pytest.raises(ValueError, match=rf"\({l}, {n}\)"):
        spectral_tetris(l, n)


# ---------------------------------------------------------------- tight fusion frames


VALID_TRIPLES = [(5, 4, 11), (5, 3, 10), (7, 3, 10), (4, 2, 5), (8, 4, 16), (9, 4, 16), (12, 6, 8 * 6)]


@pytest.mark.parametrize("k, l, n", VALID_TRIPLES)
def test_tight_fusion_frame_is_parseval(k, l, n):
    f = tight_fusion_frame(k, l, n)
    assert f.shape == (k, l, n) and f.dtype == torch.complex128
    frame_operator = torch.einsum("kli,klj->ij", f.conj(), f)
    torch.testing.assert_close(frame_operator, torch.eye(n, dtype=torch.complex128), rtol=0, atol=1e-12)
    # Each subspace basis is orthonormal up to the Parseval factor r^(-1/2).
    grams = f @ f.conj().transpose(1, 2)
    eye = torch.eye(l, dtype=torch.complex128).expand(k, l, l)
    torch.testing.assert_close(grams, eye * (n / (k * l)), rtol=0, atol=1e-12)


@pytest.mark.parametrize("k, l, n", VALID_TRIPLES)
def test_real_tight_fusion_frame_is_parseval_and_matches_complex(k, l, n):
    real = real_tight_fusion_frame(k, l, n)
    assert real.shape == (k, 2 * l, 2 * n) and real.dtype == torch.float64
    frame_operator = torch.einsum("kli,klj->ij", real, real)
    torch.testing.assert_close(frame_operator, torch.eye(2 * n, dtype=torch.float64), rtol=0, atol=1e-12)
    # Acting on interleaved (Re, Im) it is the complex frame.
    z = torch.randn(n, dtype=torch.complex128, generator=torch.Generator().manual_seed(0))
    expected = torch.view_as_real(tight_fusion_frame(k, l, n) @ z).reshape(k, 2 * l)
    torch.testing.assert_close(real @ torch.view_as_real(z).reshape(2 * n), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "k, l, n, exists",
    [
        (5, 4, 11, True),
        (5, 3, 10, True),  # k = ceil(n/l) + 1: Naimark (5, 3, 5), complement (5, 2, 5) exists
        (3, 2, 3, True),  # spatial complement of 3 lines in C^3
        (9, 256, 2048, True),
        (8, 256, 2048, True),
        (7, 256, 2048, False),  # k*l < n
        (2, 2, 3, False),  # k = ceil(n/l)
        (4, 4, 11, False),  # Naimark (4, 4, 5), complement (4, 1, 5): 4 lines cannot span C^5
        (4, 5, 14, False),  # Naimark (4, 5, 6), complement (4, 1, 6)
        (5, 5, 14, True),  # k = ceil(n/l) + 2
        (3, 5, 4, False),  # l > n
    ],
)
def test_tff_exists(k, l, n, exists):
    assert tff_exists(k, l, n) is exists


@pytest.mark.parametrize(
    "triple, message",
    [
        ((2, 2, 3), r"no \(2, 2, 3\) tight fusion frame.*smallest k .* is 3"),
        ((4, 4, 11), r"no \(4, 4, 11\) tight fusion frame.*is 5"),
        ((7, 256, 2048), r"\(7, 256, 2048\).*k >= n/l = 8"),
        ((3, 2, 3), r"\(3, 2, 3\) .*exists but Spectral Tetris"),
        ((4, 3, 8), r"\(4, 3, 8\) .*needs k >= 5"),
        ((1, 5, 4), r"\(1, 5, 4\).*exceeds"),
    ],
)
def test_unbuildable_triples_raise_naming_the_triple(triple, message):
    with pytest.raises(ValueError, match=message):
        tight_fusion_frame(*triple)


def test_every_built_frame_is_parseval_and_exists():
    for n in range(1, 13):
        for l in range(1, n + 1):
            for k in range(1, 14):
                try:
                    f = tight_fusion_frame(k, l, n)
                except ValueError:
                    continue
                assert tff_exists(k, l, n), (k, l, n)
                frame_operator = torch.einsum("kli,klj->ij", f.conj(), f)
                assert (frame_operator - torch.eye(n)).abs().max() < 1e-12, (k, l, n)


@pytest.mark.parametrize("bad", [(0, 1, 2), (1, -1, 2), (1, 1, 2.0), (True, 1, 1)])
def test_tff_exists_rejects_non_positive_integers(bad):
    with pytest.raises(ValueError, match="positive integer"):
        tff_exists(*bad)


# ---------------------------------------------------------------- BlockFrame


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state")
@pytest.mark.parametrize("redundancy", [1.0, 1.1, 1.25, 1.5])
@pytest.mark.parametrize("dim", [64, 96, 172, 384, 768, 1000, 1536, 4096])
def test_block_frame_is_parseval(dim, redundancy):
    plan = plan_frame(dim, redundancy)
    frame = BlockFrame(plan)
    a = frame.matrix()
    assert a.shape == (plan.num_coefficients, plan.padded_dim) and a.dtype == torch.float64
    # Sparse products of the dense matrix: exact, and fast enough at d = 4096.
    sparse = a.to_sparse()
    assert _max_abs(torch.sparse.mm(sparse.t(), sparse) - _sparse_eye(plan.padded_dim)) < 1e-10
    projection = torch.sparse.mm(sparse, sparse.t())  # A A^T: symmetric by construction
    assert _max_abs(torch.sparse.mm(projection, projection) - projection) < 1e-10
    assert a.pow(2).sum().item() == pytest.approx(plan.padded_dim, abs=1e-8)  # rank = trace(A A^T)
    x = torch.randn(3, plan.padded_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(dim))
    torch.testing.assert_close(frame.analysis(x), x @ a.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(frame.synthesis(frame.analysis(x)), x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dim, redundancy", [(64, 1.25), (96, 1.1), (128, 1.0), (1000, 1.1), (172, 1.1)])
def test_block_frame_is_the_casazza_frame(dim, redundancy):
    plan = plan_frame(dim, redundancy)
    assert plan.padded_dim == dim
    k, m, blocks = plan.subspaces, plan.block, plan.num_blocks
    real = real_tight_fusion_frame(k, blocks, dim // 2)  # (k, 2*blocks, dim)
    # Documented ordering: coefficient j*2k + part*k + kappa is row 2j + part of subspace kappa.
    expected = real.reshape(k, blocks, 2, dim).permute(1, 2, 0, 3).reshape(blocks * 2 * k, dim)
    torch.testing.assert_close(BlockFrame(plan).matrix(), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("redundancy", [1.0, 1.1])
def test_float32_analysis_matches_float64(redundancy):
    frame = BlockFrame(plan_frame(4096, redundancy))
    x = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(1))
    c32 = frame.analysis(x)
    c64 = frame.analysis(x.double())
    assert c32.dtype == torch.float32 and c32.shape == (4096, frame.plan.num_coefficients)
    assert ((c32.double() - c64).norm() / c64.norm()).item() < 1e-6
    x32 = frame.synthesis(c32)
    assert x32.dtype == torch.float32
    assert ((x32.double() - x.double()).norm() / x.double().norm()).item() < 1e-6


@pytest.mark.parametrize("dim, redundancy", [(4096, 1.1), (1000, 1.1), (1001, 1.5)])
def test_synthesis_is_the_adjoint(dim, redundancy):
    frame = BlockFrame(plan_frame(dim, redundancy))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 7, frame.plan.padded_dim, dtype=torch.float64, generator=g)
    c = torch.randn(5, 7, frame.plan.num_coefficients, dtype=torch.float64, generator=g)
    lhs = (frame.analysis(x) * c).sum(-1)
    rhs = (x * frame.synthesis(c)).sum(-1)
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-10)


def test_wrong_last_dimension_raises():
    frame = BlockFrame(plan_frame(64, 1.25))
    with pytest.raises(ValueError, match="last dimension of 64"):
        frame.analysis(torch.zeros(3, 63))
    with pytest.raises(ValueError, match="last dimension of 80"):
        frame.synthesis(torch.zeros(3, 64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_cpu(dtype):
    frame = BlockFrame(plan_frame(4096, 1.1))
    x = torch.randn(512, 4096, dtype=dtype, generator=torch.Generator().manual_seed(3))
    c = frame.analysis(x.cuda())
    assert c.device.type == "cuda" and c.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(c.cpu(), frame.analysis(x), rtol=tol, atol=tol)
    torch.testing.assert_close(frame.synthesis(c).cpu(), x, rtol=tol, atol=tol)


@pytest.mark.parametrize("redundancy", [1.25, 1.5, 2.0])
def test_noise_is_reduced_by_the_redundancy(redundancy):
    # Goyal, Vetterli, Thao (1998): white noise of variance s^2 on the coefficients of a
    # unit-norm tight frame (frame bound r), reconstructed with the canonical dual,
    # leaves an MSE of s^2 / r per coordinate. Our Parseval frame is sqrt(r)^-1 times it.
    plan = plan_frame(1024, redundancy)
    frame, r, s = BlockFrame(plan), plan.effective_redundancy, 0.1
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2000, 1024, dtype=torch.float64, generator=g)
    noise = s * torch.randn(2000, plan.num_coefficients, dtype=torch.float64, generator=g)
    noisy = frame.analysis(x) * math.sqrt(r) + noise
    mse = (frame.synthesis(noisy) / math.sqrt(r) - x).pow(2).mean().item()
    assert mse == pytest.approx(s**2 / r, rel=0.03)


def test_padding_does_not_reduce_noise():
    # With padding the cost is r_eff = coefficients / dim but the noise gain only
    # coefficients / padded_dim: the frame cannot tell padded coordinates from real ones.
    plan = plan_frame(1001, 1.5)
    frame = BlockFrame(plan)
    frame_bound = plan.num_coefficients / plan.padded_dim
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2000, 1001, dtype=torch.float64, generator=g)
    x = torch.nn.functional.pad(x, (0, plan.padded_dim - 1001))
    noise = 0.1 * torch.randn(2000, plan.num_coefficients, dtype=torch.float64, generator=g)
    error = frame.synthesis(frame.analysis(x) * math.sqrt(frame_bound) + noise) / math.sqrt(frame_bound) - x
    assert error[:, :1001].pow(2).mean().item() == pytest.approx(0.01 / frame_bound, rel=0.03)
    assert frame_bound < plan.effective_redundancy


# ---------------------------------------------------------------- the chooser


@pytest.mark.parametrize(
    "dim, redundancy, padded, block, subspaces",
    [
        (4096, 1.1, 4096, 8, 9),  # reference: 2m | d
        (11008, 1.1, 11008, 8, 9),
        (4096, 1.0, 4096, 8, 8),
        (1000, 1.1, 1000, 10, 11),  # divisor of 500 closest to 8 among the exact ones
        (172, 1.1, 172, 43, 47),
        (1032, 1.0, 1032, 6, 6),  # 6 and 12 are exact; 6 is closer to 8
        (1001, 1.1, 1008, 8, 9),  # odd: pad
        (1018, 1.1, 1024, 8, 9),  # 509 is prime: no divisor block
        (268, 1.25, 272, 8, 10),  # only m'=2 divides 134: r 1.0 vs 1.27 padded
    ],
)
def test_plan_frame_choices(dim, redundancy, padded, block, subspaces):
    plan = plan_frame(dim, redundancy)
    assert (plan.padded_dim, plan.block, plan.subspaces) == (padded, block, subspaces)
    assert plan.num_blocks == padded // (2 * block)
    assert plan.num_coefficients == plan.num_blocks * 2 * subspaces
    assert plan.effective_redundancy == pytest.approx(plan.num_coefficients / dim)
    assert plan.requested_redundancy == redundancy
    assert ("zero-padded" in plan.describe()) == (padded > dim)


def test_effective_redundancy_is_honest():
    assert plan_frame(1000, 1.1).effective_redundancy == pytest.approx(1.1)
    assert plan_frame(4096, 1.1).effective_redundancy == pytest.approx(1.125)
    assert plan_frame(172, 1.1).effective_redundancy == pytest.approx(47 / 43)
    assert plan_frame(1001, 1.1).effective_redundancy == pytest.approx(63 * 18 / 1001)
    assert plan_frame(64, 1.1, block=4).subspaces == 4  # round(4.4): steps of 1/m


@pytest.mark.parametrize(
    "args, match",
    [
        ((64, 0.9), "redundancy .*0.9"),
        ((64, float("nan")), "redundancy .*nan"),
        ((64, float("inf")), "redundancy .*inf"),
        ((64, "1.1"), "redundancy .*1.1"),
        ((0, 1.1), "dim .*0"),
        ((-8, 1.1), "dim .*-8"),
        ((64.0, 1.1), "dim .*64.0"),
        ((64, 1.1, 0), "block .*0"),
    ],
)
def test_plan_frame_rejects_bad_inputs(args, match):
    with pytest.raises(ValueError, match=match):
        plan_frame(*args)


@pytest.mark.parametrize(
    "fields", [(64, 60, 8, 8, 1.0), (64, 72, 8, 8, 1.0), (64, 64, 8, 7, 1.0)]
)
def test_frame_plan_rejects_inconsistent_fields(fields):
    with pytest.raises(ValueError):
        FramePlan(*fields)
