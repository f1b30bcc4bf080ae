"""Import a llama2.c checkpoint into a Hugging Face ``LlamaForCausalLM`` directory.

    python -m fqbench.tools.llama2c stories260K.bin --tokenizer tok512.model --out DIR

The legacy llama2.c format (``export.py --version 0``, e.g. ``stories260K.bin``):
a header of 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
seq_len; a negative vocab_size means the classifier is not shared with the
embedding), then float32 tensors in this order: token embedding, attention
RMSNorm weights, wq, wk, wv, wo, FFN RMSNorm weights, w1, w2, w3, final RMSNorm,
two unused RoPE tables, and the classifier when not shared. Matrices are stored
(out, in), as ``nn.Linear`` keeps them.

llama2.c rotates interleaved pairs (2i, 2i+1) of each head; Hugging Face's
``rotate_half`` rotates (i, i + head_dim/2). The rows of wq and wk are permuted
per head so that both compute the same attention.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

VERSION_MAGIC = 0x616B3432  # "ak42": llama2.c's versioned export format


@dataclass(frozen=True)
class Llama2cConfig:
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool

    @property
    def head_size(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_size

    def tensor_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """The float32 tensors after the header, in file order."""
        layers, dim, hidden = self.n_layers, self.dim, self.hidden_dim
        shapes = [
            ("tok_embeddings", (self.vocab_size, dim)),
            ("attention_norm", (layers, dim)),
            ("wq", (layers, dim, dim)),
            ("wk", (layers, self.kv_dim, dim)),
            ("wv", (layers, self.kv_dim, dim)),
            ("wo", (layers, dim, dim)),
            ("ffn_norm", (layers, dim)),
            ("w1", (layers, hidden, dim)),
            ("w2", (layers, dim, hidden)),
            ("w3", (layers, hidden, dim)),
            ("norm", (dim,)),
            ("freq_cis_real", (self.seq_len, self.head_size // 2)),
            ("freq_cis_imag", (self.seq_len, self.head_size // 2)),
        ]
        if not self.shared_classifier:
            shapes.append(("output", (self.vocab_size, dim)))
        return shapes


def read_checkpoint(path: str | os.PathLike) -> tuple[Llama2cConfig, dict[str, torch.Tensor]]:
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size >= 4 and int(raw[:4].view(np.uint32)[0]) == VERSION_MAGIC:
        raise ValueError(f"{path}: a versioned llama2.c export (magic 'ak42'); only the legacy format "
                         "(export.py --version 0, the format of stories*.bin) is supported")
    if raw.size < 28:
        raise ValueError(f"{path}: {raw.size} bytes is too short for a llama2.c header")
    header = raw[:28].view(np.int32).tolist()
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = header
    config = Llama2cConfig(dim, hidden, layers, heads, kv_heads, abs(vocab), seq_len, shared_classifier=vocab > 0)
    if min(dim, hidden, layers, heads, kv_heads, abs(vocab), seq_len) <= 0 or dim % heads or heads % kv_heads:
        raise ValueError(f"{path}: implausible llama2.c header {header}")
    floats = raw[28:].view(np.float32) if (raw.size - 28) % 4 == 0 else None
    expected = sum(int(np.prod(shape)) for _, shape in config.tensor_shapes())
    if floats is None or floats.size != expected:
        got = (raw.size - 28) / 4
        raise ValueError(f"{path}: the header {header} implies {expected} float32 weights, the file holds {got:g}")
    tensors, offset = {}, 0
    for name, shape in config.tensor_shapes():
        size = int(np.prod(shape))
        tensors[name] = torch.from_numpy(floats[offset:offset + size].copy()).view(shape)
        offset += size
    return config, tensors


def rotary_permutation(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q/k projection from interleaved rotary pairs (llama2.c) to half-split pairs (HF)."""
    out_features, in_features = weight.shape
    head_size = out_features // heads
    return weight.view(heads, head_size // 2, 2, in_features).transpose(1, 2).reshape(out_features, in_features)


def hf_state_dict(config: Llama2cConfig, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = {"model.embed_tokens.weight": t["tok_embeddings"], "model.norm.weight": t["norm"]}
    for i in range(config.n_layers):
        prefix = f"model.layers.{i}."
        state |= {
            prefix + "input_layernorm.weight": t["attention_norm"][i],
            prefix + "self_attn.q_proj.weight": rotary_permutation(t["wq"][i], config.n_heads),
            prefix + "self_attn.k_proj.weight": rotary_permutation(t["wk"][i], config.n_kv_heads),
            prefix + "self_attn.v_proj.weight": t["wv"][i],
            prefix + "self_attn.o_proj.weight": t["wo"][i],
            prefix + "post_attention_layernorm.weight": t["ffn_norm"][i],
            prefix + "mlp.gate_proj.weight": t["w1"][i],
            prefix + "mlp.down_proj.weight": t["w2"][i],
            prefix + "mlp.up_proj.weight": t["w3"][i],
        }
    state["lm_head.weight"] = t["tok_embeddings"] if config.shared_classifier else t["output"]
    return {k: v.contiguous() for k, v in state.items()}


def hf_config(config: Llama2cConfig):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=config.hidden_dim,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads, max_position_embeddings=config.seq_len,
        rms_norm_eps=1e-5,  # llama2.c's rmsnorm
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=config.shared_classifier, bos_token_id=1, eos_token_id=2,
    )


def build_model(config: Llama2cConfig, tensors: dict[str, torch.Tensor]):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(hf_config(config))
    model.load_state_dict(hf_state_dict(config, tensors), strict=True)
    return model.eval()


def build_tokenizer(sentencepiece_model: str | os.PathLike, seq_len: int):
    """A Hugging Face Llama tokenizer from a sentencepiece model, adding BOS like llama2.c's ``encode(bos=1)``."""
    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory() as folder:
        shutil.copyfile(sentencepiece_model, Path(folder) / "tokenizer.model")
        return LlamaTokenizer.from_pretrained(folder, add_bos_token=True, add_eos_token=False,
                                              model_max_length=seq_len)


def convert(checkpoint: str | os.PathLike, tokenizer: str | os.PathLike, out: str | os.PathLike,
            *, overwrite: bool = False) -> Path:
    """Write the HF model directory (config.json, safetensors, tokenizer); atomic: all of it or nothing."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    config, tensors = read_checkpoint(checkpoint)
    if not Path(tokenizer).is_file():
        raise FileNotFoundError(f"sentencepiece tokenizer {tokenizer} not found")
    model = build_model(config, tensors)
    tok = build_tokenizer(tokenizer, config.seq_len)
    if len(tok) != config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tok)} pieces, the checkpoint's vocabulary {config.vocab_size}")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(staging)
        tok.save_pretrained(staging)
        shutil.copyfile(tokenizer, staging / "tokenizer.model")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fqbench.tools.llama2c", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="llama2.c checkpoint (legacy format), e.g. stories260K.bin")
    parser.add_argument("--tokenizer", required=True, help="its sentencepiece model, e.g. tok512.model")
    parser.add_argument("--out", required=True, help="output Hugging Face model directory")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    args = parser.parse_args(argv)
    print(convert(args.checkpoint, args.tokenizer, args.out, overwrite=args.overwrite))


if __name__ == "__main__":
    main()
