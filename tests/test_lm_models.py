"""Hugging Face adapters, the sequential engine on real HF decoder layers, block-by-block perplexity, the pipeline."""

import math

import pytest
import torch
import torch.nn.functional as F
from lm_tiny import ROOT, compose, save_tiny_model, write_data_root
from torch import nn

from fqbench.methods import LayerMethod, build_method, registered_methods
from fqbench.engine import accumulate_hessians, capture_block_inputs, quantize_blocks, run_block
from fqbench.eval.perplexity import perplexity, split_windows
from fqbench.models.hf import ADAPTERS, LLAMA, OPT, adapter_for, load_causal_lm
from fqbench.pipelines import lm as lm_pipeline


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["opt", "llama"])
def tiny(request, tmp_path_factory):
    return save_tiny_model(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_data_root(tmp_path_factory.mktemp("data"))


def windows(count=3, length=24, vocab=40, seed=0):
    return torch.randint(4, vocab, (count, length), generator=torch.Generator().manual_seed(seed))


def run_model(model, ids):
    return model(input_ids=ids, use_cache=False)


def engine_logits(model, adapter, ids):
    """Logits through the engine's primitives: capture block 0's inputs, run each block, then the head."""
    blocks = adapter.blocks(model)
    inputs = capture_block_inputs(model, blocks, ids.split(1), run_model, "cpu")
    for block in blocks:
        inputs = inputs.replace_hidden(run_block(block.module, inputs))
    with torch.no_grad():
        return torch.cat([adapter.apply_head(model, args[0]) for args in inputs.args])


def test_adapters_are_selected_by_model_type():
    from transformers import LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

    assert adapter_for(OPTConfig()) is OPT
    for config in (LlamaConfig(), MistralConfig(), Qwen2Config()):
        assert adapter_for(config) is LLAMA


def test_unknown_model_type_names_the_supported_ones():
    from transformers import GPT2Config

    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'.*llama.*opt"):
        adapter_for(GPT2Config())


def test_mixed_attention_layers_are_refused():
    from transformers import Qwen2Config

    config = Qwen2Config(num_hidden_layers=4, use_sliding_window=True, max_window_layers=2, sliding_window=16)
    assert len(set(config.layer_types)) == 2
    with pytest.raises(ValueError, match="mix attention types"):
        adapter_for(config)


def test_layout_names_every_linear_of_a_block(tiny):
    model, _, adapter = load_causal_lm(str(tiny))
    for block in adapter.blocks(model):
        linears = {name for name, m in block.module.named_modules() if isinstance(m, nn.Linear)}
        assert sorted(block.linears()) == sorted(linears)


def test_fp_method_engine_logits_equal_a_plain_forward(tiny):
    model, _, adapter = load_causal_lm(str(tiny))
    ids = windows()
    with torch.no_grad():
        reference = model(ids).logits
    torch.testing.assert_close(engine_logits(model, adapter, ids), reference, rtol=1e-5, atol=1e-5)

    blocks = adapter.blocks(model)
    inputs = capture_block_inputs(model, blocks, ids.split(1), run_model, "cpu")
    records, _ = quantize_blocks(blocks, inputs, build_method("fp"), device="cpu", progress=False)
    assert [r.name for r in records] == [f"{b.name}.{n}" for b in blocks for n in b.linears()]
    assert all(r.proxy_error == 0 for r in records)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference, rtol=0, atol=0)
    torch.testing.assert_close(engine_logits(model, adapter, ids), reference, rtol=1e-5, atol=1e-5)


def test_block_by_block_perplexity_equals_a_full_forward(tiny):
    model, _, adapter = load_causal_lm(str(tiny))
    ids = torch.randint(4, 40, (250,), generator=torch.Generator().manual_seed(1))
    result = perplexity(model, adapter, ids, seqlen=32, device="cpu")
    assert (result.windows, result.seqlen, result.tokens) == (7, 32, 224)  # 250 tokens: tail of 26 dropped
    chunks = split_windows(ids, 32)
    with torch.no_grad():
        logits = model(chunks).logits
    per_window = [F.cross_entropy(logits[i, :-1], chunks[i, 1:]) for i in range(len(chunks))]
    assert result.ppl == pytest.approx(math.exp(torch.stack(per_window).mean().item()), rel=1e-5)


def test_too_short_evaluation_text_is_an_error(tiny):
    model, _, adapter = load_causal_lm(str(tiny))
    with pytest.raises(ValueError, match="fewer than one window of seqlen=64"):
        perplexity(model, adapter, torch.arange(4, 40), seqlen=64, device="cpu")


