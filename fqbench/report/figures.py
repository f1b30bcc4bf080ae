"""The paper's figures from run records, as PNG.

- ``accuracy_vs_redundancy``: 2-bit FrameQuant quality against the effective redundancy (Table 8, Figure 9);
- ``accuracy_vs_clip``: quality against the clip threshold in standard deviations at r = 1.1 (Figure 11);
- ``perplexity_vs_size``: perplexity against model size per method, the paper's points dashed (Figure 5, Table 13);
- ``pareto``: quality against honest bits per weight for every method (FrameQuant with the paper's clip, with the
  clip searched per layer, and with a bit budget; GPTQ uniform and mixed precision; ...), with the nominal (paper)
  bits of each point as a hollow marker, and the Pareto front; one panel per model.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fqbench.report.match import IGNORED_METHOD_KEYS, Recipes, _same, _without, metric_value, select  # noqa: E402
from fqbench.report.paper import paper_value  # noqa: E402
from fqbench.report.specs import LLM_PRESET, METRICS, MODEL_SIZES, MODELS, VariantRows, preset_axes  # noqa: E402

PRIMARY_METRICS = ("top1", "wikitext2", "c4", "pystdlib", "ptb")
FIGURES = ("accuracy_vs_redundancy", "accuracy_vs_clip", "perplexity_vs_size", "pareto")


def model_key(record: dict) -> str | None:
    """The model of a record: its ``model`` option, plus a digest of its model config (the checkpoint's location
    aside) so that e.g. two training recipes of the default model are two models."""
    choice = (record.get("choices") or {}).get("model")
    if choice is None:
        return None
    model = {k: v for k, v in (record.get("config") or {}).get("model", {}).items() if k != "path"}
    return f"{choice}#{hashlib.sha256(json.dumps(model, sort_keys=True, default=str).encode()).hexdigest()[:6]}"


def primary_metric(record: dict) -> str | None:
    """The headline metric of a record: top-1 for vision, else the first perplexity it has."""
    return next((name for name in PRIMARY_METRICS if metric_value(record, METRICS[name]) is not None), None)


def write_figures(records: list[dict], out_dir: Path, names=FIGURES, recipes: Recipes | None = None) -> list[Path]:
    recipes = recipes or Recipes()
    out_dir.mkdir(parents=True, exist_ok=True)
    makers = {"accuracy_vs_redundancy": _redundancy, "accuracy_vs_clip": _clip,
              "perplexity_vs_size": _model_size, "pareto": _pareto}
    paths = []
    for name in names:
        fig = makers[name](records, recipes)
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def _sweep(records, recipes, base_variant: str, axis: str):
    """Records equal to ``base_variant``'s method config except ``axis``: ``{(model, metric): [(x, y)]}``."""
    base = _without(recipes.expected(base_variant)["method"], (axis,))
    series = defaultdict(list)
    for record in records:
        method = _without(record["config"].get("method", {}), (*IGNORED_METHOD_KEYS, axis))
        if not _same(method, base):
            continue
        metric = primary_metric(record)
        model = model_key(record)
        if metric is None or model is None:
            continue
        x = record["config"]["method"][axis]
        if axis == "redundancy" and record.get("effective_redundancy") is not None:
            x = record["effective_redundancy"]
        if isinstance(x, (int, float)):  # not None (no clip) or "auto" (a clip per layer)
            series[(model, metric)].append((float(x), metric_value(record, METRICS[metric])))
    return series


def _line_plot(series, xlabel: str, title: str, note: str):
    fig, axes = _panels(sorted({metric for _, metric in series}) or [None])
    for ax, metric in zip(axes, sorted({metric for _, metric in series}) or [None]):
        for (model, m), points in sorted(series.items()):
            if m != metric:
                continue
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o", label=_model_label(model, [k for k, _ in series]))
        if metric is None:
            _empty(ax, note)
        else:
            ax.set_ylabel(METRICS[metric].label)
            _scale(ax, METRICS[metric], [y for (_, m), points in series.items() if m == metric for _, y in points])
            ax.legend(fontsize=7)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return fig


def _redundancy(records, recipes):
    return _line_plot(_sweep(records, recipes, "fq_w2_r1.0", "redundancy"), "effective redundancy r",
                      "2-bit FrameQuant: quality against redundancy",
                      "no 2-bit FrameQuant records at several redundancies\n(python -m fqbench -m experiment=table8_redundancy)")


def _clip(records, recipes):
    return _line_plot(_sweep(records, recipes, "fq_w2_r1.1", "clip_sigma"), "clip threshold (standard deviations)",
                      "2-bit FrameQuant (r = 1.1): quality against the clip threshold",
                      "no FrameQuant records at several clip thresholds\n(python -m fqbench -m experiment=fig11_clip_threshold)")


