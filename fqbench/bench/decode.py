"""Decode and prefill timing of a Hugging Face causal LM the way it is served: a static KV cache, and
on CUDA the whole decode step replayed as one CUDA graph.

    time_decode(model, batch=1, new_tokens=32)   -> Timing (tokens/s over batch x new tokens)
    time_prefill(model, batch=1, length=2048)    -> Timing (prompt tokens/s, logits of the last token only)
    greedy_tokens(model, prompt, steps, graphs)  -> the tokens picked, to check graphs change nothing
    build_llama("7b" | "13b" | "tiny", dtype, device, layers=None)

Why manual ``torch.cuda.CUDAGraph`` capture and not ``torch.compile(mode="reduce-overhead")``: the
step has no host synchronization once the cache is static (transformers >= 5 keeps the cache length
in a device tensor, ``StaticLayer.cumulative_length``, advanced in place, and builds the decode mask
and positions from it), so the captured step replays correctly as is. Capture costs a few warm-up
steps, where compiling a 32-block model costs minutes per variant and batch size, recompiles on
guards, and needs every custom kernel (gemlite's op, the fused transforms) registered with dynamo;
a graph records whatever the kernels launch. With ``graphs="auto"`` a failed capture (a host sync
inside the step) falls back to eager decoding and says so in ``Timing.note``.

Prefill and the prompt of a decode run eagerly: at thousands of rows launch overhead is small, and
without a cache transformers 5 checks the positions for packed sequences with a host sync
(``masking_utils.find_packed_sequence_indices``), which a graph cannot capture. Peak memory
(``torch.cuda.max_memory_allocated`` during the timed rounds, weights and cache included) is
reported on CUDA only.
"""

from __future__ import annotations

import inspect
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

WARMUP_STEPS = 3  # eager steps before capture: autotuning, cuBLAS workspaces, lazily built caches
SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=256),
}


@dataclass
class Timing:
    kind: str  # "decode" or "prefill"
    batch: int
    tokens: int  # per sequence and round: new tokens (decode) or prompt length (prefill)
    seconds: list[float] = field(default_factory=list)  # one per round
    graphs: bool = False
    peak_bytes: int | None = None
    note: str = ""

    @property
    def tokens_per_s(self) -> float:
        return self.batch * self.tokens / statistics.median(self.seconds)

    def as_dict(self) -> dict:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s}


def build_llama(shape: str = "7b", dtype: torch.dtype = torch.float16, device="cuda", layers: int | None = None,
                seed: int = 0, vocab: int = 32000, max_positions: int = 4096) -> nn.Module:
    """A Llama-2-shaped ``LlamaForCausalLM`` with random weights, created directly in ``dtype`` on
    ``device`` (no float32 copy anywhere: the default dtype is switched while the modules are built).
    Weights come from the device's generator seeded with ``seed``: they only serve timing."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    options = {"vocab_size": vocab, **SHAPES[shape]}
    if layers is not None:
        options["num_hidden_layers"] = layers
    config = LlamaConfig(**options, num_key_value_heads=options["num_attention_heads"],
                         max_position_embeddings=max_positions)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _vocab(model: nn.Module) -> int:
    return model.config.get_text_config().vocab_size


def _random_ids(model: nn.Module, batch: int, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, _vocab(model), (batch, length), generator=g).to(_device_of(model))


def _capture(step, device: torch.device):
    """``step`` recorded as a CUDA graph after WARMUP_STEPS eager runs on a side stream; returns replay."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(WARMUP_STEPS):
            step()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def _runner(step, device: torch.device, graphs) -> tuple[object, bool, str]:
    """(callable, graphed, note). ``graphs``: True (must), False (never) or "auto" (on CUDA, else eager)."""
    if graphs not in (True, False, "auto"):
        raise ValueError(f"graphs must be True, False or 'auto', got {graphs!r}")
    if not graphs or device.type != "cuda":
        if graphs is True:
            raise ValueError(f"CUDA graphs need a CUDA device, the model is on {device}")
        for _ in range(WARMUP_STEPS):  # the same tokens consumed as with graphs
            step()
        return step, False, "" if device.type == "cuda" or not graphs else f"eager: {device} has no CUDA graphs"
    try:
        return _capture(step, device), True, ""
    except Exception as error:  # a host sync in the step, or a kernel that cannot be captured
        if graphs is True:
            raise
        torch.cuda.synchronize(device)
        return step, False, f"eager: CUDA graph capture failed ({type(error).__name__}: {str(error)[:300]})"