class RecordingMethod(LayerMethod):
    """Round-to-nearest that keeps the Hessian of every call (a test double of the layer API)."""

    name = "recording"
    Config = registered_methods()["rtn"].Config

    def __init__(self):
        super().__init__()
        self.inner, self.calls = build_method("rtn", bits=2), []

    def quantize(self, W, H, *, seed=None):
        self.calls.append(H.clone())
        return self.inner.quantize(W, H, seed=seed)


@pytest.mark.parametrize("true_sequential", [True, False])
def test_true_sequential_groups_see_the_quantized_earlier_groups(tiny, true_sequential):
    model, _, adapter = load_causal_lm(str(tiny))
    ids = windows(count=4)
    blocks = adapter.blocks(model)
    fp_inputs = capture_block_inputs(model, blocks, ids.split(1), run_model, "cpu")
    first = blocks[0]
    fp_hessians = accumulate_hessians(first.module, first.linears(), fp_inputs)

    recorder = RecordingMethod()
    quantize_blocks(blocks[:1], fp_inputs, recorder, device="cpu", progress=False, true_sequential=true_sequential)
    seen = dict(zip(first.linears(), recorder.calls))
    for index, group in enumerate(first.groups):
        for name in group:
            same = torch.allclose(seen[name], fp_hessians[name], rtol=1e-6, atol=1e-9)
            # The first group's inputs are unquantized either way; later groups differ only when sequential.
            assert same == (index == 0 or not true_sequential), (name, index)


@pytest.mark.parametrize("method", sorted(p.stem for p in (ROOT / "conf" / "method").glob("*.yaml")))
def test_every_method_runs_through_the_pipeline(tiny, data_dir, tmp_path, method):
    cfg = compose(["model=hf_causal_lm", f"model.path={tiny}", f"method={method}", "bits=3", "redundancy=1.1",
                   "calib.nsamples=4", "calib.seqlen=32", "eval.seqlen=32", f"data.root={data_dir}", "data.hub=false",
                   "device=cpu", "engine.progress=false", "eval.fp_baseline=true"])
    layer_method = build_method(cfg.method)
    if layer_method.tier == "model":  # PTQ4ViT: a vision-model method
        with pytest.raises(ValueError, match="calibrates whole vision models"):
            lm_pipeline.run(cfg, layer_method, torch.device("cpu"), tmp_path)
        return
    if method == "repq":  # its reparameterization needs LayerNorm biases and a softmax module: ViTs only
        with pytest.raises(ValueError, match="repq supports timm vision transformers"):
            lm_pipeline.run(cfg, layer_method, torch.device("cpu"), tmp_path)
        return
    result = lm_pipeline.run(cfg, layer_method, torch.device("cpu"), tmp_path)
    metrics = result["metrics"]
    assert set(metrics) == {f"{p}{n}_ppl" for p in ("", "fp_") for n in ("wikitext2", "c4", "ptb")}
    assert all(math.isfinite(v) and v > 1 for v in metrics.values())
    model, _, adapter = load_causal_lm(str(tiny))
    assert len(result["layers"]) == sum(len(b.linears()) for b in adapter.blocks(model))
    if method == "fp":
        assert metrics["wikitext2_ppl"] == pytest.approx(metrics["fp_wikitext2_ppl"], rel=1e-6)
        assert result["summary"]["bits_per_weight"] == 32
    else:
        assert metrics["wikitext2_ppl"] != metrics["fp_wikitext2_ppl"]
        assert result["summary"]["bits_per_weight"] >= 3
    assert result["calib_tokens"] == 4 * 32 and result["eval_seqlen"] == 32
    assert result["tokenizer"]["class"] == "TokenizersBackend" and result["tokenizer"]["fast"]  # transformers 5
    assert set(result["eval_tokens"]) == {"wikitext2", "c4", "ptb"} and all(n > 32 for n in result["eval_tokens"].values())
    assert result["perplexity"]["c4"]["seqlen"] == 32


def test_seqlen_beyond_the_model_positions_is_refused(tiny, data_dir, tmp_path):
    cfg = compose(["model=hf_causal_lm", f"model.path={tiny}", "method=rtn", "calib.seqlen=32", "eval.seqlen=4096",
                   f"data.root={data_dir}", "device=cpu"])
    with pytest.raises(ValueError, match="eval.seqlen=4096 exceeds the model's max_position_embeddings=128"):
        lm_pipeline.run(cfg, build_method(cfg.method), torch.device("cpu"), tmp_path)


def test_every_paper_model_config_composes():
    for name, hub in [("opt_125m", "facebook/opt-125m"), ("opt_6.7b", "facebook/opt-6.7b"),
                      ("llama2_70b", "meta-llama/Llama-2-70b-hf")]:
        cfg = compose([f"model={name}"])
        assert (cfg.model.task, cfg.model.name, cfg.model.path) == ("lm", hub, None)
    assert set(ADAPTERS) >= {"opt", "llama", "mistral", "qwen2"}
