"""Text data for language models, local files first (GPTQ protocol, DESIGN.md section 4).

Files are looked up under a data root with the layout of the shared data folder
(``wikitext-2-raw/wiki.test.raw``, ``ptb/ptb.test.txt``, ``c4/<shard>``); every
file name is a config key (``data.<key>``) and may be a glob, an absolute path,
or a path relative to the root. Only when no local file is found do loaders fall
back to the Hugging Face hub, and only when asked: ``data.hub=true``, or
``data.hub=auto`` (the default) with no ``data.root`` (with a local data root, a
missing file is reported at once instead of after the hub's retries).

Evaluation sets and calibration sets are registries (name -> loader), so that a
new dataset is one decorated function.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import random
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

# Default file names under the data root: the original names, as in the shared data folder.
DEFAULT_FILES = {
    "wikitext2_test": "wikitext-2-raw/wiki.test.raw",
    "wikitext2_train": "wikitext-2-raw/wiki.train.raw",
    "ptb_test": "ptb/ptb.test.txt",
    "ptb_train": "ptb/ptb.train.txt",
    "c4_train": "c4/c4-train.00000-of-01024*.json*",
    "c4_eval": "c4/c4-validation.00000-of-00008*.json*",
}

C4_EVAL_DOCUMENTS = 1100  # GPTQ's C4 "new eval": the first 1100 validation documents...
C4_EVAL_WINDOWS = 256  # ...truncated to 256 windows of seqlen tokens


@dataclass(frozen=True)
class DataFiles:
    """Where the text files are: a root folder, a file name per key, and whether the hub may be tried."""

    root: Path | None = None
    files: dict = field(default_factory=lambda: dict(DEFAULT_FILES))
    hub: bool = True

    @classmethod
    def from_config(cls, data) -> "DataFiles":
        """From the ``data`` config group (``root``, ``hub`` and any of the ``DEFAULT_FILES`` keys)."""
        get = data.get if hasattr(data, "get") else lambda k, d=None: getattr(data, k, d)
        root = get("root", None)
        files = {key: get(key, None) or default for key, default in DEFAULT_FILES.items()}
        hub = get("hub", "auto")
        if hub not in (True, False, "auto"):
            raise ValueError(f"data.hub={hub!r} is invalid; use true, false or auto (the hub only without data.root)")
        return cls(Path(root).expanduser() if root else None, files, not root if hub == "auto" else hub)

    def places(self, key: str) -> list[str]:
        """The paths (or glob patterns) searched for ``key``, in order."""
        name = os.path.expanduser(str(self.files[key]))
        if os.path.isabs(name) or self.root is None:
            return [name]
        return [str(self.root / name)]

    def find(self, key: str) -> Path | None:
        for place in self.places(key):
            if glob.has_magic(place):
                matches = sorted(p for p in glob.glob(place) if os.path.isfile(p))
                if matches:
                    return Path(matches[0])
            elif os.path.isfile(place):
                return Path(place)
        return None


@dataclass
class TextTokens:
    """A tokenized evaluation text and where it came from."""

    ids: torch.Tensor  # (tokens,) int64
    source: str


def load_local_or_hub(data: DataFiles, key: str, read_local: Callable[[Path], object],
                      read_hub: Callable[[], object] | None):
    """``(content, source)`` from the local file for ``key``, else from the hub, else a clear error."""
    path = data.find(key)
    if path is not None:
        return read_local(path), str(path)
    reason = ("the hub fallback is off (data.hub=false, or data.hub=auto with data.root set; data.hub=true "
              "tries the Hugging Face hub)")
    if data.hub and read_hub is not None:
        try:
            return read_hub()
        except Exception as error:  # no network, gated dataset, renamed repository...
            reason = f"the Hugging Face hub fallback failed too ({type(error).__name__}: {error})"
    root_hint = "data.root is not set (set data.root=DIR or FQBENCH_DATA); " if data.root is None else ""
    raise FileNotFoundError(
        f"{key} file {data.files[key]!r} not found; looked for: {', '.join(data.places(key))}; {root_hint}{reason}. "
        f"Point data.root at a folder with the shared-data layout or set data.{key}=PATH.")


def _hub_column(path: str, name: str | None, split: str, column: str, **kwargs) -> Callable[[], tuple[list[str], str]]:
    def read():
        from datasets import load_dataset

        rows = list(load_dataset(path, name, split=split, **kwargs)[column])
        return rows, f"hub:{path}" + (f"/{name}" if name else "") + f":{split}"

    return read


# --- raw texts, exactly as GPTQ gets them from the hub ----------------------------------------


def read_wikitext_rows(path: Path) -> list[str]:
    """The rows of the Hugging Face ``wikitext`` dataset: each line, blank lines as ``""``."""
    with open(path, encoding="utf-8") as f:
        return [line if line.strip() else "" for line in f]


def read_ptb_sentences(path: Path) -> list[str]:
    """The ``sentence`` column of ``ptb_text_only``: every line of ptb.*.txt, stripped."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f]


