"""A sha256 per tensor of a packed checkpoint's ``model.safetensors``, and its verification.

Saving stores, in the safetensors metadata under ``fqbench.sha256``, a JSON object
mapping each tensor's name to the sha256 of its bytes as the file stores them (the
tensor's data region: row-major, little-endian). Loading re-hashes every region of
the file and raises ``PackedFormatError`` naming the first tensor whose bytes
changed. Checkpoints written before checksums existed load with a warning that
they cannot be verified.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import warnings
from pathlib import Path

import torch

from fqbench.packing.format import PackedFormatError
from fqbench.packing.safetensors_file import data_offset, read_header

METADATA_KEY = "fqbench.sha256"


def tensor_sha256(t: torch.Tensor) -> str:
    data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()


def checksum_metadata(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """The safetensors metadata entry holding every tensor's sha256."""
    return {METADATA_KEY: json.dumps({name: tensor_sha256(t) for name, t in sorted(tensors.items())})}


def verify_checksums(path: str | Path) -> bool:
    """Check every tensor of a safetensors file against its stored sha256; False (and a warning) when it has none."""
    path = Path(path)
    try:
        header = read_header(path)
        start = data_offset(path)
    except ValueError as error:
        raise PackedFormatError(f"{error}; the checkpoint is corrupted") from error
    stored = (header.pop("__metadata__", None) or {}).get(METADATA_KEY)
    if stored is None:
        warnings.warn(f"{path} has no tensor checksums (written before fqbench stored them): its tensors cannot be "
                      f"verified", stacklevel=3)
        return False
    try:
        expected = json.loads(stored)
    except json.JSONDecodeError as error:
        raise PackedFormatError(f"{path}: the {METADATA_KEY} metadata is not valid JSON ({error}); the checkpoint "
                                f"is corrupted") from error
    unlisted = sorted(set(header) - set(expected))
    if unlisted:
        raise PackedFormatError(f"{path}: tensor(s) {unlisted[:8]} have no checksum; the file was altered after saving")
    absent = sorted(set(expected) - set(header))
    if absent:
        raise PackedFormatError(f"{path}: tensor(s) {absent[:8]} have a checksum but are not in the file")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        view = memoryview(data)
        try:
            for name in sorted(header, key=lambda n: header[n]["data_offsets"][0]):
                begin, end = header[name]["data_offsets"]
                digest = hashlib.sha256(view[start + begin:start + end]).hexdigest()
                if digest != expected[name]:
                    raise PackedFormatError(
                        f"{path}: tensor {name} does not match its sha256 checksum (stored {expected[name][:12]}..., "
                        f"read {digest[:12]}...): the file is corrupted; restore it from a good copy "
                        f"(load_quantized(..., verify=False) skips the check)")
        finally:
            view.release()
    return True
