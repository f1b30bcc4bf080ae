"""Deterministic seeds derived from the config seed, stable across processes and devices."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def derive_seed(base: int, *keys) -> int:
    """A 31-bit seed for ``keys`` (layer names, sides) under the run's ``base`` seed."""
    text = "/".join([str(base), *map(str, keys)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") & 0x7FFFFFFF


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