def iter_json_documents(path: Path) -> Iterator[str]:
    """The ``text`` of each document of a C4 shard (JSON lines, optionally gzipped)."""
    raw = gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")
    with io.TextIOWrapper(raw, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError) as error:
                    raise ValueError(f"{path}:{number}: not a JSON line with a 'text' field ({error})") from None


def _c4_hub(split: str, shard: str):
    return _hub_column("allenai/c4", None, split, "text", data_files={split: shard})


def wikitext2_text(data: DataFiles, split: str = "test") -> tuple[str, str]:
    rows, source = load_local_or_hub(data, f"wikitext2_{split}", read_wikitext_rows,
                                     _hub_column("Salesforce/wikitext", "wikitext-2-raw-v1", split, "text"))
    return "\n\n".join(rows), source


def ptb_text(data: DataFiles, split: str = "test") -> tuple[str, str]:
    sentences, source = load_local_or_hub(data, f"ptb_{split}", read_ptb_sentences,
                                          _hub_column("ptb-text-only/ptb_text_only", "penn_treebank", split, "sentence"))
    return " ".join(sentences), source


def c4_documents(data: DataFiles, split: str, limit: int | None = None) -> tuple[list[str], str]:
    key, shard = {"train": ("c4_train", "en/c4-train.00000-of-01024.json.gz"),
                  "validation": ("c4_eval", "en/c4-validation.00000-of-00008.json.gz")}[split]
    docs, source = load_local_or_hub(data, key, lambda p: list(islice(iter_json_documents(p), limit)), _c4_hub(split, shard))
    return list(docs[:limit] if limit is not None else docs), source


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """One long text tokenized once, as the protocol does (with the tokenizer's own BOS, if any)."""
    return tokenizer(text, return_tensors="pt", verbose=False).input_ids[0]


# --- evaluation sets -------------------------------------------------------------------------

EVAL_SETS: dict[str, Callable[[DataFiles, object, int], TextTokens]] = {}


def register_eval_set(name: str):
    """Register ``loader(data: DataFiles, tokenizer, seqlen) -> TextTokens`` under ``name``."""

    def decorate(loader):
        if name in EVAL_SETS:
            raise ValueError(f"evaluation set {name!r} is registered twice")
        EVAL_SETS[name] = loader
        return loader

    return decorate


def eval_tokens(name: str, data: DataFiles, tokenizer, seqlen: int) -> TextTokens:
    if name not in EVAL_SETS:
        raise ValueError(f"unknown evaluation set {name!r}; known: {', '.join(sorted(EVAL_SETS))}")
    return EVAL_SETS[name](data, tokenizer, seqlen)


@register_eval_set("wikitext2")
def wikitext2_eval(data: DataFiles, tokenizer, seqlen: int) -> TextTokens:
    text, source = wikitext2_text(data, "test")
    return TextTokens(tokenize(tokenizer, text), source)


@register_eval_set("ptb")
def ptb_eval(data: DataFiles, tokenizer, seqlen: int) -> TextTokens:
    text, source = ptb_text(data, "test")
    return TextTokens(tokenize(tokenizer, text), source)


