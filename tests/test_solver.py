import logging

import pytest
import torch

from fqbench.bench.gptq_reference import reference_gptq
from fqbench.quant.checks import proxy_error
from fqbench.quant.grids import GridSpec
from fqbench.quant.quantizer import GridQuantizer
from fqbench.quant.solver import SingularHessianError, SolverOptions, gptq_solve as solve, inverse_cholesky


def rtn(W, grid):
    fitted = grid.fit(W)
    return fitted.decode(fitted.encode(W))


def gptq_solve(W, H, grid, options=SolverOptions()):
    return solve(W, H, GridQuantizer(grid, options.groupsize, options.static_groups), options)


def test_gptq_beats_rtn_on_correlated_inputs(layer_factory):
    W, H, _ = layer_factory(correlated=True)
    grid = GridSpec(3)
    gptq = gptq_solve(W, H, grid).dequantized
    assert proxy_error(W, gptq, H) < 0.6 * proxy_error(W, rtn(W, grid), H)


def test_gptq_on_diagonal_hessian_is_rtn(layer_factory):
    W, H, _ = layer_factory()
    H = torch.diag(torch.rand(W.shape[1], dtype=torch.float64) + 0.5)
    grid = GridSpec(2)
    result = gptq_solve(W, H, grid, SolverOptions(blocksize=32))
    assert torch.equal(result.dequantized, rtn(W, grid))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_reference_exact_grids_reproduce_the_reference_implementation(bits, layer_factory):
    """With float32 scales our solver equals a straightforward GPTQ with its own grid, bit for bit."""
    W, H, _ = layer_factory(heavy_tailed=True, outlier_channels=2)
    ours = gptq_solve(W, H, GridSpec(bits, scale_dtype="float32"), SolverOptions(blocksize=32))
    assert torch.equal(ours.dequantized, reference_gptq(W, H, bits, blocksize=32))
    assert torch.equal(ours.weight.weight(), ours.dequantized)
    assert ours.weight.scale.dtype == torch.float32
    # the default float16 scales (what a packed model stores) move a few codes
    assert not torch.equal(gptq_solve(W, H, GridSpec(bits), SolverOptions(blocksize=32)).dequantized,
                           ours.dequantized)


def test_reference_exact_mode_fits_the_row_grid_before_zeroing_dead_columns(layer_factory):
    """The reference fits each row's grid on the weight as given, then zeroes the columns without input:
    with a dead column holding every row's largest value, the scales differ, and we follow it exactly."""
    W, H, _ = layer_factory(heavy_tailed=True)
    W[:, 7] = W.abs().max(dim=1).values * 3  # the dead column sets every row's range
    H[7, :] = 0
    H[:, 7] = 0
    ours = gptq_solve(W, H, GridSpec(3, scale_dtype="float32"), SolverOptions(blocksize=32))
    reference = reference_gptq(W, H, 3, blocksize=32)
    assert torch.equal(ours.dequantized, reference)
    assert torch.all(ours.dequantized[:, 7] == 0)
    default = gptq_solve(W, H, GridSpec(3), SolverOptions(blocksize=32))  # zeroes first: a tighter grid
    assert (default.weight.scale.float() < ours.weight.scale).all()
    assert proxy_error(W, default.dequantized, H) < proxy_error(W, ours.dequantized, H)


def test_codes_and_grid_reconstruct_the_dequantized_weight(layer_factory):
    W, H, _ = layer_factory()
    result = gptq_solve(W, H, GridSpec(4), SolverOptions(groupsize=32, act_order=True))
    weight = result.weight
    groups = weight.column_groups()
    s = weight.scale.float()[:, groups]
    z = weight.zero.float()[:, groups]
    assert torch.equal(s * (weight.code_values().float() - z), result.dequantized)
    assert weight.code_values().max() <= 15


