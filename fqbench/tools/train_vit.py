"""Train the small evidence ViT on real MNIST digits and cache it as a timm checkpoint.

    python -m fqbench.tools.train_vit [--data DIR] [--force] [model.kwargs.embed_dim=64 ...]

The architecture and preprocessing are those of ``conf/model/mnist_vit.yaml``
(so the vision pipeline rebuilds exactly this model and loads the weights
through timm's loader with ``model=mnist_vit``); the training images are the
``train`` split of ``fqbench.data.mnist`` (the held-out digits are never seen).
The checkpoint goes to ``$FQBENCH_CACHE/mnist_vit/model.safetensors``
(default ``~/.cache/fqbench``) with ``recipe.json`` beside it; a cached model
whose recipe matches is reused. Config overrides train a variant of the
architecture into ``mnist_vit-<recipe key>/`` instead (the path is printed: pass
it as ``model.checkpoint`` with the same overrides).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

log = logging.getLogger("fqbench")

RECIPE = {
    "epochs": 8,
    "batch_size": 64,
    "lr": 3e-3,
    "weight_decay": 0.05,
    "warmup_fraction": 0.1,  # one-cycle: linear warm-up, then cosine decay
    "seed": 0,
}


def cache_dir() -> Path:
    return Path(os.environ.get("FQBENCH_CACHE") or "~/.cache/fqbench").expanduser()


def model_config(overrides=()):
    """The composed ``model=mnist_vit`` config (random init: the weights are what we train)."""
    from fqbench.config import compose

    return compose(["model=mnist_vit", "model.pretrained=false", "model.checkpoint=null", *overrides]).model


def recipe_key(model_cfg) -> str:
    described = {"recipe": RECIPE, "kwargs": OmegaConf.to_container(model_cfg.kwargs),
                 "pretrained_cfg": OmegaConf.to_container(model_cfg.pretrained_cfg), "name": model_cfg.name}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


def ensure_trained(data_root: str | os.PathLike, overrides=(), *, force: bool = False, progress: bool = True) -> Path:
    """The cached checkpoint, training it first when it is missing or its recipe changed."""
    model_cfg = model_config(overrides)
    key = recipe_key(model_cfg)
    folder = cache_dir() / ("mnist_vit" if not overrides else f"mnist_vit-{key}")
    checkpoint, meta = folder / "model.safetensors", folder / "recipe.json"
    if not force and checkpoint.is_file() and meta.is_file() and json.loads(meta.read_text()).get("key") == key:
        return checkpoint
    model, summary = train(model_cfg, Path(data_root), progress=progress)
    folder.mkdir(parents=True, exist_ok=True)
    _write_atomically(checkpoint, lambda path: _save_state(model, path))
    _write_atomically(meta, lambda path: Path(path).write_text(json.dumps({"key": key, **summary}, indent=1)))
    log.info("saved %s (held-out top-1 %.2f%%)", checkpoint, summary["heldout_top1"])
    return checkpoint


def train(model_cfg, data_root: Path, *, progress: bool = True):
    import timm.data

    from fqbench.data.mnist import load_split
    from fqbench.models.timm import load_timm_model

    torch.manual_seed(RECIPE["seed"])
    model = load_timm_model(model_cfg)
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model), is_training=False)
    data_cfg = OmegaConf.create({"root": str(data_root), "mnist": "mnist"})
    train_x, train_y = _tensors(load_split(data_cfg, "train", transform))
    val_x, val_y = _tensors(load_split(data_cfg, "val", transform))

    steps_per_epoch = len(train_y) // RECIPE["batch_size"]
    total = RECIPE["epochs"] * steps_per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=RECIPE["lr"], weight_decay=RECIPE["weight_decay"])
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=RECIPE["lr"], total_steps=total,
                                                   pct_start=RECIPE["warmup_fraction"])
    generator = torch.Generator().manual_seed(RECIPE["seed"])
    start = time.perf_counter()
    for epoch in range(RECIPE["epochs"]):
        model.train()
        order = torch.randperm(len(train_y), generator=generator)
        for step in range(steps_per_epoch):
            batch = order[step * RECIPE["batch_size"]:(step + 1) * RECIPE["batch_size"]]
            loss = F.cross_entropy(model(train_x[batch]), train_y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        accuracy = _accuracy(model, val_x, val_y)
        if progress:
            log.info("epoch %d/%d: loss %.3f, held-out top-1 %.2f%% (%.0f s)", epoch + 1, RECIPE["epochs"],
                     loss.item(), accuracy, time.perf_counter() - start)
    model.eval()
    return model, {"recipe": RECIPE, "heldout_top1": _accuracy(model, val_x, val_y),
                   "train_images": len(train_y), "heldout_images": len(val_y),
                   "seconds": time.perf_counter() - start, "torch": torch.__version__}


@torch.no_grad()
def _accuracy(model, x, y) -> float:
    model.eval()
    predictions = torch.cat([model(chunk).argmax(dim=-1) for chunk in x.split(500)])
    return 100.0 * (predictions == y).float().mean().item()


def _tensors(dataset):
    images, labels = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(images), torch.tensor(labels)


def _save_state(model, path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def _write_atomically(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=os.environ.get("FQBENCH_DATA"),
                        help="data root holding mnist/ (default: $FQBENCH_DATA)")
    parser.add_argument("--force", action="store_true", help="retrain even when a cached model matches the recipe")
    parser.add_argument("overrides", nargs="*", help="model config overrides, e.g. model.kwargs.embed_dim=64")
    args = parser.parse_args(argv)
    if not args.data:
        parser.error("give --data DIR (the folder holding mnist/) or set FQBENCH_DATA")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.nice(10)  # the training loop is CPU-bound: yield to interactive work
    print(ensure_trained(args.data, args.overrides, force=args.force))


if __name__ == "__main__":
    main()
