"""Image classification data: one module per dataset, one way to draw calibration and evaluation sets.

A dataset module exposes ``load_split(data_cfg, split, transform) -> Dataset``
with ``split`` in ``("train", "val")``, each item ``(image tensor, class index)``.
Calibration is ``nsamples`` images drawn at random (seeded) from the training
split; evaluation is the validation split, or a fixed random subset of it
(``eval.max_images``) for quick runs.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset

VISION_DATASETS = {
    "imagenet": "fqbench.data.imagenet",
    "mnist": "fqbench.data.mnist",
}

# Evaluation subsets (eval.max_images) are drawn with their own fixed seed, so that
# runs with different seeds are scored on the same images.
EVAL_SUBSET_SEED = 0


def load_split(name: str, data_cfg, split: str, transform) -> Dataset:
    if name not in VISION_DATASETS:
        raise ValueError(f"unknown image dataset {name!r} (model.dataset); known: {', '.join(sorted(VISION_DATASETS))}")
    return importlib.import_module(VISION_DATASETS[name]).load_split(data_cfg, split, transform)


def calibration_images(dataset: Dataset, nsamples: int, seed: int) -> torch.Tensor:
    """``nsamples`` training images drawn without replacement with a seeded CPU generator: ``(n, C, H, W)``."""
    if nsamples < 1:
        raise ValueError(f"calib.nsamples={nsamples}: need at least one calibration image")
    if nsamples > len(dataset):
        raise ValueError(f"calib.nsamples={nsamples} but the training split has only {len(dataset)} images; "
                         f"lower calib.nsamples or point the data config at a larger training set")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:nsamples]
    return torch.stack([dataset[int(i)][0] for i in order])


def evaluation_subset(dataset: Dataset, max_images: int | None) -> Dataset:
    if max_images is None or max_images >= len(dataset):
        return dataset
    if max_images < 1:
        raise ValueError(f"eval.max_images={max_images}: use a positive number, or null for the whole split")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(EVAL_SUBSET_SEED))[:max_images]
    return Subset(dataset, sorted(order.tolist()))


def resolve_path(data_cfg, key: str, what: str) -> Path:
    """``data.<key>``: an absolute path, or a path relative to ``data.root``."""
    value = data_cfg.get(key)
    if value is None:
        raise ValueError(f"data.{key} is not set; point it at {what}")
    path = Path(str(value)).expanduser()
    if not path.is_absolute():
        root = data_cfg.get("root")
        if root is None:
            raise FileNotFoundError(f"data.{key}={value} is relative but data.root is not set; set data.root=DIR "
                                    f"(or FQBENCH_DATA) to the folder holding {value}/, or give data.{key} as an absolute path")
        path = Path(str(root)).expanduser() / path
    return path
