"""Tiny OPT and Llama checkpoints, a word-level tokenizer and a text data root, for the language-model tests.

Models are built from configs (random init), saved with ``save_pretrained`` and
loaded back through the real loading code (``fqbench.models.hf.load_causal_lm``).
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

WORDS = ("the a one little big red blue cat dog girl boy bird ball tree park house sun day time mom dad "
         "sat ran saw went played found wanted said liked was is on in to with and but then so very happy sad "
         "once upon there . , !").split()
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")


def tiny_config(kind: str, vocab_size: int):
    from transformers import LlamaConfig, OPTConfig

    if kind == "opt":
        # word_embed_proj_dim != hidden_size: OPT-350m's project_in/project_out path
        return OPTConfig(vocab_size=vocab_size, hidden_size=32, word_embed_proj_dim=16, num_hidden_layers=2,
                         ffn_dim=64, num_attention_heads=4, max_position_embeddings=128, init_std=0.1,
                         pad_token_id=3, bos_token_id=1, eos_token_id=2)
    if kind == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                           initializer_range=0.1, pad_token_id=3, bos_token_id=1, eos_token_id=2)
    raise ValueError(kind)


def save_tiny_model(kind: str, directory: Path, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, len(tokenizer)))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return Path(directory)


def sentences(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    content = [w for w in WORDS if w not in (".", ",", "!")]
    return [" ".join(rng.choice(content) for _ in range(rng.randint(4, 14))) + " ." for _ in range(count)]


def write_data_root(root: Path, seed: int = 0) -> Path:
    """A data root with the shared-data layout, filled with synthetic text."""
    root = Path(root)
    (root / "wikitext-2-raw").mkdir(parents=True)
    (root / "ptb").mkdir()
    (root / "c4").mkdir()
    wiki = [" = title = \n", " \n"] + [f" {s} \n" for s in sentences(300, seed)]
    (root / "wikitext-2-raw" / "wiki.test.raw").write_text("".join(wiki))
    (root / "ptb" / "ptb.test.txt").write_text("".join(f" {s}\n" for s in sentences(200, seed + 1)))
    (root / "ptb" / "ptb.train.txt").write_text("".join(f" {s}\n" for s in sentences(400, seed + 2)))
    documents = [" ".join(sentences(random.Random(seed + i).randint(1, 12), seed + 100 + i)) for i in range(60)]
    with gzip.open(root / "c4" / "c4-train.00000-of-01024.json.gz", "wt") as f:
        f.writelines(json.dumps({"text": d, "url": "u"}) + "\n" for d in documents)
    with open(root / "c4" / "c4-validation.00000-of-00008.json", "w") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in documents[::-1])
    return root


def compose(overrides: list[str]):
    """The app's config, composed from conf/ with overrides (as the CLI would)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)
