"""timm vision transformers: loading through timm's own code, and their blocks as data.

ViT, DeiT, DeiT III, EVA and BEiT keep their blocks in ``blocks``; Swin and Swin V2 keep
stages in ``layers``, each stage running its patch merging (``downsample``, an identity in
the first stage) and then its ``blocks``. The engine works on a flat, ordered list of blocks
called one after the other, so a staged model is flattened into ``layers.i.downsample`` (the
patch merging, its own block) followed by ``layers.i.blocks.j``; running them in sequence is
exactly the stage's forward.

``model.family`` picks an adapter: ``vit`` and ``swin`` name their linears and groups
explicitly (the paper's models); ``auto`` (the default) finds the blocks from the model's
structure and lets the engine discover each block's linears from a forward pass, in call
order, grouped by shared input, skipping linears whose input does not depend on the block's
input (Swin V2's continuous position-bias MLP), and seeing weights used through ``F.linear``
(Swin V2, EVA, BEiT). Any timm ViT/DeiT/DeiT III/Swin/Swin V2/EVA-02 architecture runs with
``model=timm model.name=<architecture>``.

Patch embedding and the classifier head stay in full precision (recorded in every run as
``full_precision_modules``), as in the paper's weight-only tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from fqbench.models.adapter import Block, check_blocks

BLOCK_GROUPS = (("attn.qkv",), ("attn.proj",), ("mlp.fc1",), ("mlp.fc2",))
STAGE_CONTAINERS = ("layers", "stages")


@dataclass(frozen=True)
class TimmAdapter:
    """A ``ModelAdapter`` (``fqbench.models.adapter``) for timm image classifiers."""

    name: str
    blocks_path: str = "blocks"  # the container of blocks (relative to a stage, if stages are set)
    groups: tuple[tuple[str, ...], ...] | None = BLOCK_GROUPS  # None: discovered from a forward pass
    stages: str | None = None  # the container of stages (Swin)
    downsample: str | None = None  # a stage's patch merging, run before its blocks
    downsample_groups: tuple[tuple[str, ...], ...] | None = (("reduction",),)
    # Activation quantization (PTQ4ViT-style) hooks into a block's attention: the
    # q/k/v projection's output (the first matmul's inputs and v), the softmax
    # output (its dropout module, the identity at inference) and the output
    # projection, whose input is the attention context.
    attention: str = "attn"
    attention_qkv: str = "qkv"
    attention_probs: str = "attn_drop"
    attention_out: str = "proj"
    post_gelu: tuple[str, ...] = ("mlp.fc2",)  # linears whose input is a GELU output
    full_precision: tuple[str, ...] = ("patch_embed", "head")

    def blocks(self, model: nn.Module) -> list[Block]:
        """The blocks in forward order, each with its linears in quantization order (or None: discovered)."""
        if self.stages is None:
            units = _blocks(model, self.blocks_path, self.groups)
        else:
            units = []
            for i, stage in enumerate(model.get_submodule(self.stages)):
                prefix = f"{self.stages}.{i}"
                merge = getattr(stage, self.downsample, None) if self.downsample else None
                if merge is not None and not isinstance(merge, nn.Identity):
                    units.append(Block(f"{prefix}.{self.downsample}", merge, self.downsample_groups))
                units += _blocks(stage, self.blocks_path, self.groups, prefix)
        check_blocks(units, type(model).__name__)
        return units

    def run(self, model: nn.Module, images: torch.Tensor, device):
        return model(images.to(device))

    def block_kwargs(self, index: int, kwargs: dict) -> dict:
        return kwargs


FAMILIES = {
    "vit": TimmAdapter("vit"),  # ViT, DeiT, DeiT III
    "swin": TimmAdapter("swin", stages="layers", downsample="downsample"),
}


def adapter_for(family: str, model: nn.Module) -> TimmAdapter:
    """The named family's adapter, or (``auto``) one read off the model's structure."""
    if family == "auto":
        return infer_adapter(model)
    if family not in FAMILIES:
        raise ValueError(f"unknown timm model family {family!r} (model.family); known: auto, "
                         f"{', '.join(sorted(FAMILIES))}")
    return FAMILIES[family]


def infer_adapter(model: nn.Module) -> TimmAdapter:
    """Blocks in ``blocks`` (ViT-like), or stages in ``layers``/``stages`` with ``blocks`` and an optional
    ``downsample`` (Swin-like); linears discovered by the engine."""
    for container in STAGE_CONTAINERS:
        stages = getattr(model, container, None)
        if isinstance(stages, (nn.ModuleList, nn.Sequential)) and len(stages) and all(
                isinstance(getattr(stage, "blocks", None), (nn.ModuleList, nn.Sequential)) for stage in stages):
            return TimmAdapter(f"auto:{type(model).__name__}", groups=None, stages=container,
                               downsample="downsample", downsample_groups=None)
    if isinstance(getattr(model, "blocks", None), (nn.ModuleList, nn.Sequential)):
        return TimmAdapter(f"auto:{type(model).__name__}", groups=None)
    raise ValueError(f"cannot find the transformer blocks of {type(model).__name__} (no 'blocks', and no stages "
                     f"in {' or '.join(STAGE_CONTAINERS)} holding 'blocks'); set model.family to vit or swin")


def load_timm_model(model_cfg) -> nn.Module:
    """Create a timm model from a ``conf/model`` entry, in eval mode, on the CPU.

    ``pretrained=false``: random weights. ``checkpoint=FILE``: local weights through
    timm's pretrained loader (its filter functions convert original checkpoints).
    Otherwise the tagged weights from the Hugging Face hub.
    """
    import timm

    name = model_cfg.name
    overlay = {k: tuple(v) if isinstance(v, list) else v for k, v in _plain(model_cfg.get("pretrained_cfg")).items()}
    checkpoint = model_cfg.get("checkpoint")
    pretrained = bool(model_cfg.get("pretrained", True))
    if checkpoint:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            hint = model_cfg.get("checkpoint_help") or (f"give the path of a timm checkpoint (.safetensors/.pth/.bin) "
                                                        f"for {name}, or model.pretrained=false")
            raise FileNotFoundError(f"model.checkpoint={checkpoint}: no such file; {hint}")
        overlay["file"] = str(path)
        pretrained = True
    kwargs = _plain(model_cfg.get("kwargs"))
    try:
        model = timm.create_model(name, pretrained=pretrained, pretrained_cfg_overlay=overlay or None, **kwargs)
    except (OSError, RuntimeError) as error:
        if pretrained and not checkpoint:
            raise RuntimeError(f"could not load the pretrained weights of {name} ({error}); without network access, "
                               f"download them and pass model.checkpoint=FILE, or use model.pretrained=false") from error
        raise
    return model.eval()


def _plain(node) -> dict:
    """A config mapping as a plain dict (timm wants tuples and numbers, not OmegaConf nodes)."""
    if node is None:
        return {}
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)
    return dict(node)


def _blocks(root: nn.Module, path: str, groups, prefix: str = "") -> list[Block]:
    container = root.get_submodule(path)
    base = f"{prefix}.{path}" if prefix else path
    return [Block(f"{base}.{i}", block, groups) for i, block in enumerate(container)]
