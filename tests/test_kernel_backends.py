"""Packed-matrix backends: the 3-in-4 container, the packed layout, the torch matrix, backend selection
(CPU), and gemlite against the dequantized reference (GPU only)."""

import logging
import sys

import pytest
import torch

from fqbench.kernels import gemlite_backend, select
from fqbench.kernels.container import ThreeBitCodes, from_nibbles, pack_3bit, to_nibbles, unpack_3bit
from fqbench.kernels.fast_transform import relative_error
from fqbench.kernels.packed_matrix import QuantizedWeights, TorchPackedMatrix, pack_over_k, unpack_over_k

pytestmark = pytest.mark.usefixtures("one_thread")


def random_weights(n, k, bits, group_size, *, bias=True, seed=0) -> QuantizedWeights:
    g = torch.Generator().manual_seed(seed)
    groups = k // group_size
    return QuantizedWeights(
        codes=torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.uint8),
        scale=(torch.rand(n, groups, generator=g) * 0.02 + 0.001).half(),
        zero=(torch.rand(n, groups, generator=g) * (2**bits - 1)).half(),
        bits=bits, group_size=group_size,
        bias=torch.randn(n, generator=g) if bias else None,
    )


# --- the 3-in-4 container -----------------------------------------------------------------------


def test_three_bit_codes_round_trip_at_three_bits():
    codes = torch.randint(0, 8, (5, 37), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    packed = pack_3bit(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-5 * 37 // 8) * 3  # 3 bits per code
    assert torch.equal(unpack_3bit(packed, (5, 37)), codes)
    held = ThreeBitCodes(codes)
    assert torch.equal(held.codes(), codes)
    assert (held.stored_bytes, held.container_bytes) == (packed.numel(), 5 * 19)


def test_three_bit_layout_and_nibbles():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]], dtype=torch.uint8)
    word = sum(c << (3 * i) for i, c in enumerate(codes[0].tolist()))
    assert pack_3bit(codes).tolist() == [word & 0xFF, (word >> 8) & 0xFF, word >> 16]
    assert to_nibbles(codes).tolist() == [[0x21, 0x43, 0x65, 0x07]]
    odd = torch.randint(0, 16, (3, 7), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    assert torch.equal(from_nibbles(to_nibbles(odd), 7), odd)


def test_out_of_range_codes_are_rejected():
    with pytest.raises(ValueError, match=r"3-bit codes must lie in \[0, 8\), got \[0, 8\]"):
        pack_3bit(torch.tensor([[0, 8]]))
    with pytest.raises(ValueError, match="3 bytes|uint8 bytes"):
        unpack_3bit(torch.zeros(4, dtype=torch.uint8), (1, 8))


# --- packed layout and the torch matrix ----------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_packing_over_k_round_trips(bits):
    codes = torch.randint(0, 2**bits, (6, 40), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    packed = pack_over_k(codes, bits)
    per_word = 32 // bits
    assert packed.dtype == torch.int32 and packed.shape == (-(-40 // per_word), 6)
    assert torch.equal(unpack_over_k(packed, bits)[:40], codes.T.int())
    # code k = row * per_word + i at bits [i * bits, (i + 1) * bits) of int32 row `row`
    assert int(packed[0, 0]) & (2**bits - 1) == codes[0, 0] and (int(packed[0, 0]) >> bits) & (2**bits - 1) == codes[0, 1]


@pytest.mark.parametrize("bits,group_size", [(2, 64), (3, 128), (4, 32), (8, 128)])
def test_torch_matrix_equals_the_dequantized_reference(bits, group_size):
    w = random_weights(24, 128, bits, group_size)
    m = TorchPackedMatrix(w, dtype=torch.float64)
    x = torch.randn(5, 128, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    expected = x @ w.dense().T + w.bias.double()
    assert relative_error(m(x), expected) < 1e-12
    assert relative_error(TorchPackedMatrix(w, dtype=torch.float32)(x.float()), expected) < 1e-5
    container = 4 if bits == 3 else bits
    meta = 2 * 24 * (128 // group_size) * 2 + 24 * 8
    assert m.resident_bytes() == 24 * 128 * container // 8 + meta


def test_quantized_weights_are_checked():
    w = random_weights(4, 64, 2, 32)
    with pytest.raises(ValueError, match="group_size must divide in_features = 64, got 48"):
        QuantizedWeights(w.codes, w.scale, w.zero, 2, 48)
    with pytest.raises(ValueError, match=r"scale must have shape \(out_features, groups\) = \(4, 1\)"):
        QuantizedWeights(w.codes, w.scale, w.zero, 2, 64)
    with pytest.raises(ValueError, match="2-bit codes must be < 4, got"):
        QuantizedWeights(w.codes * 2, w.scale, w.zero, 2, 32)
    with pytest.raises(ValueError, match="bits must be one of"):
        QuantizedWeights(w.codes, w.scale, w.zero, 5, 32)


# --- backend selection -----------------------------------------------------------------------------


@pytest.fixture
def fresh_selection(monkeypatch):
    monkeypatch.setattr(select, "_LOGGED", set())
    monkeypatch.setattr(gemlite_backend, "_LOADED", {})


def test_cpu_falls_back_to_torch_with_a_log_line(fresh_selection, caplog):
    with caplog.at_level(logging.INFO, logger="fqbench.kernels.select"):
        assert select.select_backend("cpu", 2, 4096, 4096) == "torch"
        assert select.select_backend("cpu", 4, 4096, 128) == "torch"
    assert [r.getMessage() for r in caplog.records] == [
        "packed matrices fall back to the torch backend: device cpu is not CUDA"]  # once per reason
    assert isinstance(select.build_matrix(random_weights(8, 64, 2, 64), "cpu", torch.float32), TorchPackedMatrix)


def test_gpu_without_gemlite_or_with_a_bad_shape_falls_back(fresh_selection, monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "gemlite", None)  # import gemlite raises ImportError
    with caplog.at_level(logging.INFO, logger="fqbench.kernels.select"):
        assert select.select_backend("cuda", 2, 4040, 4040) == "torch"
        assert select.select_backend("cuda", 2, 4096, 48) == "torch"
        assert select.select_backend("cuda", 2, 4096, 4096) == "torch"
    messages = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert messages[0] == ("WARNING", "packed matrices fall back to the torch backend: "
                                      "in_features = 4040 is not a multiple of 32")
    assert "group size 48 is not a multiple of 32" in messages[1][1]
    assert messages[2][1].startswith("packed matrices fall back to the torch backend: gemlite cannot be imported")


def test_gpu_without_cuda_names_the_reason(fresh_selection, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select.gemlite_problem("cuda", 2, 4096, 4096) == "CUDA is not available"
    with pytest.raises(gemlite_backend.BackendUnavailable, match="CUDA is not available"):
        gemlite_backend.load_gemlite()


# --- GPU (skipped without CUDA) ------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def untuned_gemlite():
    """gemlite's default kernel configs: these tests check values, and autotuning costs ~15 compiles a shape."""
    gemlite = gemlite_backend.load_gemlite()
    gemlite.set_autotune("default")
    return gemlite


@cuda
@pytest.mark.usefixtures("untuned_gemlite")
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [128, 4096])
def test_gpu_gemlite_equals_the_dequantized_reference(bits, group_size):
    from fqbench.kernels.gemlite_backend import GemliteMatrix

    w = random_weights(1024, 4096, bits, group_size)
    reference = w.dense(torch.float64).cuda()
    for prefill in ("dequant", "gemlite"):
        m = GemliteMatrix(w, dtype=torch.float16, prefill=prefill)
        assert m.dequant_reason is None
        for rows in (1, 16, 256):
            x = torch.randn(rows, 4096, device="cuda", generator=torch.Generator("cuda").manual_seed(rows))
            expected = x.double() @ reference.T + w.bias.double().cuda()
            assert relative_error(m(x.half()), expected) < 2e-3, (prefill, rows, m.describe())
    assert torch.equal(m.layer.W_q, pack_over_k(w.codes.cuda(), 4 if bits == 3 else bits))
    assert m.resident_bytes() >= 1024 * 4096 * (4 if bits == 3 else bits) // 8
