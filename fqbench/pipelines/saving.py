"""What a pipeline does with ``save=true``: the evaluated model, packed, next to its run record."""

from __future__ import annotations

import os
from pathlib import Path

from fqbench.packing import checkpoint_sizes, save_quantized


def save_run(model, layers: dict, method, output_dir: str | os.PathLike, *, device, tokenizer=None, **source) -> dict:
    """The packed model in ``<output_dir>/packed`` (with the tokenizer, if any), returning
    ``{"directory": ..., **checkpoint_sizes}`` for ``result.json``."""
    directory = Path(output_dir) / "packed"
    save_quantized(model, layers, directory, method=method, device=device, overwrite=True,
                   write_extra=None if tokenizer is None else tokenizer.save_pretrained, **source)
    return {"directory": str(directory), **checkpoint_sizes(directory)}
