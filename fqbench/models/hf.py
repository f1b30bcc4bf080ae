"""Hugging Face causal language models as data.

An adapter says where the decoder blocks are, in which groups their linears are
quantized (true-sequential order), and which modules run after the blocks (final
norm, OPT's ``project_out``, the LM head), so that both quantization and
evaluation can run block by block and a 70B model never sits on the accelerator
whole. Adapters are selected by ``config.model_type``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fqbench.models.adapter import Block, Layout

_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


@dataclass(frozen=True)
class CausalLMAdapter:
    """A ``ModelAdapter`` (``fqbench.models.adapter``) for decoder-only causal LMs."""

    name: str
    layout: Layout
    head: tuple[str, ...]  # modules applied in order after the last block; absent (None) ones are skipped
    full_precision: tuple[str, ...] = ("embeddings", "lm_head")

    def blocks(self, model: nn.Module) -> list[Block]:
        return self.layout.find_blocks(model)

    def run(self, model: nn.Module, ids: torch.Tensor, device):
        return model(input_ids=ids.to(device), use_cache=False)

    def block_kwargs(self, index: int, kwargs: dict) -> dict:
        return kwargs

    def head_modules(self, model: nn.Module) -> list[nn.Module]:
        modules = []
        for path in self.head:
            module = model
            for part in path.split("."):
                module = getattr(module, part, None)
            if module is not None:
                modules.append(module)
        if not modules:
            raise ValueError(f"{self.name} adapter: none of the head modules {self.head} exist in this model")
        return modules

    def apply_head(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from the output of the last block."""
        for module in self.head_modules(model):
            hidden = module(hidden)
        return hidden


# OPT: GPTQ's true-sequential order; with engine.true_sequential=false all six
# linears come from one forward pass (GPTQ's original OPT protocol).
OPT = CausalLMAdapter(
    "opt",
    Layout("model.decoder.layers", (_ATTN, ("self_attn.out_proj",), ("fc1",), ("fc2",))),
    head=("model.decoder.final_layer_norm", "model.decoder.project_out", "lm_head"),
)

# Llama 2/3, Mistral, Qwen2/3 and every other LlamaForCausalLM-like decoder.
LLAMA = CausalLMAdapter(
    "llama",
    Layout("model.layers", (_ATTN, ("self_attn.o_proj",), ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))),
    head=("model.norm", "lm_head"),
)

ADAPTERS: dict[str, CausalLMAdapter] = {
    "opt": OPT,
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "qwen3": LLAMA,
}


def adapter_for(config) -> CausalLMAdapter:
    """The adapter for a Hugging Face config, or an error listing the supported model types."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(ADAPTERS))} "
                         "(add a CausalLMAdapter to fqbench.models.hf.ADAPTERS for another architecture)")
    layer_types = set(getattr(config, "layer_types", None) or ())
    if len(layer_types) > 1:
        # Block inputs are captured once, at block 0, and replayed for every block:
        # layers with different attention masks cannot share them.
        raise ValueError(f"{model_type}: layers mix attention types {sorted(layer_types)}; block-by-block "
                         "replay needs one attention mask for all layers (disable sliding-window layers)")
    return ADAPTERS[model_type]


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(name: str, device: torch.device):
    """``auto``: float16 on an accelerator, float32 on the CPU; ``checkpoint``: the checkpoint's own dtype."""
    if name == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if name == "checkpoint":
        return "auto"  # transformers' spelling of "as stored"
    if name not in DTYPES:
        raise ValueError(f"unknown model dtype {name!r}; use auto, checkpoint, {', '.join(DTYPES)}")
    return DTYPES[name]


def load_causal_lm(source: str, *, dtype: str = "auto", device="cpu"):
    """``(model, tokenizer, adapter)`` for a hub name or a local directory; the model stays on the CPU.

    The engine moves one block at a time to ``device``; ``use_cache`` is off (calibration
    and perplexity never decode incrementally).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    adapter = adapter_for(AutoConfig.from_pretrained(source))
    model = AutoModelForCausalLM.from_pretrained(source, dtype=resolve_dtype(dtype, device))
    model.config.use_cache = False
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    return model, tokenizer, adapter


def max_positions(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)
