"""Packed inference: quantized weights in the packed layout (frame-space FrameQuant, GPTQ/RTN grids), both
kernels, memory."""

import pytest
import torch

from fqbench.kernels.lut import decode_codes, lut_matmul
from fqbench.methods import build_method
from fqbench.quantized import GridWeight, QuantLinear, TransformedWeight
from fqbench.kernels.bitpack import pack_bits


pytestmark = pytest.mark.usefixtures("one_thread")


def identity_hessian_layer(name, out_features, in_features, seed=0, **options):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_features, in_features, generator=g) * 0.02
    H = torch.eye(in_features, dtype=torch.float64)
    return build_method(name, **options).quantize(W, H, seed=seed)


def pack_module(layer, bias=None):
    return QuantLinear(layer.with_layout("packed"), bias)


# Dimensions that are not powers of two (172 = 43 * 4, 1000, 1032 = 129 * 8), padded and unpadded frames.
FRAME_SHAPES = [(172, 1000), (1032, 172), (96, 100), (64, 1032), (256, 512), (100, 96)]


@pytest.mark.parametrize("redundancy", [1.0, 1.1])
@pytest.mark.parametrize("shape", FRAME_SHAPES, ids=[f"{o}x{i}" for o, i in FRAME_SHAPES])
def test_frame_space_forward_equals_the_dequantized_weight(shape, redundancy):
    layer = identity_hessian_layer("framequant", *shape, bits=2, redundancy=redundancy)
    bias = torch.randn(shape[0]) * 0.1
    module = pack_module(layer, bias)
    assert isinstance(module.quantized, TransformedWeight) and module.quantized.layout == "packed"
    W_hat = layer.weight()
    for rows in (1, 3, 40):  # the table-lookup kernel (when the layout allows) and the dense one
        x = torch.randn(rows, shape[1], generator=torch.Generator().manual_seed(rows))
        reference = x @ W_hat.T + bias
        scale = reference.abs().max()
        assert torch.allclose(module(x), reference, rtol=0, atol=1e-5 * scale)
    batched = torch.randn(2, 5, shape[1])  # any leading dimensions
    assert module(batched).shape == (2, 5, shape[0])
    assert torch.allclose(module(batched), batched @ W_hat.T + bias, rtol=0, atol=1e-5 * scale)


def test_frame_space_forward_runs_the_table_kernel_on_llm_dimensions():
    layer = identity_hessian_layer("framequant", 256, 512, bits=2, redundancy=1.1)
    module = pack_module(layer)
    assert module.quantized.inner.lut_ok  # 512 -> 576 coefficients, a multiple of 8
    x = torch.randn(1, 512)
    assert torch.allclose(module(x), x @ layer.weight().T, rtol=0, atol=1e-5 * (x @ layer.weight().T).abs().max())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("options", [{}, {"groupsize": 32}, {"groupsize": 24}], ids=["row", "g32", "g24"])
def test_packed_grid_linear_both_kernels(bits, options):
    layer = identity_hessian_layer("rtn", 72, 96, bits=bits, **options)
    module = pack_module(layer, torch.ones(72))
    assert isinstance(module.quantized, GridWeight) and module.quantized.layout == "packed"
    assert module.quantized.lut_ok == (bits < 8 and options.get("groupsize", 96) % 8 == 0
                                    and 96 % options.get("groupsize", 96) == 0)
    x = torch.randn(40, 96)  # more rows than LUT_ROWS: the dense kernel
    reference = torch.nn.functional.linear(x, layer.weight(), torch.ones(72))
    assert torch.equal(module(x), reference)  # dense kernel: bit-identical to the fake-quantized linear
    one = x[:1]
    assert torch.allclose(module(one), reference[:1], rtol=0, atol=1e-5 * reference.abs().max())


