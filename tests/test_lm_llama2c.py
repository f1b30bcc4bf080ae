"""The llama2.c importer on the real pretrained stories260K, and the whole LM path on its real weights."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lm_tiny import convert_stories

from fqbench.methods import build_method
from fqbench.data.text import DataFiles, eval_tokens
from fqbench.engine import capture_block_inputs, quantize_blocks
from fqbench.eval.perplexity import perplexity
from fqbench.models.hf import load_causal_lm
from fqbench.tools.llama2c import Llama2cConfig, convert, read_checkpoint, rotary_permutation


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def stories_bin(data_root):
    return data_root / "llama2c" / "stories260K.bin"


@pytest.fixture(scope="module")
def stories(data_root, tmp_path_factory):
    return convert_stories(data_root, tmp_path_factory.mktemp("stories") / "hf")


@pytest.fixture(scope="module")
def loaded(stories):
    return load_causal_lm(str(stories))


def sample_stories(model, tokenizer, count, seed, length=256):
    """Stories sampled from the model itself (temperature 1), ``length`` tokens each, starting at BOS."""
    torch.manual_seed(seed)
    bos = torch.full((count, 1), tokenizer.bos_token_id)
    return model.generate(bos, do_sample=True, top_k=0, max_new_tokens=length - 1, min_new_tokens=length - 1,
                          pad_token_id=tokenizer.pad_token_id or 0)


def llama2c_forward(config: Llama2cConfig, t, tokens):
    """llama2.c's run.c forward pass written out (interleaved rotary pairs): logits for every position."""
    T, hs, H, KV = len(tokens), config.head_size, config.n_heads, config.n_kv_heads
    freqs = 1.0 / 10000.0 ** (torch.arange(0, hs, 2, dtype=torch.float64) / hs)
    angles = torch.arange(T, dtype=torch.float64)[:, None] * freqs[None]
    cos, sin = angles.cos().float()[:, None], angles.sin().float()[:, None]

    def rope(v, heads):
        v = v.view(T, heads, hs // 2, 2)
        a, b = v[..., 0], v[..., 1]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).view(T, heads * hs)

    def rmsnorm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    x = t["tok_embeddings"][tokens]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for layer in range(config.n_layers):
        h = rmsnorm(x, t["attention_norm"][layer])
        q = rope(h @ t["wq"][layer].T, H).view(T, H, hs).transpose(0, 1)
        k = rope(h @ t["wk"][layer].T, KV).view(T, KV, hs).transpose(0, 1).repeat_interleave(H // KV, 0)
        v = (h @ t["wv"][layer].T).view(T, KV, hs).transpose(0, 1).repeat_interleave(H // KV, 0)
        scores = (q @ k.transpose(1, 2) / math.sqrt(hs)).masked_fill(~causal, float("-inf"))
        x = x + (scores.softmax(-1) @ v).transpose(0, 1).reshape(T, -1) @ t["wo"][layer].T
        h = rmsnorm(x, t["ffn_norm"][layer])
        x = x + (F.silu(h @ t["w1"][layer].T) * (h @ t["w3"][layer].T)) @ t["w2"][layer].T
    return rmsnorm(x, t["norm"]) @ t["tok_embeddings"].T


def test_header_and_tensors_are_read(stories_bin):
    config, tensors = read_checkpoint(stories_bin)
    assert config == Llama2cConfig(64, 172, 5, 8, 4, 512, 512, shared_classifier=True)
    assert tensors["wk"].shape == (5, 32, 64) and tensors["w2"].shape == (5, 64, 172)
    # The file's own RoPE table agrees with the frequencies both implementations use.
    positions = torch.arange(512, dtype=torch.float64)[:, None]
    freqs = 1.0 / 10000.0 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    torch.testing.assert_close(tensors["freq_cis_real"].double(), (positions * freqs).cos(), atol=1e-5, rtol=0)


def test_converted_model_computes_what_llama2c_computes(loaded, stories_bin):
    config, tensors = read_checkpoint(stories_bin)
    model, tokenizer, _ = loaded
    ids = tokenizer("Once upon a time, there was a little dog named Max. He liked to run.", return_tensors="pt").input_ids
    with torch.no_grad():
        hf = model(ids).logits[0]
    torch.testing.assert_close(hf, llama2c_forward(config, tensors, ids[0]), atol=2e-4, rtol=1e-4)


def test_rotary_permutation_is_the_half_split_order():
    w = torch.arange(8.0)[:, None].expand(8, 3)  # one head of size 8: rows 0..7
    assert rotary_permutation(w, 1)[:, 0].tolist() == [0, 2, 4, 6, 1, 3, 5, 7]


def test_greedy_story_is_coherent_and_the_model_finds_its_own_text_likely(loaded):
    model, tokenizer, adapter = loaded
    prompt = tokenizer("Once upon a time", return_tensors="pt").input_ids
    story = model.generate(prompt, max_new_tokens=255, do_sample=False)[0]
    text = tokenizer.decode(story, skip_special_tokens=True)
    assert text.startswith("Once upon a time, there was a little girl named Lily. She loved to play")
    words = text.replace(",", " ").replace(".", " ").replace("'", " ").replace('"', " ").split()
    assert all(w.isalpha() for w in words) and len(words) > 100
    own = perplexity(model, adapter, story[:256], seqlen=256, device="cpu").ppl
    scrambled = story[:256][torch.randperm(256, generator=torch.Generator().manual_seed(0))]
    assert own < 2.0 < 50 < perplexity(model, adapter, scrambled, seqlen=256, device="cpu").ppl


def test_four_bit_framequant_stays_within_ten_percent_of_fp(loaded):
    model, tokenizer, adapter = loaded
    calibration, evaluation = sample_stories(model, tokenizer, 32, seed=0), sample_stories(model, tokenizer, 16, seed=1)
    fp = perplexity(model, adapter, evaluation.reshape(-1), seqlen=256, device="cpu").ppl
    quantized = copy.deepcopy(model)
    blocks = adapter.blocks(quantized)
    inputs = capture_block_inputs(quantized, blocks, calibration.split(1),
                                  lambda m, ids: m(input_ids=ids, use_cache=False), "cpu")
    # At 4 bits the min-max grid; FrameQuant's 2-sigma clip is its 2-bit choice (docs/lm.md).
    method = build_method("framequant", bits=4, redundancy=1.1, clip_sigma=None)
    records, _ = quantize_blocks(blocks, inputs, method, device="cpu", progress=False)
    ppl = perplexity(quantized, adapter, evaluation.reshape(-1), seqlen=256, device="cpu").ppl
    assert 3 < fp < 5 and fp < ppl < 1.10 * fp
    assert len(records) == 35


def test_real_evaluation_sets_through_the_real_files(loaded, data_root):
    model, tokenizer, adapter = loaded
    data = DataFiles(data_root, hub=False, files={**DataFiles().files,
                                                  "c4_eval": "c4/c4-train.00000-of-01024.first1000.jsonl"})
    for name in ("wikitext2", "c4", "ptb"):
        tokens = eval_tokens(name, data, tokenizer, seqlen=256)
        assert tokens.ids[0] == tokenizer.bos_token_id and tokens.ids.numel() > 60_000
        result = perplexity(model, adapter, tokens.ids[: 8 * 256], seqlen=256, device="cpu")
        # A TinyStories model on Wikipedia, web text and WSJ: far worse than on stories, far better than chance.
        assert 8 < result.ppl < 512, name


def test_importer_refuses_bad_input(stories_bin, data_root, tmp_path):
    truncated = tmp_path / "cut.bin"
    truncated.write_bytes(stories_bin.read_bytes()[:-4])
    with pytest.raises(ValueError, match="implies .* float32 weights"):
        read_checkpoint(truncated)
    versioned = tmp_path / "v1.bin"
    versioned.write_bytes(np.array([0x616B3432, 1], dtype=np.uint32).tobytes() + bytes(256))
    with pytest.raises(ValueError, match="versioned llama2.c export"):
        read_checkpoint(versioned)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        convert(stories_bin, data_root / "llama2c" / "tok512.model", tmp_path / "taken")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.bin", "taken", "v1.bin"]  # nothing half-written
