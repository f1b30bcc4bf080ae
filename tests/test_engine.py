import pytest
import torch
from torch import nn

from fqbench.engine import (
    accumulate_hessians, capture_block_inputs, install, layer_record, quantize_blocks, run_block, summarize,
)
from fqbench.methods import BlockMethod, LayerMethod, build_method
from fqbench.models.adapter import Layout
from fqbench.quantized import QuantLinear


class ToyBlock(nn.Module):
    """Two groups of linears and a keyword argument the block cannot run without."""

    def __init__(self, d):
        super().__init__()
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x, *, gate):
        x = x + torch.tanh(self.q(x)) * torch.sigmoid(self.k(x)) * gate
        return (x + self.down(torch.relu(self.up(x))),)


class ToyModel(nn.Module):
    def __init__(self, d=32, depth=3, vocab=50):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(ToyBlock(d) for _ in range(depth))
        self.gate = nn.Parameter(torch.tensor(0.5))
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x, gate=self.gate)[0]
        return self.head(x)


LAYOUT = Layout("blocks", (("q", "k"), ("up",), ("down",)))


def setup(seed=0, samples=4):
    torch.manual_seed(seed)
    model = ToyModel().eval()
    data = [torch.randint(0, 50, (1, 24)) for _ in range(samples)]
    return model, data


def quantize(model, data, method, **kwargs):
    blocks = LAYOUT.find_blocks(model)
    inputs = capture_block_inputs(model, blocks, data, lambda m, s: m(s), "cpu")
    result = quantize_blocks(blocks, inputs, method, device="cpu", progress=False, **kwargs)
    return result.records, result.layers


def test_capture_records_every_argument():
    model, data = setup()
    blocks = LAYOUT.find_blocks(model)
    inputs = capture_block_inputs(model, blocks, data, lambda m, s: m(s), "cpu")
    assert len(inputs.args) == len(data)
    assert set(inputs.kwargs[0]) == {"gate"}
    assert torch.equal(inputs.args[0][0], model.embed(data[0]))


def test_fp_method_reproduces_the_plain_forward():
    model, data = setup()
    reference = [model(s) for s in data]
    records, _ = quantize(model, data, build_method("fp"))
    assert [r.name for r in records] == [f"blocks.{i}.{n}" for i in range(3) for n in ("q", "k", "up", "down")]
    for s, ref in zip(data, reference):
        assert torch.equal(model(s), ref)
    assert all(r.proxy_error == 0 for r in records)


def test_quantization_changes_weights_and_records_honest_bits():
    model, data = setup()
    before = model.blocks[1].up.weight.clone()
    records, layers = quantize(model, data, build_method("gptq", bits=3), keep_layers=True)
    assert not torch.equal(model.blocks[1].up.weight, before)
    assert torch.equal(model.blocks[1].up.weight, layers["blocks.1.up"].weight())
    assert all(0 < r.proxy_error < 1 and r.damping == pytest.approx(0.01) for r in records)
    summary = summarize(records)
    assert 3 < summary["bits_per_weight"] < 4 and summary["nominal_bits"] == 3


class RecordingMethod(LayerMethod):
    """Keeps the Hessian it was given for each call (a test double of the layer API)."""

    name = "recording"
    Config = type(build_method("fp").config)

    def __init__(self, inner):
        super().__init__()
        self.inner, self.hessians = inner, []

    def quantize(self, W, H, *, seed=None):
        self.hessians.append(H.clone())
        return self.inner.quantize(W, H, seed=seed)


def test_true_sequential_hessians_see_quantized_earlier_groups():
    model, data = setup()
    fp_model = ToyModel()
    fp_model.load_state_dict(model.state_dict())
    # Hessian of block 0's `up` from a pure full-precision forward:
    blocks = LAYOUT.find_blocks(fp_model)
    fp_inputs = capture_block_inputs(fp_model, blocks, data, lambda m, s: m(s), "cpu")
    fp_h = accumulate_hessians(fp_model.blocks[0], ["up"], fp_inputs)["up"]

    sequential = RecordingMethod(build_method("rtn", bits=2))
    quantize(model, data, sequential, true_sequential=True)
    one_pass = RecordingMethod(build_method("rtn", bits=2))
    quantize(fp_model, data, one_pass, true_sequential=False)
    # calls: q, k, up, down per block; index 2 is block 0's `up`
    assert torch.allclose(one_pass.hessians[2], fp_h)
    assert not torch.allclose(sequential.hessians[2], fp_h, rtol=1e-3)


class InputRecordingMethod(LayerMethod):
    """RTN that keeps, per call, the Hessian it was given (which the block's captured inputs determine)."""

    name = "input_recording"
    Config = type(build_method("rtn").config)

    def __init__(self):
        super().__init__(build_method("rtn", bits=2).config)
        self.hessians = []

    def quantize(self, W, H, *, seed=None):
        self.hessians.append(H.clone())
        return build_method("rtn", bits=2).quantize(W, H, seed=seed)


