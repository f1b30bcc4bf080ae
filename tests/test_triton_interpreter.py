"""The Triton kernels' logic on the CPU, through Triton's interpreter (TRITON_INTERPRET=1).

The interpreter is chosen when a kernel is decorated, so the checks run in one subprocess that sets
it before importing the kernels; on a GPU the same kernels are compiled (tests/test_fast_transform.py,
tests/test_kernel_backends.py and python -m fqbench.bench.gpu_check).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

CHECKS = r"""
import json, torch
from fqbench.frames.operator import FrameOperator
from fqbench.kernels.fast_transform import relative_error
from fqbench.kernels.packed_matrix import TorchPackedMatrix
from fqbench.kernels.triton_dequant import dequantize_packed
from fqbench.kernels.triton_transform import TritonTransform, triton_problem

torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
results = {}
for dim, r in [(4096, 1.0), (4096, 1.1), (11007, 1.1), (1024, 1.25)]:
    op = FrameOperator(dim, r, seed=3)
    x = torch.randn(1, dim, generator=g, dtype=torch.float64)
    c = torch.randn(1, op.num_coefficients, generator=g, dtype=torch.float64)
    for dtype in (torch.float32, torch.float16):
        t = TritonTransform(op, "cpu", dtype)
        results[f"transform {dim} {r} {dtype}"] = [relative_error(t.analysis(x.to(dtype)), op.analysis(x)),
                                                   relative_error(t.synthesis(c.to(dtype)), op.synthesis(c))]
results["problems"] = [triton_problem(FrameOperator(d, 1.1)) for d in (1000, 1376, 4096)]
for bits, group in [(2, 64), (3, 192), (4, 32), (8, 96)]:
    codes = torch.randint(0, 2**bits, (40, 192), generator=g, dtype=torch.uint8)
    scale, zero = torch.rand(40, 192 // group, generator=g), torch.rand(40, 192 // group, generator=g) * 3
    from fqbench.kernels.packed_matrix import QuantizedWeights
    w = QuantizedWeights(codes, scale.half(), zero.half(), bits, group)
    m = TorchPackedMatrix(w, dtype=torch.float32)
    plain = dequantize_packed(m.packed, m.kernel_bits, m.scale_t.float(), m.zero_t.float(), 192, group,
                              fma=False, dtype=torch.float32)
    fma_zero = (-m.zero_t.float() * m.scale_t.float()).contiguous()
    fma = dequantize_packed(m.packed, m.kernel_bits, m.scale_t.float(), fma_zero, 192, group,
                            fma=True, dtype=torch.float32)
    results[f"dequant {bits} {group}"] = [relative_error(plain, w.dense().T), relative_error(fma, w.dense().T)]
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def results():
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", CHECKS], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_fused_transform_equals_the_operator(results):
    transforms = {k: v for k, v in results.items() if k.startswith("transform")}
    assert len(transforms) == 8
    for name, (analysis, synthesis) in transforms.items():
        limit = 1e-6 if "float32" in name else 2e-3
        assert analysis < limit and synthesis < limit, (name, analysis, synthesis)


def test_unsupported_operators_are_named(results):
    kronecker, no_tile, fine = results["problems"]
    assert kronecker == "the rotation is kronecker, not hadamard"
    assert no_tile.startswith("no tile: padded dim 1376 = 172 x 8")
    assert fine is None


def test_dequantizer_equals_the_reference_in_both_zero_conventions(results):
    dequant = {k: v for k, v in results.items() if k.startswith("dequant")}
    assert len(dequant) == 4
    for name, errors in dequant.items():
        assert max(errors) < 1e-6, (name, errors)
