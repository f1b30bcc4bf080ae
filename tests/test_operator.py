"""The full one-side analysis operator A = F R P (pad, rotate, frame) is Parseval."""

import pytest
import torch

from fqbench.frames.operator import FrameOperator, OperatorSpec

DIMS = [64, 96, 172, 384, 768, 1000, 1536, 4096]
REDUNDANCIES = [1.0, 1.1, 1.25, 1.5]


def dense_analysis(op: FrameOperator) -> torch.Tensor:
    return op.analysis(torch.eye(op.dim, dtype=torch.float64)).T  # (coefficients, dim)


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("redundancy", REDUNDANCIES)
def test_parseval(dim, redundancy):
    op = FrameOperator(dim, redundancy, seed=dim)
    A = dense_analysis(op)
    assert A.shape == (op.num_coefficients, dim)
    eye = torch.eye(dim, dtype=torch.float64)
    # float64 rounding leaves errors of a few 1e-15 (3.7e-15 measured at the worst of these dims)
    if dim <= 1536:
        assert (A.T @ A - eye).abs().max() < 1e-13
    else:
        # A^T A column by column through the fast synthesis, which is A^T
        # (checked on random vectors below and in test_synthesis_is_the_adjoint...).
        assert (op.synthesis(A.T) - eye).abs().max() < 1e-13
        g = torch.Generator().manual_seed(dim)
        x = torch.randn(4, dim, generator=g, dtype=torch.float64)
        c = torch.randn(4, op.num_coefficients, generator=g, dtype=torch.float64)
        assert torch.allclose(op.synthesis(c), c @ A, rtol=0, atol=1e-12)
        assert torch.allclose(op.analysis(x), x @ A.T, rtol=0, atol=1e-12)
    assert op.effective_redundancy == pytest.approx(op.num_coefficients / dim)
    assert op.effective_redundancy >= 1.0


@pytest.mark.parametrize("dim", [96, 1000, 1001])
def test_synthesis_is_the_adjoint_and_inverts_analysis(dim):
    op = FrameOperator(dim, 1.25, rotation="auto", seed=1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, dim, generator=g, dtype=torch.float64)
    c = torch.randn(5, op.num_coefficients, generator=g, dtype=torch.float64)
    assert torch.allclose(op.synthesis(op.analysis(x)), x, rtol=0, atol=1e-13)
    assert torch.allclose((op.analysis(x) * c).sum(), (x * op.synthesis(c)).sum(), rtol=0, atol=1e-11)


def test_rotation_only_operator_is_orthogonal():
    op = FrameOperator(172, None, rotation="kronecker", seed=2)
    A = dense_analysis(op)
    assert A.shape == (172, 172)
    assert torch.allclose(A @ A.T, torch.eye(172, dtype=torch.float64), rtol=0, atol=1e-13)


def test_regenerated_from_spec():
    op = FrameOperator(1032, 1.1, block=8, rotation="auto", seed=5)
    again = FrameOperator.from_spec(op.spec)
    x = torch.randn(3, 1032, dtype=torch.float64)
    assert torch.equal(op.analysis(x), again.analysis(x))
    assert FrameOperator.from_spec({"dim": 1032, "redundancy": 1.1, "block": 8, "rotation": op.spec.rotation,
                                    "seed": 5}).spec == op.spec
    assert isinstance(op.spec, OperatorSpec)


def test_impossible_frame_and_bad_redundancy_raise():
    with pytest.raises(ValueError, match="redundancy"):
        FrameOperator(64, 0.5)
    with pytest.raises(ValueError, match="block"):
        FrameOperator(64, 1.1, block=0)