def test_next_block_inputs_come_from_the_quantized_block():
    model, data = setup()
    fp_model = ToyModel()
    fp_model.load_state_dict(model.state_dict())
    blocks = LAYOUT.find_blocks(model)
    inputs = capture_block_inputs(model, blocks, data, lambda m, s: m(s), "cpu")
    method = InputRecordingMethod()
    quantize_blocks(blocks[:2], inputs, method, device="cpu", progress=False)
    # Block 1's inputs, as the engine should have given them: block 0's outputs with its quantized weights.
    quantized_outputs = run_block(model.blocks[0], inputs)
    fp_outputs = run_block(fp_model.blocks[0], inputs)
    expected = accumulate_hessians(model.blocks[1], ["q"], inputs.replace_hidden(quantized_outputs))["q"]
    fp_based = accumulate_hessians(fp_model.blocks[1], ["q"], inputs.replace_hidden(fp_outputs))["q"]
    # calls: q, k, up, down per block; index 4 is block 1's q (its first group: the block's inputs)
    assert torch.equal(method.hessians[4], expected)
    assert not torch.allclose(method.hessians[4], fp_based, rtol=1e-3)


def test_layout_mismatch_is_named():
    model, _ = setup()
    with pytest.raises(ValueError, match="self_attn.q_proj"):
        Layout("blocks", (("self_attn.q_proj",),)).find_blocks(model)


def test_activation_quantized_framequant_replaces_the_module():
    model, data = setup()
    quantize(model, data, build_method("framequant", bits=4, redundancy=1.0, act_bits=8))
    assert isinstance(model.blocks[0].q, QuantLinear)
    assert torch.isfinite(model(data[0])).all()


class FunctionalBlock(nn.Module):
    """Uses its q/v linear through F.linear (as Swin V2 and EVA add separate biases), shares one input between two
    linears, and runs a small MLP on a fixed coordinate table (as Swin V2's position bias) that must stay unquantized."""

    def __init__(self, d):
        super().__init__()
        self.qv = nn.Linear(d, 2 * d, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(2 * d))
        self.gate = nn.Linear(d, d)
        self.up = nn.Linear(d, d)
        self.down = nn.Linear(d, d)
        self.bias_mlp = nn.Linear(2, d)
        self.register_buffer("coords", torch.randn(5, 2))

    def forward(self, x):
        q, v = torch.nn.functional.linear(input=x, weight=self.qv.weight, bias=self.q_bias).chunk(2, dim=-1)
        x = x + torch.tanh(q) * v + self.bias_mlp(self.coords).mean(0)
        return x + self.down(torch.relu(self.gate(x)) * self.up(x))


def test_hessians_see_weights_used_through_functional_linear():
    from fqbench.engine import BlockInputs

    block = FunctionalBlock(8)
    xs = [torch.randn(3, 8) for _ in range(2)]
    hessians = accumulate_hessians(block, ["qv", "gate"], BlockInputs([(x,) for x in xs], [{}, {}]))
    X = torch.cat(xs).double()
    torch.testing.assert_close(hessians["qv"], 2 * X.T @ X / 6, rtol=1e-12, atol=0)
    assert hessians["gate"].shape == (8, 8)


def test_discovered_groups_follow_calls_share_inputs_and_skip_fixed_inputs():
    from fqbench.engine import discover_groups

    block = FunctionalBlock(8)
    groups = discover_groups(block, (torch.randn(3, 8),), {})
    assert groups == (("qv",), ("gate", "up"), ("down",))  # bias_mlp sees only the coordinate table


class ReconstructingMethod(BlockMethod):
    """A block method test double: RTN on every linear, checking what the engine hands over."""

    name = "reconstructing"
    Config = type(build_method("rtn").config)

    def __init__(self):
        super().__init__(build_method("rtn", bits=3).config)
        self.contexts = []

    def quantize_block(self, block, inputs, context):
        assert torch.equal(torch.cat(context.fp_outputs), torch.cat(run_block(block.module, inputs)))
        self.contexts.append(context)
        records, layers = [], {}
        rtn = build_method("rtn", bits=3)
        for name in block.linears():
            linear = block.module.get_submodule(name)
            layer = rtn.quantize(linear.weight.data.float(), torch.eye(linear.in_features, dtype=torch.float64))
            records.append(layer_record(f"{block.name}.{name}", linear.weight.data, layer,
                                        torch.eye(linear.in_features, dtype=torch.float64)))
            install(block.module, name, layer)
            layers[f"{block.name}.{name}"] = layer
        return records, layers


def test_block_methods_get_the_block_inputs_and_fp_outputs():
    model, data = setup()
    method = ReconstructingMethod()
    assert method.tier == "block"
    records, layers = quantize(model, data, method, keep_layers=True)
    assert len(method.contexts) == 3 and [r.name for r in records] == list(layers)
    assert all(r.bits_per_weight > 3 for r in records)
    assert torch.equal(model.blocks[2].down.weight, layers["blocks.2.down"].weight())


def test_tiers_are_dispatched_explicitly():
    from fqbench.engine import quantize_model

    class Adapter:
        name, full_precision = "toy", ()

        def blocks(self, model):
            return LAYOUT.find_blocks(model)

        def run(self, model, sample, device):
            return model(sample)

        def block_kwargs(self, index, kwargs):
            return kwargs

    class Untiered(ReconstructingMethod):
        tier = "custom"

    model, data = setup()
    layer_result = quantize_model(model, Adapter(), data, build_method("rtn", bits=2), device="cpu", progress=False)
    block_result = quantize_model(setup()[0], Adapter(), data, ReconstructingMethod(), device="cpu", progress=False)
    assert [r.name for r in layer_result.records] == [r.name for r in block_result.records]
    with pytest.raises(ValueError, match="unknown tier 'custom'"):
        quantize_model(model, Adapter(), data, Untiered(), device="cpu", progress=False)
