"""Text data: local-first lookup, GPTQ-protocol calibration windows and evaluation texts."""

import gzip
import json
import random

import pytest
import torch
from lm_tiny import sentences, tiny_tokenizer, write_data_root

from fqbench.data import text
from fqbench.data.text import (DataFiles, TextTokens, c4_documents, calibration_windows, eval_tokens, ptb_text,
                               register_eval_set, sample_document_windows, sample_text_windows, wikitext2_text)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_data_root(tmp_path_factory.mktemp("data"))


def gptq_c4_windows(documents, tokenizer, nsamples, seqlen, seed):
    """GPTQ's loop as written in its datautils (global ``random``), for conformance."""
    random.seed(seed)
    loader = []
    for _ in range(nsamples):
        while True:
            i = random.randint(0, len(documents) - 1)
            enc = tokenizer(documents[i], return_tensors="pt")
            if enc.input_ids.shape[1] >= seqlen:
                break
        i = random.randint(0, enc.input_ids.shape[1] - seqlen - 1)
        loader.append(enc.input_ids[:, i:i + seqlen])
    return loader


def test_c4_windows_follow_the_gptq_protocol(tokenizer):
    seqlen = 48
    documents = [" ".join(sentences(random.Random(i).randint(1, 8), i)) for i in range(200)]
    # GPTQ would crash on a document of exactly seqlen tokens (randint(0, -1)); we skip those.
    documents = [d for d in documents if len(tokenizer(d).input_ids) != seqlen]
    lengths = [len(tokenizer(d).input_ids) for d in documents]
    assert min(lengths) < seqlen < max(lengths)
    windows = sample_document_windows(documents, tokenizer, nsamples=12, seqlen=seqlen, seed=3)
    assert all(w.shape == (1, seqlen) and w.dtype == torch.int64 for w in windows)
    reference = gptq_c4_windows(documents, tokenizer, 12, seqlen, 3)
    assert all(torch.equal(a, b) for a, b in zip(windows, reference))
    # every window is a slice of a document longer than the window
    long_docs = [tokenizer(d, return_tensors="pt").input_ids[0] for d, n in zip(documents, lengths) if n > seqlen]
    for w in windows:
        assert any(w[0].tolist() == d[s:s + seqlen].tolist() for d in long_docs for s in range(len(d) - seqlen))


def test_calibration_is_deterministic_for_a_seed(tokenizer):
    documents = [" ".join(sentences(6, i)) for i in range(50)]
    first = sample_document_windows(documents, tokenizer, nsamples=8, seqlen=16, seed=0)
    again = sample_document_windows(documents, tokenizer, nsamples=8, seqlen=16, seed=0)
    other = sample_document_windows(documents, tokenizer, nsamples=8, seqlen=16, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    state = random.getstate()
    sample_document_windows(documents, tokenizer, nsamples=2, seqlen=16, seed=0)
    assert random.getstate() == state  # a private generator: the global stream is untouched


def test_a_document_of_exactly_seqlen_tokens_is_skipped(tokenizer):
    documents = ["the cat sat .", "a big red dog ran to the park ."]  # 5 and 10 tokens with <s>
    assert len(tokenizer(documents[0]).input_ids) == 5
    long_ids = tokenizer(documents[1]).input_ids
    for w in sample_document_windows(documents, tokenizer, nsamples=4, seqlen=5, seed=0):
        assert any(w[0].tolist() == long_ids[s:s + 5] for s in range(len(long_ids) - 5))


def test_no_document_long_enough_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="no calibration document is longer than seqlen=100"):
        sample_document_windows(["the cat sat .", "a dog ran ."], tokenizer, nsamples=1, seqlen=100, seed=0)


def test_text_windows_are_gptq_wikitext_windows():
    ids = torch.arange(1000)
    windows = sample_text_windows(ids, nsamples=5, seqlen=64, seed=0)
    random.seed(0)
    starts = [random.randint(0, 1000 - 64 - 1) for _ in range(5)]
    assert [w[0, 0].item() for w in windows] == starts and all(w.shape == (1, 64) for w in windows)


