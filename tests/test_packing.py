"""Packed storage: bit packing, the exact layer format, checkpoints of tiny OPT/Llama/ViT models, corrupt files."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import fqbench
from fqbench.engine import capture_block_inputs, quantize_blocks
from fqbench.kernels.bitpack import pack_bits, packed_shape, unpack_bits
from fqbench.methods import build_method
from fqbench.models.adapter import Layout
from fqbench.packing import PackedFormatError, checkpoint_sizes, load_quantized, save_quantized
from fqbench.packing.format import pack_layer, unpack_layer
from fqbench.packing.safetensors_file import file_size
from fqbench.quantized import GridWeight, QuantLinear, StateError, TransformedWeight


pytestmark = pytest.mark.usefixtures("one_thread")


# --- bit packing -------------------------------------------------------------------------

SHAPES = [(1, 1), (3, 5), (7, 13), (8, 32), (33, 100), (31, 33), (65, 7)]


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8, 11, 16])
def test_pack_round_trip_every_width_and_odd_shapes(bits):
    g = torch.Generator().manual_seed(bits)
    for shape in SHAPES:
        values = torch.randint(0, 2**bits, shape, generator=g)
        packed = pack_bits(values, bits)
        count = values.numel()
        assert packed.dtype == torch.uint8 and tuple(packed.shape) == packed_shape(count, bits)
        # exactly `bits` bits per value, padded to whole groups of 8 values at the end only
        assert packed.numel() == math.ceil(count / 8) * bits if bits != 8 else packed.numel() == count
        assert packed.numel() * 8 - count * bits < 8 * bits
        assert torch.equal(unpack_bits(packed, bits, count).long().view(shape), values)


def test_pack_extremes_and_bad_input():
    for bits in (2, 3, 4, 8):
        top = torch.full((5, 3), 2**bits - 1)
        assert torch.equal(unpack_bits(pack_bits(top, bits), bits, 15).long().view(5, 3), top)
    with pytest.raises(ValueError, match="outside the 2-bit range"):
        pack_bits(torch.tensor([0, 4]), 2)
    with pytest.raises(ValueError, match="outside the 3-bit range"):
        pack_bits(torch.tensor([-1, 2]), 3)
    with pytest.raises(ValueError, match="width"):
        pack_bits(torch.tensor([0]), 0)
    with pytest.raises(ValueError, match="shape"):
        unpack_bits(torch.zeros(3, 2, dtype=torch.uint8), 2, 100)


# --- one layer ---------------------------------------------------------------------------

LAYER_CASES = [
    ("rtn", {"bits": 3, "groupsize": 32}),
    ("gptq", {"bits": 2}),
    ("gptq", {"bits": 4, "solver": {"act_order": True, "groupsize": 16}}),
    ("gptq", {"bits": 8, "symmetric": True}),
    ("gptq", {"bits": 3, "scale_dtype": "float32"}),  # reference-exact: 32-bit scales stored and counted
    ("gptq_clip", {"bits": 2}),
    ("quip", {"bits": 2}),
    ("quip_clip", {"bits": 3}),
    ("framequant", {"bits": 2, "redundancy": 1.1}),
    ("framequant", {"bits": 3, "redundancy": 1.1, "redundancy_sides": "input", "zero_point": "float"}),
    ("framequant", {"bits": 2, "redundancy": 1.0, "act_bits": 8, "denoise": True}),
    ("framequant", {"bits": 3, "redundancy": 1.1, "clip_sigma": "auto", "grid_fit": "mse", "normalize_rows": True}),
    ("fp", {}),
]


@pytest.mark.parametrize("name,options", LAYER_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(LAYER_CASES)])
def test_layer_format_is_exact_and_matches_the_accounting(name, options, layer_factory):
    for shape in [(96, 128), (37, 100)]:
        W, H, X = layer_factory(*shape)
        layer = build_method(name, **options).quantize(W, H)
        tensors, meta = pack_layer(layer)
        json.dumps(meta)  # the metadata goes into config.json
        for layout in ("plain", "packed"):
            rebuilt, quantizers = unpack_layer("layer", meta, tensors, layout)
            assert type(rebuilt) is type(layer) and not quantizers
            assert rebuilt.layout == ("plain" if name == "fp" else layout)  # a dense weight has nothing to pack
            assert torch.equal(rebuilt.weight(), layer.weight())
            assert rebuilt.bits_per_weight == layer.bits_per_weight
        plain, _ = unpack_layer("layer", meta, tensors)
        assert torch.equal(plain(X[:8]), layer(X[:8]))
        # what the file holds is what the accounting counts, up to the byte padding of each packed tensor
        stored = sum(t.numel() * t.element_size() * 8 for t in tensors.values())
        accounted = layer.stored_bits
        assert 0 <= stored - accounted < 8 * 8 * len(tensors)


def test_reference_exact_scales_are_stored_and_counted_at_32_bits(layer_factory):
    W, H, _ = layer_factory(96, 128)
    half = build_method("gptq", bits=3).quantize(W, H)
    full = build_method("gptq", bits=3, scale_dtype="float32").quantize(W, H)
    tensors, meta = pack_layer(full)
    assert tensors["scale"].dtype == torch.float32 and meta["scale_dtype"] == "float32"
    assert full.bits_per_weight - half.bits_per_weight == pytest.approx(96 * 16 / (96 * 128))


def test_parameters_that_cannot_be_stored_exactly_are_refused(layer_factory):
    W, H, _ = layer_factory(32, 64)
    layer = build_method("gptq", bits=2).quantize(W, H)
    codes, scale = layer.code_values(), layer.scale.float() + 1e-4  # no longer float16-exact
    zero = layer.zero.float()
    with pytest.raises(StateError, match="float16"):
        GridWeight.fit(codes, scale, zero, torch.zeros(64, dtype=torch.long), bits=2, integer_zero=True)
    with pytest.raises(StateError, match="rows sharing a scale"):
        GridWeight.fit(codes, layer.scale.float(), zero, torch.zeros(64, dtype=torch.long), bits=2,
                       integer_zero=True, scale_rows=1)


# --- whole models ------------------------------------------------------------------------

CALIB_TOKENS = 24


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=172, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    attention = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    layout = Layout("model.layers", (attention, ("self_attn.o_proj",), ("mlp.gate_proj", "mlp.up_proj"),
                                     ("mlp.down_proj",)))
    return LlamaForCausalLM(config), layout, {}


def tiny_opt():
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(vocab_size=96, hidden_size=48, ffn_dim=100, num_hidden_layers=1, num_attention_heads=4,
                       max_position_embeddings=64, word_embed_proj_dim=48)
    attention = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    layout = Layout("model.decoder.layers", (attention, ("self_attn.out_proj",), ("fc1",), ("fc2",)))
    return OPTForCausalLM(config), layout, {}


VIT_KWARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 1, "num_heads": 3, "mlp_ratio": 2.0,
              "num_classes": 10}


def tiny_vit():
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **VIT_KWARGS)
    layout = Layout("blocks", (("attn.qkv",), ("attn.proj",), ("mlp.fc1",), ("mlp.fc2",)))
    return model, layout, {"timm_kwargs": VIT_KWARGS}


MODELS = {"llama": tiny_llama, "opt": tiny_opt, "vit": tiny_vit}
METHODS = {
    "rtn": {"bits": 4, "groupsize": 16},
    "gptq": {"bits": 3},
    "quip": {"bits": 2},
    "framequant": {"bits": 2, "redundancy": 1.1},
    "quip_sharp": {"bits": 2},
}
TRANSFORMED = ("framequant", "quip", "quip_sharp")  # computed in frame (or rotated) space


def model_inputs(kind, generator, batch=2):
    if kind == "vit":
        return {"x": torch.randn(batch, 3, 32, 32, generator=generator)}
    return {"input_ids": torch.randint(0, 96, (batch, CALIB_TOKENS), generator=generator)}


def outputs(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


def quantize(kind, method_name, options, seed=0):
    """A tiny model quantized by the engine on random calibration data: ``(model, layers, method, extra)``."""
    torch.manual_seed(seed)
    model, layout, extra = MODELS[kind]()
    model.eval()
    g = torch.Generator().manual_seed(seed)
    samples = [model_inputs(kind, g, batch=1) for _ in range(4)]
    blocks = layout.find_blocks(model)
    inputs = capture_block_inputs(model, blocks, samples, lambda m, s: m(**s), "cpu")
    method = build_method(method_name, **options)
    layers = quantize_blocks(blocks, inputs, method, device="cpu", seed=seed, keep_layers=True, progress=False).layers
    return model, layers, method, extra


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Every tiny model x method, quantized once and saved: ``{(kind, method): (model, layers, directory)}``."""
    made = {}

    def get(kind, method_name):
        if (kind, method_name) not in made:
            model, layers, method, extra = quantize(kind, method_name, METHODS[method_name])
            directory = tmp_path_factory.mktemp(f"{kind}-{method_name}") / "packed"
            save_quantized(model, layers, directory, method=method, **extra)
            made[kind, method_name] = (model, layers, directory)
        return made[kind, method_name]

    return get


