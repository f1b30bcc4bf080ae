"""FastTransform (and, on a GPU, the fused Triton transform) equal FrameOperator within float rounding."""

import pytest
import torch

from fqbench.frames.operator import FrameOperator
from fqbench.kernels import fast_transform
from fqbench.kernels.fast_transform import FastTransform, relative_error

pytestmark = pytest.mark.usefixtures("one_thread")

# dim -> the path it takes at r = 1.0: every mode, padding (99 -> 112, 11007 -> 11008), H_172 (688, 11008).
DIMS = {64: "fold_all", 96: "fold_all", 100: "fold_all", 99: "fold_all", 688: "fold_all", 1376: "separate",
        4096: "folded", 11008: "folded", 11007: "folded"}
REDUNDANCIES = [1.0, 1.1, 1.25]


def _inputs(op, dtype, rows=3):
    g = torch.Generator().manual_seed(op.dim)
    x = torch.randn(rows, op.dim, generator=g, dtype=torch.float64)
    c = torch.randn(rows, op.num_coefficients, generator=g, dtype=torch.float64)
    return x.to(dtype), c.to(dtype)


@pytest.mark.parametrize("dim", DIMS)
def test_float64_equals_the_operator(dim):
    for redundancy in [*REDUNDANCIES, None]:
        op = FrameOperator(dim, redundancy, seed=dim)
        fast = FastTransform.from_operator(op, "cpu", torch.float64)
        if redundancy is not None:  # a rotation alone of an odd dim is Kronecker: the fallback
            assert fast.structure is not None, fast.describe()
        x, c = _inputs(op, torch.float64)
        assert (fast.analysis(x) - op.analysis(x)).abs().max() < 1e-12, (redundancy, fast.describe())
        assert (fast.synthesis(c) - op.synthesis(c)).abs().max() < 1e-12, (redundancy, fast.describe())


@pytest.mark.parametrize("dim", [96, 99, 1376, 4096, 11008])
@pytest.mark.parametrize("redundancy", [1.0, 1.1])
def test_float32_equals_the_operator(dim, redundancy):
    op = FrameOperator(dim, redundancy, seed=7)
    fast = FastTransform.from_operator(op, "cpu", torch.float32)
    x, c = _inputs(op, torch.float32)
    assert relative_error(fast.analysis(x), op.analysis(x)) < 1e-6
    assert relative_error(fast.synthesis(c), op.synthesis(c)) < 1e-6


def test_the_planned_paths_are_taken():
    for dim, mode in DIMS.items():
        structure = FastTransform.from_operator(FrameOperator(dim, 1.0, seed=1)).structure
        assert structure.mode == mode, (dim, structure.describe())
    # r = 1.0: all frame blocks equal, one shared matrix; r = 1.1: per-row matrices through bmm.
    assert FastTransform.from_operator(FrameOperator(4096, 1.0)).structure.shared
    per_row = FastTransform.from_operator(FrameOperator(4096, 1.1)).structure
    assert not per_row.shared and per_row.lead == (64,) and (per_row.tail_in, per_row.tail_out) == (64, 72)
    assert FastTransform.from_operator(FrameOperator(11008, 1.1)).structure.lead == (172,)


def test_any_leading_shape_and_a_transposed_input():
    op = FrameOperator(4096, 1.1, seed=3)
    fast = FastTransform.from_operator(op, "cpu", torch.float64)
    x = torch.randn(4096, 2, 3, dtype=torch.float64).permute(1, 2, 0)  # (2, 3, 4096), not contiguous
    assert fast.analysis(x).shape == (2, 3, op.num_coefficients)
    assert (fast.analysis(x) - op.analysis(x)).abs().max() < 1e-12
    assert (fast.synthesis(fast.analysis(x)) - x).abs().max() < 1e-12  # Parseval: synthesis inverts


def test_parameters_are_built_once_and_shared_between_seeds():
    a, b = FrameOperator(2048, 1.1, seed=11), FrameOperator(2048, 1.1, seed=12)
    misses = fast_transform._tail_matrices.cache_info().misses
    fa = FastTransform.from_operator(a, "cpu", torch.float32)
    assert FastTransform.from_operator(a, "cpu", torch.float32) is fa
    fb = FastTransform.from_operator(b, "cpu", torch.float32)
    assert fb is not fa and fb.tail is fa.tail  # seeds differ only in the signs
    assert not torch.equal(fa.scaled_signs, fb.scaled_signs)
    assert fast_transform._tail_matrices.cache_info().misses == misses + 1
    f64 = FastTransform.from_operator(a, "cpu", torch.float64)
    assert f64 is not fa and f64.tail.dtype == torch.float64
    assert fast_transform._tail_matrices.cache_info().misses == misses + 1  # cast, not rebuilt


def test_other_rotations_fall_back_to_the_operator_and_say_so():
    op = FrameOperator(1000, 1.1, seed=2)  # 1000 = 125 * 8 has no Hadamard matrix: Kronecker rotation
    fast = FastTransform.from_operator(op, "cpu", torch.float64)
    assert fast.describe().startswith("fallback: the kronecker rotation")
    x, c = _inputs(op, torch.float64)
    assert torch.equal(fast.analysis(x), op.analysis(x)) and torch.equal(fast.synthesis(c), op.synthesis(c))


def test_a_wrong_target_is_a_clear_error():
    fast = FastTransform.from_operator(FrameOperator(64, 1.0), "cpu", torch.float32)
    with pytest.raises(ValueError, match="built for torch.float32 on cpu, got torch.float64"):
        fast.analysis(torch.zeros(1, 64, dtype=torch.float64))
    with pytest.raises(ValueError, match="last dimension of 64"):
        fast.analysis(torch.zeros(1, 65))


# --- GPU (skipped without CUDA) ---------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("dim", [4096, 11008])
@pytest.mark.parametrize("redundancy", [1.0, 1.1])
def test_gpu_fast_and_fused_transforms_in_fp16(dim, redundancy):
    from fqbench.kernels.triton_transform import TritonTransform

    op = FrameOperator(dim, redundancy, seed=5)
    x, c = _inputs(op, torch.float64, rows=16)
    reference = op.analysis(x), op.synthesis(c)
    for cls in (FastTransform, TritonTransform):
        t = cls.from_operator(op, "cuda", torch.float16)
        assert relative_error(t.analysis(x.half().cuda()).cpu(), reference[0]) < 2e-3, t.describe()
        assert relative_error(t.synthesis(c.half().cuda()).cpu(), reference[1]) < 2e-3, t.describe()
