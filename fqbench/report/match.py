"""From run records to table cells.

A record fills a cell when it finished, its model is the cell's model (the
``model`` config group choice), its method config equals the one the cell's
variant composes to (every option, the seed aside: seeds are averaged), and its
config has the cell's overrides. Matching on the composed method config, not
on the variant's name, lets any run that computed the same thing fill the cell
(``method=framequant redundancy=1.0`` fills the "FrameQuant (r = 1.0)" row).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import fmean

from omegaconf import OmegaConf

from fqbench.config import compose
from fqbench.records import FINISHED, iter_records
from fqbench.report.paper import PaperValue
from fqbench.report.specs import METRICS, Metric

IGNORED_METHOD_KEYS = ("seed",)


def finished_records(root) -> list[dict]:
    """Finished records under ``root``, the newest of every config hash, each with its ``path``."""
    newest: dict[str, dict] = {}
    for path, record in iter_records(root):
        if record.get("status") != FINISHED:
            continue
        record["path"] = str(path.parent)
        key = record.get("config_hash") or record["path"]
        if key not in newest or (record.get("finished_at") or "") >= (newest[key].get("finished_at") or ""):
            newest[key] = record
    return list(newest.values())


class Recipes:
    """What a variant (plus overrides) composes to, from the app's own config tree."""

    def __init__(self):
        self._cache: dict[tuple, dict] = {}

    def expected(self, variant: str, overrides: tuple[str, ...] = ()) -> dict:
        """``{"method": {...}, "overrides": {dotted key: value}}`` for a variant."""
        key = (variant, tuple(overrides))
        if key not in self._cache:
            cfg = self._compose([f"variant={variant}", *overrides])
            method = OmegaConf.to_container(cfg.method, resolve=True)
            values = {o.split("=", 1)[0]: OmegaConf.select(cfg, o.split("=", 1)[0]) for o in overrides}
            self._cache[key] = {"method": _without(method, IGNORED_METHOD_KEYS), "overrides": values}
        return self._cache[key]


    def _compose(self, overrides: list[str]):
        return compose(overrides)


@dataclass
class Cell:
    ours: float | None = None
    paper: PaperValue | None = None
    records: list[str] = field(default_factory=list)  # record directories averaged into ``ours``
    source: str = ""  # "fp baseline of a quantized run" when the FP cell came from one
    flagged: bool = False  # a full-precision cell far from the paper's: a different setup (see report.render)

    @property
    def diff(self) -> float | None:
        if self.ours is None or self.paper is None:
            return None
        return self.ours - self.paper.value


def select(records: list[dict], selection: dict, recipes: Recipes) -> list[dict]:
    expected = recipes.expected(selection["variant"], tuple(selection.get("overrides", ())))
    return [r for r in records
            if (r.get("choices") or {}).get("model") == selection["model"]
            and _same(_without(r["config"].get("method", {}), IGNORED_METHOD_KEYS), expected["method"])
            and all(_same(_lookup(r["config"], k), v) for k, v in expected["overrides"].items())]


def metric_value(record: dict, metric: Metric, prefix: str = "") -> float | None:
    value = _lookup(record.get(metric.section) or {}, prefix + metric.path)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    return float(value) * metric.scale


def fill(selection: dict, records: list[dict], recipes: Recipes) -> Cell:
    """The mean of the cell's metric over its matching records (distinct configs: seeds)."""
    metric = METRICS[selection["metric"]]
    matched = [(r, metric_value(r, metric)) for r in select(records, selection, recipes)]
    matched = [(r, v) for r, v in matched if v is not None]
    if matched:
        return Cell(fmean(v for _, v in matched), records=[r["path"] for r, _ in matched])
    if selection["variant"] == "fp":
        # Pipelines may evaluate the full-precision model inside a quantized run (metrics "fp_<metric>").
        for record in records:
            if (record.get("choices") or {}).get("model") == selection["model"]:
                value = metric_value(record, metric, prefix="fp_")
                if value is not None:
                    return Cell(value, records=[record["path"]], source="fp baseline of a quantized run")
    return Cell()


def _lookup(tree: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _without(tree: dict, keys) -> dict:
    return {k: v for k, v in tree.items() if k not in keys}


def _same(a, b) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b