@register_eval_set("c4")
def c4_eval(data: DataFiles, tokenizer, seqlen: int) -> TextTokens:
    docs, source = c4_documents(data, "validation", limit=C4_EVAL_DOCUMENTS)
    return TextTokens(tokenize(tokenizer, " ".join(docs))[: C4_EVAL_WINDOWS * seqlen], source)


# --- calibration sets ------------------------------------------------------------------------


def sample_document_windows(documents: Sequence[str], tokenizer, *, nsamples: int, seqlen: int,
                            seed: int) -> list[torch.Tensor]:
    """GPTQ's C4 calibration: draw documents until one is longer than ``seqlen`` tokens, take a random window.

    The random stream is that of ``random.seed(seed)`` followed by GPTQ's calls, so a
    full shard gives GPTQ's windows; only documents of exactly ``seqlen`` tokens are
    skipped where GPTQ would crash on them.
    """
    rng = random.Random(seed)
    too_short: set[int] = set()
    windows = []
    for _ in range(nsamples):
        while True:
            if len(too_short) == len(documents):
                raise ValueError(f"no calibration document is longer than seqlen={seqlen} tokens "
                                 f"({len(documents)} documents); lower calib.seqlen or use a larger shard")
            index = rng.randint(0, len(documents) - 1)
            ids = tokenizer(documents[index], return_tensors="pt", verbose=False).input_ids
            if ids.shape[1] > seqlen:
                break
            too_short.add(index)
        start = rng.randint(0, ids.shape[1] - seqlen - 1)
        windows.append(ids[:, start:start + seqlen])
    return windows


def sample_text_windows(ids: torch.Tensor, *, nsamples: int, seqlen: int, seed: int) -> list[torch.Tensor]:
    """GPTQ's WikiText-2/PTB calibration: random windows of one long tokenized text."""
    ids = ids.reshape(-1)
    if ids.numel() <= seqlen + 1:
        raise ValueError(f"the calibration text has {ids.numel()} tokens, too few for windows of seqlen={seqlen}")
    rng = random.Random(seed)
    starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(nsamples)]
    return [ids[None, s:s + seqlen] for s in starts]


@dataclass
class Calibration:
    windows: list[torch.Tensor]  # each (1, seqlen)
    source: str

    @property
    def tokens(self) -> int:
        return sum(w.numel() for w in self.windows)


CALIBRATION_SETS: dict[str, Callable[..., Calibration]] = {}


def register_calibration_set(name: str):
    """Register ``loader(data, tokenizer, *, nsamples, seqlen, seed) -> Calibration`` under ``name``."""

    def decorate(loader):
        if name in CALIBRATION_SETS:
            raise ValueError(f"calibration set {name!r} is registered twice")
        CALIBRATION_SETS[name] = loader
        return loader

    return decorate


def calibration_windows(name: str, data: DataFiles, tokenizer, *, nsamples: int, seqlen: int, seed: int) -> Calibration:
    if name not in CALIBRATION_SETS:
        raise ValueError(f"unknown calibration set {name!r}; known: {', '.join(sorted(CALIBRATION_SETS))}")
    return CALIBRATION_SETS[name](data, tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed)


@register_calibration_set("c4")
def c4_calibration(data, tokenizer, *, nsamples, seqlen, seed) -> Calibration:
    docs, source = c4_documents(data, "train")
    return Calibration(sample_document_windows(docs, tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed), source)


@register_calibration_set("wikitext2")
def wikitext2_calibration(data, tokenizer, *, nsamples, seqlen, seed) -> Calibration:
    text, source = wikitext2_text(data, "train")
    return Calibration(sample_text_windows(tokenize(tokenizer, text), nsamples=nsamples, seqlen=seqlen, seed=seed), source)


@register_calibration_set("ptb")
def ptb_calibration(data, tokenizer, *, nsamples, seqlen, seed) -> Calibration:
    text, source = ptb_text(data, "train")
    return Calibration(sample_text_windows(tokenize(tokenizer, text), nsamples=nsamples, seqlen=seqlen, seed=seed), source)
