"""The decode/prefill harness end to end on a tiny Llama on the CPU (no CUDA graphs there)."""

import pytest
import torch

from fqbench.bench.decode import WARMUP_STEPS, build_llama, greedy_tokens, time_decode, time_prefill

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    return build_llama("tiny", torch.float32, "cpu", seed=0)


def test_models_are_built_in_the_target_dtype_without_a_float32_copy():
    model = build_llama("7b", torch.float16, "meta")  # the full 7B shape, nothing allocated
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    assert sum(p.numel() for p in model.parameters()) == 6_738_415_616  # Llama-2-7B's parameter count
    assert len(model.model.layers) == 32 and model.model.layers[0].mlp.up_proj.weight.shape == (11008, 4096)
    assert len(build_llama("13b", torch.float16, "meta", layers=2).model.layers) == 2
    assert torch.get_default_dtype() == torch.float32  # restored
    with pytest.raises(ValueError, match="unknown shape '70b'"):
        build_llama("70b", device="meta")


def test_static_cache_decode_matches_generate(tiny):
    prompt = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(3))
    tokens, graphed = greedy_tokens(tiny, prompt, steps=4, graphs="auto")
    assert not graphed and tokens.shape == (2, 4)
    with torch.no_grad():
        reference = tiny.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                  max_new_tokens=1 + WARMUP_STEPS + 4, pad_token_id=0)
    assert torch.equal(tokens, reference[:, -4:])


@pytest.mark.parametrize("batch", [1, 3])
def test_decode_and_prefill_timings(tiny, batch):
    decode = time_decode(tiny, batch=batch, new_tokens=4, prompt=5, rounds=2)
    assert (decode.kind, decode.batch, decode.tokens, len(decode.seconds)) == ("decode", batch, 4, 2)
    assert not decode.graphs and decode.note == "eager: cpu has no CUDA graphs" and decode.peak_bytes is None
    assert decode.tokens_per_s == pytest.approx(batch * 4 / sorted(decode.seconds)[0], rel=1.0)
    prefill = time_prefill(tiny, batch=batch, length=16, rounds=1)
    assert prefill.as_dict()["tokens_per_s"] > 0 and prefill.tokens == 16


def test_graphs_on_the_cpu_are_refused(tiny):
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device, the model is on cpu"):
        time_decode(tiny, new_tokens=1, rounds=1, graphs=True)