def test_local_files_are_read_as_the_hub_datasets_give_them(root):
    data = DataFiles(root)
    wiki, source = wikitext2_text(data)
    lines = (root / "wikitext-2-raw" / "wiki.test.raw").read_text().splitlines(keepends=True)
    assert source == str(root / "wikitext-2-raw" / "wiki.test.raw")
    assert wiki == "\n\n".join(line if line.strip() else "" for line in lines)
    ptb, _ = ptb_text(data)
    assert ptb == " ".join(line.strip() for line in (root / "ptb" / "ptb.test.txt").read_text().splitlines())


def test_c4_shards_in_every_format_read_the_same(root, tmp_path):
    docs, source = c4_documents(DataFiles(root), "train")
    assert source.endswith("c4-train.00000-of-01024.json.gz") and len(docs) == 60
    plain = tmp_path / "shard.jsonl"
    plain.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    packed = tmp_path / "shard.json.gz"
    with gzip.open(packed, "wt") as f:
        f.write(plain.read_text())
    for path in (plain, packed):
        assert c4_documents(DataFiles(files={**text.DEFAULT_FILES, "c4_train": str(path)}), "train")[0] == docs


def test_c4_eval_is_the_first_documents_truncated_to_256_windows(root, tokenizer):
    data = DataFiles(root)
    docs, _ = c4_documents(data, "validation")
    full = tokenizer(" ".join(docs[:1100]), return_tensors="pt").input_ids[0]
    tokens = eval_tokens("c4", data, tokenizer, seqlen=4)
    assert torch.equal(tokens.ids, full[: 256 * 4])
    assert eval_tokens("c4", data, tokenizer, seqlen=1024).ids.numel() == full.numel()


def test_missing_file_names_the_file_and_where_it_looked(tmp_path, tokenizer):
    data = DataFiles(tmp_path, hub=False)
    with pytest.raises(FileNotFoundError) as error:
        eval_tokens("ptb", data, tokenizer, 32)
    message = str(error.value)
    assert "ptb/ptb.test.txt" in message and str(tmp_path / "ptb" / "ptb.test.txt") in message
    assert "data.ptb_test" in message and "data.hub=false" in message
    with pytest.raises(FileNotFoundError, match="data.root is not set"):
        calibration_windows("c4", DataFiles(None, hub=False), tokenizer, nsamples=1, seqlen=8, seed=0)


def test_config_names_files_and_globs(root):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"root": str(root), "hub": False, "ptb_test": "ptb/ptb.train.txt",
                            "c4_eval": "c4/c4-train*.json*"})
    data = DataFiles.from_config(cfg)
    assert data.find("ptb_test") == root / "ptb" / "ptb.train.txt"
    assert data.find("c4_eval") == root / "c4" / "c4-train.00000-of-01024.json.gz"
    assert data.find("wikitext2_test") == root / "wikitext-2-raw" / "wiki.test.raw"  # default name


def test_eval_set_registry_takes_new_datasets(tokenizer, root):
    @register_eval_set("test_only_words")
    def words(data, tok, seqlen):
        return TextTokens(tok("the cat sat on the mat .", return_tensors="pt").input_ids[0], "inline")

    try:
        assert eval_tokens("test_only_words", DataFiles(root), tokenizer, 4).source == "inline"
        with pytest.raises(ValueError, match="registered twice"):
            register_eval_set("test_only_words")(words)
    finally:
        del text.EVAL_SETS["test_only_words"]
    with pytest.raises(ValueError, match="unknown evaluation set 'nope'.*wikitext2"):
        eval_tokens("nope", DataFiles(root), tokenizer, 4)


# --- the real files ---------------------------------------------------------------------------


def test_real_files_have_the_hub_row_counts(data_root):
    data = DataFiles(data_root)
    wiki, _ = wikitext2_text(data)
    assert wiki.count("\n\n") == 4358 - 1  # rows of wikitext-2-raw-v1 test
    assert wiki.startswith("\n\n = Robert Boulter = \n")  # row 0 is empty
    ptb, _ = ptb_text(data)
    assert len(text.read_ptb_sentences(data.find("ptb_test"))) == 3761  # rows of ptb_text_only test
    assert ptb.startswith("no it was n't black monday but while")
    docs, _ = c4_documents(data, "train")
    assert len(docs) == 1000 and docs[0].startswith("Beginners BBQ Class")
