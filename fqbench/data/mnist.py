"""MNIST (idx format) for the small evidence ViT: a seeded split of one labelled file pair.

The shared data folder holds the 10,000 MNIST test digits; ``train`` is a fixed
random 8,000 of them (the training script and calibration use it) and ``val``
the other 2,000 (held out: evaluation only).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from fqbench.data.vision import resolve_path

IMAGES = "t10k-images-idx3-ubyte.gz"
LABELS = "t10k-labels-idx1-ubyte.gz"
TRAIN_IMAGES = 8000
SPLIT_SEED = 0


def load_split(data_cfg, split: str, transform) -> Dataset:
    folder = resolve_path(data_cfg, "mnist", f"a folder with {IMAGES} and {LABELS}")
    images, labels = read_idx_pair(folder)
    return MNISTSplit(images, labels, split_indices(len(labels), split), transform)


def read_idx_pair(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    images, labels = _read_idx(folder / IMAGES, 3), _read_idx(folder / LABELS, 1)
    if len(images) != len(labels):
        raise ValueError(f"{folder}: {len(images)} images but {len(labels)} labels")
    return images, labels


def split_indices(count: int, split: str) -> torch.Tensor:
    if split not in ("train", "val"):
        raise ValueError(f"split={split!r}; use 'train' or 'val'")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(SPLIT_SEED))
    return order[:TRAIN_IMAGES] if split == "train" else order[TRAIN_IMAGES:]


class MNISTSplit(Dataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray, indices: torch.Tensor, transform=None):
        self.images, self.labels, self.indices, self.transform = images, labels, indices.tolist(), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        j = self.indices[i]
        image = Image.fromarray(self.images[j])  # uint8 (28, 28): a greyscale "L" image
        return (self.transform(image) if self.transform else image), int(self.labels[j])


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """An idx file (gzip): magic ``0x0000 08 ndim``, ``ndim`` big-endian int32 sizes, then uint8 data."""
    if not path.is_file():
        raise FileNotFoundError(f"no MNIST file at {path}; set data.root (or FQBENCH_DATA) to the folder holding "
                                f"mnist/{path.name}, or data.mnist to its folder")
    raw = gzip.decompress(path.read_bytes())
    magic = int.from_bytes(raw[:4], "big")
    if magic != 0x0800 + ndim:
        raise ValueError(f"{path}: magic number {magic:#x} is not an idx file of uint8 with {ndim} dimension(s)")
    shape = [int.from_bytes(raw[4 + 4 * k:8 + 4 * k], "big") for k in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)
