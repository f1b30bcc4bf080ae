"""The offline default model: a tiny Llama trained once on Python's standard library, then cached.

``build(...)`` returns a Hugging Face model directory (``LlamaForCausalLM`` and a
byte-level tokenizer: token id = byte value, plus ``<s>``/``</s>``), training it
first when the cache does not have it. The directory name carries the Python
version and a digest of the recipe and of the corpus, so a different corpus or
recipe never reuses a stale model. Training writes into a temporary folder that
is renamed into place when complete, under a file lock, so concurrent jobs train
once and never see half a model. The cache is ``$FQBENCH_CACHE`` or
``~/.cache/fqbench``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fqbench.data import pystdlib

log = logging.getLogger("fqbench")

BOS, EOS = "<s>", "</s>"


@dataclass(frozen=True)
class Recipe:
    """Model size and training schedule; the values live in conf/model/pystdlib_llama.yaml (``model.build``)."""

    hidden_size: int
    intermediate_size: int
    layers: int
    heads: int
    seqlen: int
    batch_size: int
    steps: int
    lr: float
    warmup: int
    final_lr: float  # the learning rate at the end of the cosine decay, as a fraction of lr
    weight_decay: float
    seed: int


def cache_root(cache: str | None = None) -> Path:
    return Path(cache or os.environ.get("FQBENCH_CACHE") or "~/.cache/fqbench").expanduser()


def checkpoint_name(recipe: Recipe) -> str:
    digest = hashlib.sha256(json.dumps({"recipe": asdict(recipe), "corpus": pystdlib.corpus_digest()},
                                       sort_keys=True).encode()).hexdigest()[:12]
    python = ".".join(platform.python_version_tuple()[:2])
    return f"pystdlib-llama-py{python}-{digest}"


def build(cache: str | None = None, **options) -> str:
    """The checkpoint directory for this recipe, trained and cached on first use."""
    recipe = Recipe(**options)
    root = cache_root(cache)
    root.mkdir(parents=True, exist_ok=True)
    target = root / checkpoint_name(recipe)
    with open(root / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent job waits here, then finds the finished model
        if not (target / "fqbench_recipe.json").is_file():
            with tempfile.TemporaryDirectory(dir=root, prefix=f".{target.name}.") as tmp:
                train(recipe, Path(tmp) / "model")
                shutil.rmtree(target, ignore_errors=True)
                os.replace(Path(tmp) / "model", target)
    return str(target)


def byte_tokenizer():
    """A Hugging Face fast tokenizer whose ids are the UTF-8 bytes of the text (256 ids) plus BOS and EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: byte for byte, char in _byte_chars().items()}
    vocab[BOS], vocab[EOS] = 256, 257
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS,
                                   model_max_length=1 << 30)


def _byte_chars() -> dict[int, str]:
    """The byte-level BPE alphabet: printable bytes stand for themselves, the others for 256 + n."""
    printable = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    chars, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + shifted)
            shifted += 1
    return chars


def byte_ids(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


def train(recipe: Recipe, out_dir: Path) -> dict:
    """Train the model on the corpus's training split and save it (with its tokenizer) to ``out_dir``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_tokenizer()
    text = pystdlib.corpus_text("train")
    ids = byte_ids(text)
    sample = text[:4096]
    if tokenizer(sample, verbose=False).input_ids != byte_ids(sample).tolist():
        raise AssertionError("the byte tokenizer does not map text to its UTF-8 bytes")
    heldout = byte_ids(pystdlib.corpus_text("heldout"))

    torch.manual_seed(recipe.seed)
    config = LlamaConfig(
        vocab_size=258, hidden_size=recipe.hidden_size, intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.layers, num_attention_heads=recipe.heads, num_key_value_heads=recipe.heads,
        max_position_embeddings=2 * recipe.seqlen, bos_token_id=256, eos_token_id=257, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay,
                                  betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(recipe.seed)
    log.info("training the offline default model (%d parameters) on %s for %d steps of %d x %d bytes; "
             "cached for later runs", sum(p.numel() for p in model.parameters()), pystdlib.source("train"),
             recipe.steps, recipe.batch_size, recipe.seqlen)
    start = time.perf_counter()
    model.train()
    for step in range(recipe.steps):
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(recipe, step)
        starts = torch.randint(0, ids.numel() - recipe.seqlen, (recipe.batch_size,), generator=generator)
        batch = torch.stack([ids[s:s + recipe.seqlen] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 25 == 0 or step == recipe.steps - 1:
            log.info("step %d/%d: training loss %.3f nats/byte (%.0f s)", step + 1, recipe.steps, loss.item(),
                     time.perf_counter() - start)
    model.eval()
    info = {"recipe": asdict(recipe), "corpus_sha256": pystdlib.corpus_digest(), "python": platform.python_version(),
            "train_source": pystdlib.source("train"), "final_train_loss": loss.item(),
            "heldout_loss": _heldout_loss(model, heldout, recipe.seqlen), "train_seconds": time.perf_counter() - start,
            "torch": torch.__version__}
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "fqbench_recipe.json").write_text(json.dumps(info, indent=1))
    log.info("trained in %.0f s: held-out loss %.3f nats/byte; saved %s", info["train_seconds"], info["heldout_loss"],
             out_dir)
    return info


def _learning_rate(recipe: Recipe, step: int) -> float:
    warm = min(1.0, (step + 1) / recipe.warmup)
    decay = 0.5 * (1 + math.cos(math.pi * step / recipe.steps))
    return recipe.lr * warm * (recipe.final_lr + (1 - recipe.final_lr) * decay)


def _heldout_loss(model, ids: torch.Tensor, seqlen: int, windows: int = 32) -> float:
    count = min(windows, ids.numel() // seqlen)
    batch = ids[: count * seqlen].view(count, seqlen)
    with torch.no_grad():
        return model(input_ids=batch, labels=batch).loss.item()
