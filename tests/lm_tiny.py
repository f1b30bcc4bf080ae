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
    from fqbench.config import compose as compose_config

    return compose_config(overrides)


def convert_stories(data_root: Path, out: Path) -> Path:
    """The real pretrained llama2.c stories260K, converted to a Hugging Face directory."""
    from fqbench.tools.llama2c import convert

    return convert(data_root / "llama2c" / "stories260K.bin", data_root / "llama2c" / "tok512.model", out)


STORY_ITEMS = [  # (context, choices, index of the continuation a TinyStories model should prefer)
    ("Once upon a", ["time", "table"], 0),
    ("Once upon a time, there was a little girl named", ["because", "Lily"], 1),
    ("She loved to play outside in the", ["park", "ran"], 0),
    ("Lily was very", ["the", "happy"], 1),
    ("One day, a little boy went to the", ["and", "park"], 1),
    ("The dog wagged its", ["tail", "she"], 0),
    ("They played together all", ["day", "was"], 0),
    ("Tom said to his mom, \"Can I have a", ["to", "cookie"], 1),
]

TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_target: label
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def write_story_task(folder: Path, name: str = "stories_choice") -> Path:
    """An lm-eval task YAML over a local JSON-lines file: runs offline."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"context": c, "choices": ch, "label": y}) + "\n" for c, ch, y in STORY_ITEMS))
    (folder / f"{name}.yaml").write_text(TASK_YAML.format(name=name, data=data))
    return folder