@pytest.mark.parametrize("method_name", list(METHODS))
@pytest.mark.parametrize("kind", list(MODELS))
def test_save_and_load_gives_the_evaluated_model(kind, method_name, checkpoints):
    model, layers, directory = checkpoints(kind, method_name)
    inputs = model_inputs(kind, torch.Generator().manual_seed(1))
    expected = outputs(model, inputs)

    dequantized = load_quantized(directory)
    assert torch.equal(outputs(dequantized, inputs), expected)  # bit-identical

    packed = load_quantized(directory, mode="packed")
    modules = dict(packed.named_modules())
    assert all(isinstance(modules[n], QuantLinear) and modules[n].quantized.layout == "packed" for n in layers)
    kind = TransformedWeight if method_name in TRANSFORMED else GridWeight
    assert all(isinstance(modules[n].quantized, kind) for n in layers)
    got = outputs(packed, inputs)
    if method_name in TRANSFORMED:  # frame space: equal within float rounding
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    else:  # many rows of activations: weights decoded exactly as the fake-quantized model
        assert torch.equal(got, expected)

    # The kernel layout (gemlite on a GPU; here the PyTorch kernel over the same int32 layout, and
    # Kronecker-factored transforms): the same model within float32 rounding on the CPU.
    kernel = load_quantized(directory, mode="kernel")
    modules = dict(kernel.named_modules())
    for n, layer in layers.items():  # groups of 16 that do not divide 100 columns are stored with an index
        inner = layer.inner if isinstance(layer, TransformedWeight) else layer
        assert modules[n].quantized.layout == ("kernel" if inner.kernel_problem() is None else "packed")
    torch.testing.assert_close(outputs(kernel, inputs), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    assert {n: modules[n].quantized.bits_per_weight for n in layers} == {n: l.bits_per_weight for n, l in layers.items()}


@pytest.mark.parametrize("kind", list(MODELS))
def test_sizes_from_the_files(kind, checkpoints, tmp_path):
    model, layers, directory = checkpoints(kind, "framequant")
    sizes = checkpoint_sizes(directory)
    honest = sum(l.bits_per_weight * l.out_features * l.in_features for l in layers.values())
    weights = sum(l.out_features * l.in_features for l in layers.values())
    assert sizes["quantized_weights"] == weights
    assert sizes["accounting_bits_per_weight"] == pytest.approx(honest / weights)
    # from the files: the accounting plus at most a few bytes of padding per packed tensor
    assert 0 <= sizes["bits_per_weight"] - honest / weights < 8 * 8 * 6 * len(layers) / weights
    assert sizes["bytes"] == sum(f.stat().st_size for f in directory.iterdir())
    assert sizes["parameters"] == sum(v.numel() for v in _dense_state(model).values())
    # the FP16 original's size is exact: write it and compare
    original = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in _dense_state(model).items()}
    save_file(original, tmp_path / "fp16.safetensors", metadata={"format": "pt"})
    assert sizes["fp16_bytes"] == (tmp_path / "fp16.safetensors").stat().st_size
    assert file_size({k: (tuple(v.shape), v.dtype) for k, v in original.items()}) == sizes["fp16_bytes"]


