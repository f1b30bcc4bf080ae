"""The evidence model: a small OPT trained on PTB train with the GPT-2 tokenizer, cached.

    python -m fqbench.tools.train_lm --data-root ../shared/data      # prints the model directory
    python -m fqbench model=hf_causal_lm model.path=<that directory> ...

No pretrained OPT or Llama-2 checkpoint is reachable offline, so the language-model
evidence runs on a model trained here, on real text: Penn Treebank's training
split (joined with spaces, as the PTB evaluation protocol joins the test split),
tokenized with GPT-2's byte-level BPE (OPT's tokenizer). The result is a
standard ``OPTForCausalLM`` directory with its tokenizer.

Training cost is dominated by the output softmax over 50,272 tokens, of which PTB
uses about 9,600. The embedding rows of tokens that never occur in the training
text are held at exactly zero, so their logits are exactly 0 and the full softmax
needs only the used rows plus a constant term ``log(#unused)``: the loss trained
is the full-vocabulary loss of the saved model (checked after training), at a
fifth of the cost.

The directory name carries a digest of the recipe and of the training files;
training writes into a temporary folder renamed into place when complete, under
a file lock. The cache is ``$FQBENCH_CACHE`` or ``~/.cache/fqbench``.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from fqbench.data.text import DataFiles, ptb_text, tokenize

log = logging.getLogger("fqbench")

GPT2_FILES = ("vocab.json", "merges.txt")
VOCAB_SIZE = 50272  # GPT-2's 50,257 tokens padded to a multiple of 16, as OPT does
END_OF_TEXT = 50256  # GPT-2's <|endoftext|>: BOS, EOS
PAD = 50257  # a padding row no text uses (OPT's embedding freezes its pad row)


@dataclass(frozen=True)
class Recipe:
    hidden_size: int = 128
    ffn_dim: int = 512
    layers: int = 4
    heads: int = 4
    seqlen: int = 256
    batch_size: int = 8
    steps: int = 600
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.1
    seed: int = 0


def cache_root(cache: str | os.PathLike | None = None) -> Path:
    return Path(cache or os.environ.get("FQBENCH_CACHE") or "~/.cache/fqbench").expanduser()


def _file_digest(paths) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


def build(data_root: str | os.PathLike, *, tokenizer_dir: str | os.PathLike | None = None,
          cache: str | os.PathLike | None = None, recipe: Recipe = Recipe()) -> Path:
    """The model directory for this recipe and data, trained and cached on first use."""
    data = DataFiles(Path(data_root), hub=False)
    train_file = data.find("ptb_train")
    tokenizer_dir = Path(tokenizer_dir or Path(data_root) / "gpt2-tokenizer")
    missing = [str(p) for p in [tokenizer_dir / f for f in GPT2_FILES] if not p.is_file()]
    if train_file is None or missing:
        raise FileNotFoundError(f"training the evidence model needs {data.places('ptb_train')[0]} and the GPT-2 "
                                f"tokenizer files; missing: {missing or data.places('ptb_train')}")
    sources = [train_file, *(tokenizer_dir / f for f in GPT2_FILES)]
    digest = hashlib.sha256(json.dumps({"recipe": asdict(recipe), "data": _file_digest(sources)},
                                       sort_keys=True).encode()).hexdigest()[:12]
    root = cache_root(cache)
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"ptb-opt-{digest}"
    with open(root / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent build waits here, then finds the finished model
        if not (target / "fqbench_recipe.json").is_file():
            with tempfile.TemporaryDirectory(dir=root, prefix=f".{target.name}.") as tmp:
                train(recipe, data, tokenizer_dir, Path(tmp) / "model")
                shutil.rmtree(target, ignore_errors=True)
                os.replace(Path(tmp) / "model", target)
    return target


def gpt2_tokenizer(directory: Path, max_length: int):
    """GPT-2's BPE with ``<|endoftext|>`` as BOS (prepended, as OPT's tokenizer prepends ``</s>``), EOS and pad."""
    from transformers import GPT2Tokenizer

    tokenizer = GPT2Tokenizer.from_pretrained(directory, add_bos_token=True, model_max_length=max_length)
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _learning_rate(recipe: Recipe, step: int) -> float:
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    progress = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    return recipe.lr * 0.5 * (1 + math.cos(math.pi * progress))


def used_vocabulary_loss(model, batch: torch.Tensor, used: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """Next-token loss over the full vocabulary when every unused embedding row is zero (logit exactly 0)."""
    hidden = model.model.decoder(input_ids=batch, use_cache=False).last_hidden_state[:, :-1]
    logits = hidden @ model.lm_head.weight[used].T
    unused = torch.tensor(math.log(VOCAB_SIZE - used.numel()), dtype=logits.dtype)
    normalizer = torch.logaddexp(torch.logsumexp(logits, dim=-1), unused)
    target = logits.gather(-1, position[batch[:, 1:]].unsqueeze(-1)).squeeze(-1)
    return (normalizer - target).mean()


def train(recipe: Recipe, data: DataFiles, tokenizer_dir: Path, out_dir: Path) -> dict:
    from transformers import OPTConfig, OPTForCausalLM

    tokenizer = gpt2_tokenizer(tokenizer_dir, recipe.seqlen)
    text, source = ptb_text(data, "train")
    ids = tokenize(tokenizer, text)
    used = torch.unique(torch.cat([ids, torch.tensor([END_OF_TEXT])]))
    position = torch.full((VOCAB_SIZE,), -1, dtype=torch.long)
    position[used] = torch.arange(used.numel())

    torch.manual_seed(recipe.seed)
    config = OPTConfig(
        vocab_size=VOCAB_SIZE, hidden_size=recipe.hidden_size, word_embed_proj_dim=recipe.hidden_size,
        ffn_dim=recipe.ffn_dim, num_hidden_layers=recipe.layers, num_attention_heads=recipe.heads,
        max_position_embeddings=recipe.seqlen, do_layer_norm_before=True, dropout=0.0, attention_dropout=0.0,
        activation_function="relu", pad_token_id=PAD, bos_token_id=END_OF_TEXT, eos_token_id=END_OF_TEXT,
        tie_word_embeddings=True,
    )
    model = OPTForCausalLM(config)
    unused_rows = torch.ones(VOCAB_SIZE, dtype=torch.bool)
    unused_rows[used] = False
    with torch.no_grad():
        model.model.decoder.embed_tokens.weight[unused_rows] = 0
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay,
                                  betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(recipe.seed)
    # Windows start with BOS, as every evaluation text does.
    body = recipe.seqlen - 1
    log.info("training the evidence OPT (%d parameters) on %s (%d GPT-2 tokens, %d distinct) for %d steps of %d x %d",
             sum(p.numel() for p in model.parameters()), source, ids.numel(), used.numel(), recipe.steps,
             recipe.batch_size, recipe.seqlen)
    start = time.perf_counter()
    model.train()
    for step in range(recipe.steps):
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(recipe, step)
        starts = torch.randint(1, ids.numel() - body, (recipe.batch_size,), generator=generator).tolist()
        batch = torch.stack([torch.cat([torch.tensor([END_OF_TEXT]), ids[s:s + body]]) for s in starts])
        loss = used_vocabulary_loss(model, batch, used, position)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == recipe.steps - 1:
            log.info("step %d/%d: loss %.3f (%.0f s)", step + 1, recipe.steps, loss.item(), time.perf_counter() - start)
    model.eval()
    if model.model.decoder.embed_tokens.weight[unused_rows].abs().max() != 0:
        raise AssertionError("unused embedding rows moved during training; the loss was not the model's loss")
    with torch.no_grad():  # the saved model's own full-vocabulary loss equals the loss trained
        check = batch[:2]
        full = model(input_ids=check, labels=check).loss.item()
        trained = used_vocabulary_loss(model, check, used, position).item()
    if not math.isclose(full, trained, rel_tol=1e-4):
        raise AssertionError(f"full-vocabulary loss {full} != trained loss {trained}")
    summary = {"recipe": asdict(recipe), "train_file": source, "train_tokens": ids.numel(),
               "used_tokens": used.numel(), "final_loss": loss.item(), "seconds": time.perf_counter() - start}
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "fqbench_recipe.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fqbench.tools.train_lm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default=os.environ.get("FQBENCH_DATA"),
                        help="folder with ptb/ptb.train.txt and gpt2-tokenizer/ (default: $FQBENCH_DATA)")
    parser.add_argument("--tokenizer", default=None, help="folder with vocab.json and merges.txt "
                                                          "(default: <data-root>/gpt2-tokenizer)")
    parser.add_argument("--cache", default=None, help="cache folder (default: $FQBENCH_CACHE or ~/.cache/fqbench)")
    for field in fields(Recipe):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default)
    args = parser.parse_args(argv)
    if not args.data_root:
        parser.error("--data-root (or FQBENCH_DATA) is required")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    recipe = Recipe(**{f.name: getattr(args, f.name) for f in fields(Recipe)})
    print(build(args.data_root, tokenizer_dir=args.tokenizer, cache=args.cache, recipe=recipe))


if __name__ == "__main__":
    main()
