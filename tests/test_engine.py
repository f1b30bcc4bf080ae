import pytest
import torch
from torch import nn

from fqbench.engine import accumulate_hessians, capture_block_inputs, quantize_blocks, run_block, summarize
from fqbench.methods import LayerMethod, build_method
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
