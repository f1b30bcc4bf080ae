"""Perplexity per the GPTQ protocol, computed block by block.

The evaluation text is cut into non-overlapping windows of ``seqlen`` tokens (the
tail is dropped); ``ppl = exp(mean over windows of the mean next-token NLL)``.
The model runs one block at a time on the accelerator with the engine's
primitives (capture the inputs of block 0, ``run_block`` per block, then the
head), so evaluating a model never needs more than one block on the device.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fqbench.engine import capture_block_inputs, run_block
from fqbench.finite import all_finite
from fqbench.models.hf import CausalLMAdapter


@dataclass
class Perplexity:
    ppl: float
    seqlen: int
    windows: int
    tokens: int  # tokens in the windows (the tail beyond the last full window is dropped)
    first_nonfinite: str | None = None  # the first module whose output had a NaN/Inf, if any

    def to_dict(self) -> dict:
        return asdict(self)


def split_windows(ids: torch.Tensor, seqlen: int) -> torch.Tensor:
    """``(windows, seqlen)``: non-overlapping windows, tail dropped."""
    ids = ids.reshape(-1)
    count = ids.numel() // seqlen
    if count == 0:
        raise ValueError(f"the evaluation text has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}")
    return ids[: count * seqlen].view(count, seqlen)


def perplexity(model, adapter: CausalLMAdapter, ids: torch.Tensor, *, seqlen: int, device,
               progress: bool = False, desc: str = "perplexity") -> Perplexity:
    windows = split_windows(ids, seqlen)
    blocks = adapter.blocks(model)
    inputs = capture_block_inputs(model, blocks, windows.split(1),
                                  lambda m, w: m(input_ids=w.to(device), use_cache=False), device)
    first_nonfinite = None if all(all_finite(args[0]) for args in inputs.args) else f"the inputs of {blocks[0].name}"
    for block in tqdm(blocks, desc=desc, unit="block", disable=not progress):
        home = next(block.module.parameters()).device
        block.module.to(device)
        hidden = run_block(block.module, inputs)
        if first_nonfinite is None and not all(all_finite(h) for h in hidden):
            first_nonfinite = block.name
        inputs = inputs.replace_hidden(hidden)
        block.module.to(home)

    head = adapter.head_modules(model)
    homes = [getattr(next(m.parameters(), None), "device", None) for m in head]
    for module in head:
        module.to(device)
    nll = torch.zeros((), dtype=torch.float64)
    try:
        with torch.no_grad():
            for (hidden, *_), window in zip(inputs.args, windows):
                logits = adapter.apply_head(model, hidden)[0].float()
                if first_nonfinite is None and not all_finite(logits):
                    first_nonfinite = _first_nonfinite_module(model, head, hidden)
                nll += F.cross_entropy(logits[:-1], window[1:].to(logits.device)).double().cpu()
    finally:
        for module, home in zip(head, homes):
            if home is not None:
                module.to(home)
    return Perplexity(math.exp(nll.item() / len(windows)), seqlen, len(windows), windows.numel(), first_nonfinite)


def _first_nonfinite_module(model, head, hidden: torch.Tensor) -> str:
    """The name of the first head module (final norm, projection, LM head) whose output has a NaN/Inf."""
    names = {id(module): name for name, module in model.named_modules()}
    for module in head:
        hidden = module(hidden)
        if not all_finite(hidden):
            return names.get(id(module), type(module).__name__)
    return "the head"