class _Decoder:
    """A static cache holding a prompt, and one greedy decode step writing the next token in place."""

    def __init__(self, model: nn.Module, prompt: torch.Tensor, capacity: int):
        from transformers import StaticCache

        self.model = model
        # transformers 5.24 renamed the argument (past_key_values still works there, with a warning)
        name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.cache_argument = {name: StaticCache(config=model.config, max_cache_len=capacity)}
        with torch.no_grad():
            out = model(input_ids=prompt, **self.cache_argument, use_cache=True, logits_to_keep=1)
        self.ids = out.logits[:, -1:].argmax(-1)

    def step(self) -> None:
        with torch.no_grad():
            out = self.model(input_ids=self.ids, **self.cache_argument, use_cache=True)
            self.ids.copy_(out.logits[:, -1:].argmax(-1))


def time_decode(model: nn.Module, batch: int = 1, new_tokens: int = 32, prompt: int = 16, rounds: int = 3,
                graphs="auto", seed: int = 0) -> Timing:
    """Greedy decoding of ``new_tokens`` per round after a ``prompt``-token prefill, batch ``batch``."""
    device = _device_of(model)
    capacity = prompt + WARMUP_STEPS + rounds * new_tokens
    decoder = _Decoder(model, _random_ids(model, batch, prompt, seed), capacity)
    run, graphed, note = _runner(decoder.step, device, graphs)
    return _timed(Timing("decode", batch, new_tokens, graphs=graphed, note=note), run, new_tokens, rounds, device)


def time_prefill(model: nn.Module, batch: int = 1, length: int = 2048, rounds: int = 3, graphs=False,
                 seed: int = 1) -> Timing:
    """One forward pass over ``batch`` x ``length`` prompt tokens without a cache, last token's logits
    (``graphs`` as in ``time_decode``; "auto" falls back to eager, see the module docstring)."""
    device = _device_of(model)
    ids = _random_ids(model, batch, length, seed)

    def step():
        with torch.no_grad():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)

    run, graphed, note = _runner(step, device, graphs)
    return _timed(Timing("prefill", batch, length, graphs=graphed, note=note), run, 1, rounds, device)


def _timed(timing: Timing, run, calls: int, rounds: int, device: torch.device) -> Timing:
    """``rounds`` timings of ``calls`` runs each, and the peak memory on CUDA."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(rounds):
        _sync(device)
        start = time.perf_counter()
        for _ in range(calls):
            run()
        _sync(device)
        timing.seconds.append(time.perf_counter() - start)
    if device.type == "cuda":
        timing.peak_bytes = torch.cuda.max_memory_allocated(device)
    return timing


def greedy_tokens(model: nn.Module, prompt: torch.Tensor, steps: int, graphs="auto") -> tuple[torch.Tensor, bool]:
    """(tokens (batch, steps), graphed): the greedy tokens the timed path picks after its warm-up steps,
    so that a graphed and an eager run can be compared token for token."""
    decoder = _Decoder(model, prompt, prompt.shape[1] + WARMUP_STEPS + steps)
    run, graphed, _ = _runner(decoder.step, _device_of(model), graphs)
    tokens = []
    for _ in range(steps):
        run()
        tokens.append(decoder.ids.clone())
    return torch.cat(tokens, dim=1), graphed