def _model_size(records, recipes):
    metrics = ("wikitext2", "c4")
    fig, axes = _panels(metrics)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    paper_tables = {"wikitext2": "table5", "c4": "table13"}
    for ax, metric in zip(axes, metrics):
        drawn = False
        for color, row in zip(colors, VariantRows().lines(preset_axes(LLM_PRESET))):
            ours, paper = [], []
            for model, size in MODEL_SIZES.items():
                values = [metric_value(r, METRICS[metric])
                          for r in select(records, {"model": model, "variant": row.id}, recipes)]
                values = [v for v in values if v is not None]
                if values:
                    ours.append((size, sum(values) / len(values)))
                published = paper_value(paper_tables[metric], row.id, model)
                if published is not None:
                    paper.append((size, published.value))
            if ours:
                ax.plot(*zip(*ours), marker="o", color=color, label=f"{row.label} (ours)")
                drawn = True
            if paper:
                ax.plot(*zip(*paper), marker="o", markerfacecolor="none", linestyle="--", color=color, alpha=0.6,
                        label=f"{row.label} (paper)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel(METRICS[metric].label)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6)
        if not drawn:
            ax.text(0.5, 0.02, "no records of ours yet (experiment=table5_llm_wikitext2)", transform=ax.transAxes,
                    ha="center", fontsize=7)
    fig.suptitle("Perplexity against model size (solid: ours, dashed: paper)")
    return fig


def _pareto(records, recipes):
    groups = defaultdict(list)
    for record in records:
        metric = primary_metric(record)
        model = model_key(record)
        if metric and model:
            groups[(model, metric)].append(record)
    keys = sorted(groups) or [None]
    fig, axes = _panels(keys)
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    all_methods = sorted({_series(r) for key in groups for r in groups[key]})
    color_of = {method: palette[i % len(palette)] for i, method in enumerate(all_methods)}  # one colour per series
    for ax, key in zip(axes, keys):
        if key is None:
            _empty(ax, "no finished records\n(python -m fqbench -m experiment=pareto)")
            continue
        model, metric = key
        spec = METRICS[metric]
        methods = sorted({_series(r) for r in groups[key]})
        points = []
        for method in methods:
            color = color_of[method]
            for record in groups[key]:
                if _series(record) != method:
                    continue
                y = metric_value(record, spec)
                if method == "fp" or record.get("bits_per_weight") is None:
                    ax.axhline(y, color="gray", linestyle=":", label="full precision")
                    continue
                x = record["bits_per_weight"]
                points.append((x, y))
                ax.scatter([x], [y], color=color, label=method, zorder=3)
                nominal = record.get("nominal_bits")
                if nominal is not None and abs(nominal - x) > 1e-6:
                    ax.scatter([nominal], [y], facecolors="none", edgecolors=color, zorder=3)
                    ax.plot([nominal, x], [y, y], color=color, linewidth=0.6, alpha=0.5)
        if "fp" not in methods:  # the FP baseline the quantized jobs measured themselves
            baselines = [v for v in (metric_value(r, spec, prefix="fp_") for r in groups[key]) if v is not None]
            if baselines:
                ax.axhline(sum(baselines) / len(baselines), color="gray", linestyle=":", label="full precision")
        front = _front(points, spec.higher_is_better)
        if front:
            ax.step(*zip(*front), where="post", color="black", linewidth=0.8, alpha=0.6, label="Pareto front")
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=7)
        _scale(ax, spec, [y for _, y in points])
        ax.set_xlabel("bits per weight (honest; hollow: nominal)")
        ax.set_ylabel(spec.label)
        ax.set_title(_model_label(model, [k for k, _ in keys]), fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle("Quality against honest bits per weight")
    return fig


def _series(record: dict) -> str:
    """A record's series in the Pareto figure: its method, told apart by a bit budget or the clip search."""
    method = record.get("method", "?")
    options = (record.get("config") or {}).get("method", {})
    if options.get("budget_bits") is not None:
        return f"{method} (budget)" if method != "gptq" else "gptq (mixed precision)"
    if options.get("clip_sigma") == "auto":
        return f"{method} (auto clip)"
    return method


def _front(points, higher_is_better: bool):
    """The points no other point beats with fewer or equal bits, by increasing bits."""
    front, best = [], None
    for x, y in sorted(points, key=lambda p: (p[0], -p[1] if higher_is_better else p[1])):
        if best is None or (y > best if higher_is_better else y < best):
            front.append((x, y))
            best = y
    return front


def _scale(ax, metric, values) -> None:
    """Perplexities spanning orders of magnitude (2-bit GPTQ) on a log axis; a narrow range stays linear."""
    values = [v for v in values if v is not None and v > 0]
    if not metric.higher_is_better and values and max(values) > 3 * min(values):
        ax.set_yscale("log")


def _panels(keys):
    count = len(keys)
    cols = min(count, 3)
    rows = -(-count // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[count:]:
        ax.set_visible(False)
    return fig, flat[:count]


def _empty(ax, note: str):
    ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def _model_label(key: str, keys=()) -> str:
    """``vit_s#ab12cd`` -> "ViT S"; the digest stays when one model option has several configs among ``keys``."""
    choice, _, digest = key.partition("#")
    name = " ".join(MODELS[choice]) if choice in MODELS else choice
    twins = {k for k in keys if k.partition("#")[0] == choice}
    return f"{name} ({digest})" if len(twins) > 1 else name
