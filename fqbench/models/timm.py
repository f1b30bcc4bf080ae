"""timm vision transformers: loading through timm's own code, and their quantization units as data.

ViT, DeiT and DeiT III keep their blocks in ``blocks``; Swin keeps stages in
``layers``, each stage running its patch merging (``downsample``, an identity in
the first stage) and then its ``blocks``. The engine works on a flat, ordered
list of units called one after the other, so a staged model is flattened into
``layers.i.downsample`` (the patch-merging ``reduction``, its own unit) followed
by ``layers.i.blocks.j``; running the units in sequence is exactly the stage's
forward.

Patch embedding and the classifier head stay in full precision (recorded in
every run as ``full_precision_modules``), as in the paper's weight-only tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torch import nn

from fqbench.models.layout import Block, is_linear

BLOCK_GROUPS = (("attn.qkv",), ("attn.proj",), ("mlp.fc1",), ("mlp.fc2",))


@dataclass(frozen=True)
class TimmLayout:
    blocks: str  # the container of blocks (relative to a stage, if stages are set)
    groups: tuple[tuple[str, ...], ...] = BLOCK_GROUPS
    stages: str | None = None  # the container of stages (Swin)
    downsample: str | None = None  # a stage's patch merging, run before its blocks
    downsample_groups: tuple[tuple[str, ...], ...] = (("reduction",),)
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

    def units(self, model: nn.Module) -> list[Block]:
        """The quantization units in forward order, each with its linears in quantization order."""
        if self.stages is None:
            units = _blocks(model, self.blocks, self.groups)
        else:
            units = []
            for i, stage in enumerate(model.get_submodule(self.stages)):
                prefix = f"{self.stages}.{i}"
                merge = getattr(stage, self.downsample)
                if not isinstance(merge, nn.Identity):
                    units.append(Block(f"{prefix}.{self.downsample}", merge, self.downsample_groups))
                units += _blocks(stage, self.blocks, self.groups, prefix)
        for unit in units:
            missing = [n for n in unit.linears() if not is_linear(_find(unit.module, n))]
            if missing:
                raise ValueError(f"{unit.name}: expected nn.Linear modules {missing}; "
                                 f"the layout does not match this model ({type(model).__name__})")
        return units


FAMILIES = {
    "vit": TimmLayout(blocks="blocks"),  # ViT, DeiT, DeiT III
    "swin": TimmLayout(blocks="blocks", stages="layers", downsample="downsample"),
}


def layout_for(family: str) -> TimmLayout:
    if family not in FAMILIES:
        raise ValueError(f"unknown timm model family {family!r} (model.family); known: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[family]


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


def _find(module: nn.Module, name: str):
    try:
        return module.get_submodule(name)
    except AttributeError:
        return None