def test_act_order_changes_and_helps_with_uneven_hessian(layer_factory):
    W, H, _ = layer_factory(outlier_channels=8)
    grid = GridSpec(3)
    plain = gptq_solve(W, H, grid).dequantized
    ordered = gptq_solve(W, H, grid, SolverOptions(act_order=True)).dequantized
    assert not torch.equal(plain, ordered)
    assert proxy_error(W, ordered, H) < proxy_error(W, plain, H)


def test_groups_lower_error_and_index_columns(layer_factory):
    W, H, _ = layer_factory()
    grid = GridSpec(2)
    whole = gptq_solve(W, H, grid)
    grouped = gptq_solve(W, H, grid, SolverOptions(groupsize=32))
    assert grouped.weight.scale.shape == (W.shape[0], W.shape[1] // 32)
    assert grouped.weight.group_index is None  # contiguous groups: nothing to store
    assert torch.equal(grouped.weight.column_groups(), torch.arange(W.shape[1]) // 32)
    assert proxy_error(W, grouped.dequantized, H) < proxy_error(W, whole.dequantized, H)


def test_static_groups_follow_original_columns_under_act_order(layer_factory):
    W, H, _ = layer_factory(outlier_channels=8)
    grid = GridSpec(3)
    dynamic = gptq_solve(W, H, grid, SolverOptions(groupsize=32, act_order=True))
    static = gptq_solve(W, H, grid, SolverOptions(groupsize=32, act_order=True, static_groups=True))
    assert torch.equal(static.weight.column_groups(), torch.arange(W.shape[1]) // 32)
    assert not torch.equal(dynamic.weight.column_groups(), torch.arange(W.shape[1]) // 32)
    assert not torch.equal(static.dequantized, dynamic.dequantized)


def test_dead_inputs_zero_their_columns(layer_factory):
    W, H, _ = layer_factory()
    H[:, 5] = 0
    H[5, :] = 0
    result = gptq_solve(W, H, GridSpec(4))
    assert torch.all(result.dequantized[:, 5] == 0)


def test_cholesky_fallback_escalates_damping_and_logs(caplog):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 8, generator=g, dtype=torch.float64)
    H = X @ X.T  # rank 8 of 64: singular without damping
    with caplog.at_level(logging.WARNING):
        U, damping, dtype = inverse_cholesky(H, percdamp=0.0)
    assert damping > 0
    assert "fallback" in caplog.text
    assert torch.isfinite(U).all()


def test_hessian_singular_after_damping_raises():
    H = torch.zeros(4, 4, dtype=torch.float64)
    H[0, 0] = float("1e-300")
    H[1, 1] = -1.0
    with pytest.raises(SingularHessianError, match="not positive definite"):
        inverse_cholesky(H, percdamp=0.01)


@pytest.mark.parametrize("kwargs", [dict(blocksize=0), dict(percdamp=-1), dict(groupsize=0), dict(groupsize=48)])
def test_bad_solver_options(kwargs):
    with pytest.raises(ValueError):
        SolverOptions(**kwargs)


def test_reference_exact_gptq_on_a_model_equals_the_reference_layer_by_layer():
    """A small Llama quantized by the engine (true-sequential, float32 scales): every matrix equals what the
    straightforward reference computes from the same weight and Hessian."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fqbench.engine import quantize_model
    from fqbench.methods import LayerMethod, build_method
    from fqbench.models.hf import LLAMA

    class Recording(LayerMethod):
        name = "recording_gptq"
        Config = type(build_method("gptq").config)

        def __init__(self):
            super().__init__(build_method("gptq", bits=3, scale_dtype="float32").config)
            self.inner, self.calls = build_method("gptq", bits=3, scale_dtype="float32"), []

        def quantize(self, W, H, *, seed=None):
            layer = self.inner.quantize(W, H, seed=seed)
            self.calls.append((W.clone(), H.clone(), layer.weight()))
            return layer

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    samples = [torch.randint(0, 64, (1, 48), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    method = Recording()
    quantize_model(model, LLAMA, samples, method, device="cpu", progress=False)
    assert len(method.calls) == 14
    for W, H, W_hat in method.calls:
        assert torch.equal(W_hat, reference_gptq(W, H, 3))