def test_act_order_groups_use_the_stored_index(layer_factory):
    W, H, X = layer_factory(64, 128)
    layer = build_method("gptq", bits=3, solver={"act_order": True, "groupsize": 16}).quantize(W, H)
    module = pack_module(layer)
    assert module.quantized.group_index is not None and not module.quantized.lut_ok
    assert torch.equal(module(X[:4]), X[:4] @ layer.weight().T)


def test_activation_quantization_is_bit_identical_to_the_layer(layer_factory):
    W, H, X = layer_factory(96, 128)
    layer = build_method("framequant", bits=2, redundancy=1.1, act_bits=6).quantize(W, H)
    module = pack_module(layer)
    assert torch.equal(module(X[:32]), layer(X[:32]))


def test_half_precision_inputs_keep_their_dtype():
    layer = identity_hessian_layer("framequant", 64, 128, bits=2, redundancy=1.1)
    module = pack_module(layer, torch.zeros(64))
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(4, 128).to(dtype)
        y = module(x)
        assert y.dtype == dtype
        assert torch.allclose(y.float(), x.float() @ layer.weight().T, atol=3e-2 * y.float().abs().max().item())


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 7, 8])
def test_kernels_on_raw_codes(bits):
    g = torch.Generator().manual_seed(bits)
    rows, cols = 24, 64
    codes = torch.randint(0, 2**bits, (rows, cols), generator=g)
    packed = pack_bits(codes, bits)
    assert torch.equal(decode_codes(packed, bits, rows, cols), codes.float())
    if bits < 8:
        x = torch.randn(3, cols, generator=g)
        partial = lut_matmul(x, packed, bits, rows, cols, group_size=16)  # (3, rows, 4)
        expected = (x.view(3, 1, 4, 16) * codes.float().view(1, rows, 4, 16)).sum(-1)
        assert torch.allclose(partial, expected, atol=1e-4)


def test_packed_memory_is_what_the_bits_say():
    layer = identity_hessian_layer("framequant", 512, 1024, bits=2, redundancy=1.1)
    module = pack_module(layer)
    held = sum(t.numel() * t.element_size() for t in [*module.buffers(), *module.parameters()])
    predicted = layer.bits_per_weight * 512 * 1024 / 8
    # codes at 2 bits, scales at 16; zero points held as bytes: within 10% of the honest bits
    assert predicted <= held <= 1.1 * predicted


def test_inference_benchmark_runs_end_to_end(capsys, tmp_path):
    from fqbench.bench.inference import main

    rows = main(["--hidden", "64", "--intermediate", "176", "--layers", "1", "--heads", "4", "--vocab", "64",
                 "--decode-tokens", "2", "--decode-batches", "1,2", "--prefill", "8", "--rounds", "1",
                 "--threads", "1", "--bits", "2,3", "--variants", "fp32,dense,gptq,framequant",
                 "--records", str(tmp_path / "runs")])
    assert [r["variant"] for r in rows] == ["dense FP32", "dense FP16", "GPTQ 2-bit", "GPTQ 3-bit", "FrameQuant r=1",
                                            "FrameQuant r=1.1"]
    by_name = {r["variant"]: r for r in rows}
    assert by_name["dense FP16"]["decode_b1_vs_fp16"] == 1.0
    assert by_name["FrameQuant r=1.1"]["bits_per_weight"] > by_name["GPTQ 2-bit"]["bits_per_weight"] > 2
    assert all(r["decode_b1_tokens_per_s"] > 0 and r["decode_b2_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0
               for r in rows)
    # on a CPU the quantized variants keep their codes bit-packed: their own tensors are about the honest bits
    for name in ("GPTQ 2-bit", "FrameQuant r=1"):
        assert by_name[name]["layout"] == "packed" and 0.9 < by_name[name]["resident_vs_honest_bits"] < 1.3
    assert "| FrameQuant r=1.1 |" in capsys.readouterr().out
    records = sorted(p.parent.name for p in (tmp_path / "runs").rglob("result.json"))
    assert records == ["fp", "fq_w2_r1.0", "fq_w2_r1.1", "gptq_w2", "gptq_w3"]
