"""A text corpus every machine has: the source of Python's own standard library.

The top-level modules of the running interpreter's standard library
(``sysconfig.get_paths()["stdlib"]/*.py``, about 4.7 MB on CPython 3.11), split
by file into a training part and a held-out part (about 10% of the files, chosen
by a hash of the file name, so the split does not depend on which other files
exist). It is real text written by people, needs no download and no data root,
and drives the offline default run: a tiny model is trained on the training
part, calibrated on it and evaluated on the held-out part. The corpus depends on
the Python version, which every run record carries.
"""

from __future__ import annotations

import hashlib
import platform
import sysconfig
from functools import lru_cache
from pathlib import Path

import torch

from fqbench.data.text import (
    Calibration, TextTokens, register_calibration_set, register_eval_set, sample_document_windows, tokenize,
)

SPLITS = ("train", "heldout")
HELDOUT_BUCKETS = 26  # of 256: the first byte of sha256(file name) below this holds the file out (~10%)
EVAL_WINDOWS = 64  # the held-out text is cut to this many windows of eval.seqlen tokens (16 K at 256)


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(split: str) -> list[Path]:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    files = sorted(stdlib_dir().glob("*.py"))
    if not files:
        raise FileNotFoundError(f"no *.py files in the standard library folder {stdlib_dir()}; "
                                "this Python installation ships without its sources")
    heldout = [hashlib.sha256(f.name.encode()).digest()[0] < HELDOUT_BUCKETS for f in files]
    return [f for f, held in zip(files, heldout) if held == (split == "heldout")]


def file_texts(split: str) -> list[str]:
    """The files of a split, in file-name order, each preceded by a header line naming it."""
    return [f"# file: {f.name}\n{f.read_text(encoding='utf-8', errors='replace')}\n" for f in corpus_files(split)]


@lru_cache(maxsize=2)
def corpus_text(split: str) -> str:
    return "".join(file_texts(split))


def corpus_digest() -> str:
    """sha256 of the whole corpus (both splits): which text a model was trained and evaluated on."""
    digest = hashlib.sha256()
    for split in SPLITS:
        digest.update(corpus_text(split).encode())
    return digest.hexdigest()


def source(split: str) -> str:
    return f"python-stdlib:{stdlib_dir()}:{split} (Python {platform.python_version()}, {len(corpus_files(split))} files)"


@register_eval_set("pystdlib")
def pystdlib_eval(data, tokenizer, seqlen: int) -> TextTokens:
    """The held-out files tokenized one by one in order and concatenated, cut to ``EVAL_WINDOWS`` windows."""
    wanted, pieces, count = EVAL_WINDOWS * seqlen, [], 0
    for text in file_texts("heldout"):
        pieces.append(tokenize(tokenizer, text))
        count += pieces[-1].numel()
        if count >= wanted:
            break
    return TextTokens(torch.cat(pieces)[:wanted], source("heldout"))


@register_calibration_set("pystdlib")
def pystdlib_calibration(data, tokenizer, *, nsamples, seqlen, seed) -> Calibration:
    """GPTQ's C4 protocol with the training files as documents: a random window of a random long-enough file."""
    windows = sample_document_windows(file_texts("train"), tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed)
    return Calibration(windows, source("train"))