def _dense_state(model):
    """The model's state dict as save_pretrained writes it: each tied tensor once."""
    seen, state = set(), {}
    for key, value in model.state_dict().items():
        if value.data_ptr() in seen:
            continue
        seen.add(value.data_ptr())
        state[key] = value
    return state


def test_activation_quantized_layers_round_trip(tmp_path):
    model, layers, method, extra = quantize("llama", "framequant", {"bits": 2, "redundancy": 1.1, "act_bits": 8})
    save_quantized(model, layers, tmp_path / "packed", method=method)
    inputs = model_inputs("llama", torch.Generator().manual_seed(2))
    expected = outputs(model, inputs)
    for mode in ("dequantized", "packed"):  # both run in frame space, as the evaluated model
        assert torch.equal(outputs(load_quantized(tmp_path / "packed", mode=mode), inputs), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_round_trip(dtype, tmp_path):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model, layout, _ = tiny_llama()
    model = model.to(dtype).eval()  # .to() also casts the rotary frequencies, which are not saved
    g = torch.Generator().manual_seed(0)
    blocks = layout.find_blocks(model)
    inputs = capture_block_inputs(model, blocks, [model_inputs("llama", g, 1) for _ in range(2)], lambda m, s: m(**s),
                                  "cpu")
    method = build_method("framequant", bits=2, redundancy=1.1)
    layers = quantize_blocks(blocks, inputs, method, device="cpu", keep_layers=True, progress=False).layers
    save_quantized(model, layers, tmp_path / "packed", method=method)
    loaded = load_quantized(tmp_path / "packed")
    assert isinstance(loaded, LlamaForCausalLM) and loaded.dtype == dtype
    inputs = model_inputs("llama", g)
    assert torch.equal(outputs(loaded, inputs), outputs(model, inputs))
    packed = outputs(load_quantized(tmp_path / "packed", mode="packed"), inputs)
    assert packed.dtype == dtype and torch.allclose(packed.float(), outputs(model, inputs).float(), atol=0.05)


def test_config_records_method_version_and_frames(checkpoints):
    _, layers, directory = checkpoints("llama", "framequant")
    config = json.loads((directory / "config.json").read_text())
    qc = config["quantization_config"]
    assert config["model_type"] == "llama" and qc["quant_method"] == "fqbench"
    assert qc["fqbench_version"] == fqbench.__version__ and qc["method"] == "framequant"
    assert qc["method_config"]["redundancy"] == 1.1
    meta = qc["layers"]["model.layers.0.mlp.down_proj"]
    assert meta["kind"] == "transformed" and meta["inner"]["kind"] == "grid"
    assert meta["in_op"]["dim"] == 172 and meta["in_op"]["rotation"] in ("hadamard", "kronecker")
    assert meta["in_op"]["effective_redundancy"] == pytest.approx(layers["model.layers.0.mlp.down_proj"].in_op.effective_redundancy)
    tensors = load_file(directory / "model.safetensors")
    # frames are regenerated from a few numbers: no tensor of a layer is as large as a dense d x d frame
    frame_tensors = [k for k in tensors if ".in_op." in k or ".out_op." in k]
    assert frame_tensors and all(tensors[k].numel() <= 4 for k in frame_tensors)


# --- corrupted or mismatched files -------------------------------------------------------


@pytest.fixture
def saved_copy(checkpoints, tmp_path):
    import shutil

    _, _, directory = checkpoints("llama", "gptq")
    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    return copy


def _rewrite_tensors(directory, change):
    tensors = load_file(directory / "model.safetensors")
    change(tensors)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def _rewrite_config(directory, change):
    config = json.loads((directory / "config.json").read_text())
    change(config)
    (directory / "config.json").write_text(json.dumps(config))


def test_missing_quantized_tensor(saved_copy):
    _rewrite_tensors(saved_copy, lambda t: t.pop("model.layers.0.self_attn.q_proj.quantized.scale"))
    with pytest.raises(PackedFormatError, match=r"missing tensor.*q_proj\.quantized\.scale"):
        load_quantized(saved_copy)


def test_missing_regular_tensor(saved_copy):
    _rewrite_tensors(saved_copy, lambda t: t.pop("model.norm.weight"))
    with pytest.raises(PackedFormatError, match=r"missing tensor.*model\.norm\.weight"):
        load_quantized(saved_copy, mode="packed")


def test_wrong_shape(saved_copy):
    def truncate(t):
        key = "model.layers.0.mlp.up_proj.quantized.codes"
        t[key] = t[key][:-1].clone()

    _rewrite_tensors(saved_copy, truncate)
    with pytest.raises(PackedFormatError, match=r"codes should be torch.uint8 of shape"):
        load_quantized(saved_copy)


def test_wrong_regular_shape(saved_copy):
    _rewrite_tensors(saved_copy, lambda t: t.__setitem__("model.norm.weight", torch.ones(3)))
    with pytest.raises(PackedFormatError, match="wrong shape"):
        load_quantized(saved_copy)


def test_unknown_method(saved_copy):
    _rewrite_config(saved_copy, lambda c: c["quantization_config"].__setitem__("method", "magic"))
    with pytest.raises(PackedFormatError, match="unknown method 'magic'"):
        load_quantized(saved_copy)


def test_unknown_layer_kind_and_future_format(saved_copy):
    _rewrite_config(saved_copy, lambda c: c["quantization_config"]["layers"]["model.layers.0.mlp.up_proj"]
                    .__setitem__("kind", "vector"))
    with pytest.raises(PackedFormatError, match="unknown weight kind 'vector'"):
        load_quantized(saved_copy)
    _rewrite_config(saved_copy, lambda c: c["quantization_config"].__setitem__("format_version", 99))
    with pytest.raises(PackedFormatError, match="format_version 99"):
        load_quantized(saved_copy)


def test_not_a_checkpoint_and_truncated_file(saved_copy, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_quantized(tmp_path / "nowhere")
    data = (saved_copy / "model.safetensors").read_bytes()
    (saved_copy / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(PackedFormatError, match="corrupted"):
        load_quantized(saved_copy)
    _rewrite_config(saved_copy, lambda c: c.pop("quantization_config"))
    with pytest.raises(PackedFormatError, match="not a packed checkpoint"):
        load_quantized(saved_copy)


def test_save_refuses_layers_of_another_model(checkpoints, tmp_path):
    model, layers, _ = checkpoints("llama", "gptq")
    _, other_layers, _ = checkpoints("llama", "rtn")
    with pytest.raises(ValueError, match="not this layer's weight"):
        save_quantized(model, other_layers, tmp_path / "wrong", method="gptq")
    assert not (tmp_path / "wrong").exists()  # nothing half-written
    with pytest.raises(FileExistsError):
        save_quantized(model, layers, checkpoints("llama", "gptq")[2], method="gptq")


# --- checksums and permissions -----------------------------------------------------------


def _flip(path, offset, count=1):
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_bytes_in_tensor_data_name_the_tensor(saved_copy):
    from fqbench.packing.safetensors_file import data_offset, read_header

    weights = saved_copy / "model.safetensors"
    header = read_header(weights)
    name = "model.layers.0.mlp.up_proj.quantized.codes"
    begin, end = header[name]["data_offsets"]
    _flip(weights, data_offset(weights) + begin + (end - begin) // 2)
    load_file(weights)  # safetensors itself reads the damaged file without complaint
    with pytest.raises(PackedFormatError, match=rf"tensor {name} does not match its sha256 checksum"):
        load_quantized(saved_copy)
    with pytest.raises(PackedFormatError, match=name):
        load_quantized(saved_copy, mode="packed")
    load_quantized(saved_copy, verify=False)  # the opt-out, for speed on trusted files


def test_many_flipped_bytes_anywhere_in_the_data_are_caught(saved_copy):
    from fqbench.packing.safetensors_file import data_offset

    weights = saved_copy / "model.safetensors"
    start = data_offset(weights)
    _flip(weights, start + (weights.stat().st_size - start) // 3, 1000)
    with pytest.raises(PackedFormatError, match="does not match its sha256 checksum"):
        load_quantized(saved_copy)


def test_checksums_are_stored_per_tensor(checkpoints):
    from fqbench.packing.safetensors_file import read_header

    _, _, directory = checkpoints("llama", "gptq")
    header = read_header(directory / "model.safetensors")
    stored = json.loads(header.pop("__metadata__")["fqbench.sha256"])
    tensors = load_file(directory / "model.safetensors")
    assert set(stored) == set(header) == set(tensors)
    import hashlib

    codes = tensors["model.layers.0.mlp.up_proj.quantized.codes"]
    assert stored["model.layers.0.mlp.up_proj.quantized.codes"] == hashlib.sha256(codes.numpy().tobytes()).hexdigest()


def test_a_checkpoint_without_checksums_loads_with_a_warning(saved_copy):
    _rewrite_tensors(saved_copy, lambda t: None)  # rewritten without fqbench's metadata, as before checksums
    with pytest.warns(UserWarning, match="cannot be verified"):
        load_quantized(saved_copy)


@pytest.mark.parametrize("umask", [0o022, 0o007])
def test_checkpoints_follow_the_umask(checkpoints, tmp_path, umask):
    import os

    model, layers, _ = checkpoints("llama", "rtn")
    old = os.umask(umask)
    try:
        save_quantized(model, layers, tmp_path / "packed", method="rtn")
    finally:
        os.umask(old)
    assert (tmp_path / "packed").stat().st_mode & 0o777 == 0o777 & ~umask
    assert {f.stat().st_mode & 0o777 for f in (tmp_path / "packed").iterdir()} == {0o666 & ~umask}
