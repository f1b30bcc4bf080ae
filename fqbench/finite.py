"""Non-finite numbers: a NaN or infinite metric fails its job, and records stay strict JSON.

A NaN perplexity is not a result: a job whose metric is not finite is ``failed``
with an error naming the metric and, when the evaluation found it, the first
module whose output went non-finite. Other non-finite numbers a record holds
(an undefined mean, a time never measured) are written as ``null`` and listed in
the record's ``non_finite`` note.
"""

from __future__ import annotations

import math

import torch


class NonFiniteError(ValueError):
    """A metric or an activation that is NaN or infinite."""


def all_finite(t: torch.Tensor) -> bool:
    # One reduction, no boolean copy: amax propagates NaN, and |x| of finite values stays finite.
    return t.numel() == 0 or not t.is_floating_point() or bool(torch.isfinite(t.abs().amax()))


def is_nonfinite_number(value) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def check_metric(name: str, value, *, first_nonfinite: str | None = None) -> None:
    """Raise ``NonFiniteError`` naming the metric (and where its NaN/Inf first appeared) when it is not finite."""
    if not is_nonfinite_number(value):
        return
    where = (f"; the first non-finite output was that of {first_nonfinite}" if first_nonfinite
             else "")
    raise NonFiniteError(f"metric {name} is {value}: the model's output is not finite{where}. Check the model's "
                         f"weights for NaN/Inf and the dtype (float16 overflows; try model.dtype=float32)")


def check_metrics(metrics: dict) -> None:
    """Every number in a (nested) metrics dict is finite, or ``NonFiniteError`` names the first one that is not."""
    for path, value in nonfinite_items(metrics):
        check_metric(path, value)


def nonfinite_paths(value) -> list[str]:
    """Dotted paths of the NaN/Inf floats in nested dicts and lists (list items by index)."""
    return [path for path, _ in nonfinite_items(value)]


def nonfinite_items(value, prefix: str = "") -> list[tuple[str, float]]:
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return [(prefix, value)] if is_nonfinite_number(value) else []
    found = []
    for key, item in items:
        found += nonfinite_items(item, f"{prefix}.{key}" if prefix else str(key))
    return found
