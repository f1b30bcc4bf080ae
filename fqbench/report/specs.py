"""The paper's tables as data: what each cell measures, with rows and columns read off the presets.

A table names the experiment preset that fills it; its rows and columns are that preset's sweep
(models, variants, swept config values), so a table and its preset never disagree. A cell selects
records by model (the ``model`` config group choice), by variant (a ``conf/variant`` option: a
method and its options, i.e. one paper row), by config overrides (``calib.nsamples=32``) and reads
one metric. Row and column ids are the keys of the paper's numbers in ``data/paper_numbers.csv``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from fqbench.config import CONF_DIR


@dataclass(frozen=True)
class Metric:
    path: str  # dotted path inside a record's ``metrics``; ``fp_<path>``: the FP baseline measured in the same job
    label: str
    scale: float = 1.0  # multiplies the recorded value (fractions -> percent)
    higher_is_better: bool = True
    section: str = "metrics"  # the record key the path starts from ("packed": the saved checkpoint's sizes)


METRICS = {
    "top1": Metric("top1", "ImageNet top-1 (%)"),
    "wikitext2": Metric("wikitext2_ppl", "WikiText-2 perplexity", higher_is_better=False),
    "c4": Metric("c4_ppl", "C4 perplexity", higher_is_better=False),
    "ptb": Metric("ptb_ppl", "PTB perplexity", higher_is_better=False),
    "pystdlib": Metric("pystdlib_ppl", "Python stdlib held-out perplexity", higher_is_better=False),
    **{task: Metric(f"{task}_acc", f"{task} accuracy (%)", scale=100.0)
       for task in ("arc_challenge", "arc_easy", "boolq", "hellaswag", "piqa", "winogrande")},
    # Sizes of the packed checkpoint a save=true job wrote, measured from its files (fqbench.packing.sizes).
    "packed_gb": Metric("bytes", "packed checkpoint (GB)", scale=1e-9, higher_is_better=False, section="packed"),
    "fp16_gb": Metric("fp16_bytes", "FP16 checkpoint (GB)", scale=1e-9, higher_is_better=False, section="packed"),
    "packed_bits": Metric("bits_per_weight", "bits per quantized weight, from the files", higher_is_better=False,
                          section="packed"),
    # Throughput of `python -m fqbench.bench inference --records DIR` (static KV cache, CUDA graphs).
    "decode_b1": Metric("decode_b1_tokens_per_s", "batch-1 decode (tokens/s)"),
    "decode_b16": Metric("decode_b16_tokens_per_s", "batch-16 decode (tokens/s)"),
    "prefill": Metric("prefill_tokens_per_s", "prefill 1x2048 (tokens/s)"),
    "decode_b1_vs_fp16": Metric("decode_b1_vs_fp16", "batch-1 decode / FP16"),
}


@dataclass(frozen=True)
class Line:
    """A row or a column: an id, a label and what it selects (model, variant, metric, overrides)."""

    id: str
    label: str
    select: dict = field(default_factory=dict)
    cells: tuple[str, ...] = ()  # extra header cells of a row (#bits, ablation switches)


@functools.lru_cache(maxsize=None)
def preset_axes(preset: str) -> dict[str, list[str]]:
    """The sweep of an experiment preset (``conf/experiment/<preset>.yaml``): ``{key: [values]}`` in order."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    path = CONF_DIR / "experiment" / f"{preset}.yaml"
    if not path.is_file():
        raise ValueError(f"table preset {preset!r} has no file {path}")
    params = OmegaConf.load(path).hydra.sweeper.params
    parser = OverridesParser.create()
    axes = {}
    for key, value in params.items():
        override = parser.parse_override(f"{key}={value}")
        axes[str(key)] = (list(override.sweep_string_iterator()) if override.is_sweep_override()
                          else [override.get_value_element_as_str()])
    return axes


# The paper's label and bits column for each variant (a row of the paper's tables); which variants a
# table shows, and in which order, is its preset's sweep.
VARIANT_LABELS = {
    "fp": ("Full-Precision", "32"),
    "ptq4vit_w2": ("PTQ4ViT", "2"),
    "ptq4vit_w3": ("PTQ4ViT", "3"),
    "gptq_w2": ("GPTQ", "2"),
    "gptq_clip_w2": ("GPTQ with clipping", "2"),
    "quip_w2": ("QuIP", "2"),
    "quip_clip_w2": ("QuIP (with our clip)", "2"),
    "quipsharp_w2": ("QuIP# (no fine-tuning)", "2"),
    "quipsharp_w3": ("QuIP# (no fine-tuning)", "3"),
    "quipsharp_w4": ("QuIP# (no fine-tuning)", "4"),
    "fq_w2_r1.0": ("FrameQuant (r = 1.0)", "2"),
    "fq_w2_r1.0_noclip": ("FrameQuant (r = 1.0, no clip)", "2"),
    "fq_w2_r1.1": ("FrameQuant (r = 1.1)", "2.2"),
    "fq_w2_r1.25": ("FrameQuant (r = 1.25)", "2.5"),
    "fq_w2_r1.5": ("FrameQuant (r = 1.5)", "3"),
    "fq_w2_r1.0_a8": ("FrameQuant", "W2/A8"),
    "fq_w2_r1.1_a8": ("FrameQuant", "W2.2/A8"),
    "fq_w2_r1.0_a6": ("FrameQuant", "W2/A6"),
    "fq_w2_r1.1_a6": ("FrameQuant", "W2.2/A6"),
    "gptq_w3": ("GPTQ", "3"),
    **{f"repq_w{w}a{a}": ("RepQ-ViT", f"W{w}/A{a}") for w, a in ((6, 6), (4, 4), (3, 4))},
    **{f"repq_fq_w{w}a{a}": ("FrameQuant", f"W{w}/A{a}") for w, a in ((6, 6), (4, 4), (3, 4))},
}


def variant_label(variant: str) -> tuple[str, str]:
    return VARIANT_LABELS.get(variant, (variant, ""))


class Axis:
    """Lines of a table read off its preset's sweep (``axes``: ``preset_axes``)."""

    def lines(self, axes: dict[str, list[str]]) -> tuple[Line, ...]:
        raise NotImplementedError


@dataclass(frozen=True)
class ModelColumns(Axis):
    def lines(self, axes):
        return tuple(Line(name, MODELS[name][1] if name in MODELS else name, {"model": name}) for name in axes["model"])


@dataclass(frozen=True)
class VariantRows(Axis):
    cells: dict = field(default_factory=dict)  # variant -> header cells replacing its bits (ablation switches)
    fp_bits: str = "32"

    def lines(self, axes):
        rows = []
        for variant in axes["variant"]:
            label, bits = variant_label(variant)
            if variant == "fp":
                bits = self.fp_bits
            rows.append(Line(variant, label, {"variant": variant}, tuple(self.cells.get(variant, (bits,)))))
        return tuple(rows)


@dataclass(frozen=True)
class OverrideRows(Axis):
    """One row per value of a swept config key (the preset's one variant)."""

    key: str

    def lines(self, axes):
        (variant,) = axes["variant"]
        return tuple(Line(value, value, {"variant": variant, "overrides": (f"{self.key}={value}",)})
                     for value in axes[self.key])


@dataclass(frozen=True)
class ModelVariantRows(Axis):
    """One row per model and variant (the model as the row header, the variant's label beside it)."""

    labels: dict = field(default_factory=dict)  # variant -> this table's label for it

    def lines(self, axes):
        return tuple(Line(f"{model}:{variant}", " ".join(MODELS.get(model, (model, ""))),
                          {"model": model, "variant": variant},
                          (self.labels.get(variant, variant_label(variant)[0]),))
                     for model in axes["model"] for variant in axes["variant"])


@dataclass(frozen=True)
class SizeRows(Axis):
    """Paper Table 6: the FP16 original (read off any packed record), then each variant's size and bits."""

    def lines(self, axes):
        variants = axes["variant"]
        rows = [Line("fp16", "Original model (FP16)", {"variant": variants[-1], "metric": "fp16_gb"}, ("16",))]
        for variant in variants:
            label, bits = variant_label(variant)
            rows += [Line(f"{variant}:{metric}", f"{label}{suffix}", {"variant": variant, "metric": metric}, (bits,))
                     for metric, suffix in (("packed_gb", ""), ("packed_bits", ": bits per weight"))]
        return tuple(rows)


@dataclass(frozen=True)
class ModelMetricColumns(Axis):
    """For each model of the axes, one column per metric."""

    metrics: tuple[tuple[str, str], ...]

    def lines(self, axes):
        return tuple(Line(f"{model}:{metric}", label, {"model": model, "metric": metric})
                     for model in axes["model"] for metric, label in self.metrics)


@dataclass(frozen=True)
class MetricColumns(Axis):
    metrics: tuple[tuple[str, str], ...]  # (metric id, label)

    def lines(self, axes):
        return tuple(Line(metric, label, {"metric": metric}) for metric, label in self.metrics)


@dataclass(frozen=True)
class TableSpec:
    id: str
    title: str
    preset: str  # the conf/experiment preset whose sweep fills it and defines its rows and columns, or a command
    row_axis: Axis
    column_axis: Axis = ModelColumns()
    row_header: tuple[str, ...] = ("Method", "#bits")
    select: dict = field(default_factory=dict)  # table-wide selection (the metric, or the model)
    axes_from: str | None = None  # "module:ATTRIBUTE" holding the axes when a benchmark, not a preset, fills it

    @property
    def axes(self) -> dict[str, list[str]]:
        if self.axes_from is not None:
            import importlib

            module, _, attribute = self.axes_from.partition(":")
            return getattr(importlib.import_module(module), attribute)
        return preset_axes(self.preset)

    @property
    def rows(self) -> tuple[Line, ...]:
        return self.row_axis.lines(self.axes)

    @property
    def columns(self) -> tuple[Line, ...]:
        return self.column_axis.lines(self.axes)

    @property
    def groups(self) -> tuple[tuple[str, int], ...]:
        """Column groups (label, number of columns): model families, as the paper's headers."""
        if not isinstance(self.column_axis, (ModelColumns, ModelMetricColumns)):
            return ()
        groups: list[list] = []
        for column in self.columns:
            model = column.select["model"]
            family = (MODELS.get(model, (model, ""))[0] if isinstance(self.column_axis, ModelColumns)
                      else " ".join(MODELS.get(model, (model, ""))))
            if groups and groups[-1][0] == family:
                groups[-1][1] += 1
            else:
                groups.append([family, 1])
        return tuple((label, span) for label, span in groups)

    def selection(self, row: Line, column: Line) -> dict:
        return {**self.select, **row.select, **column.select}


# Model config names -> (family, short label), as the paper's column headers.
MODELS = {
    "vit_t": ("ViT", "T"), "vit_s": ("ViT", "S"), "vit_s32": ("ViT", "S/32"), "vit_b": ("ViT", "B"),
    "vit_l": ("ViT", "L"), "vit_h": ("ViT", "H"),
    "deit_t": ("DeiT", "T"), "deit_s": ("DeiT", "S"), "deit_b": ("DeiT", "B"),
    "deit3_s": ("DeiT III", "S"), "deit3_b": ("DeiT III", "B"), "deit3_l": ("DeiT III", "L"), "deit3_h": ("DeiT III", "H"),
    "swin_t": ("Swin", "T"), "swin_s": ("Swin", "S"), "swin_b": ("Swin", "B"), "swin_b384": ("Swin", "B/384"), "swin_l": ("Swin", "L"),
    "opt_125m": ("OPT", "125M"), "opt_350m": ("OPT", "350M"), "opt_1.3b": ("OPT", "1.3B"),
    "opt_2.7b": ("OPT", "2.7B"), "opt_6.7b": ("OPT", "6.7B"),
    "llama2_7b": ("Llama2", "7B"), "llama2_13b": ("Llama2", "13B"), "llama2_70b": ("Llama2", "70B"),
}

# Parameter counts of the paper's language models (the x axis of perplexity against model size).
MODEL_SIZES = {"opt_125m": 125e6, "opt_350m": 350e6, "opt_1.3b": 1.3e9, "opt_2.7b": 2.7e9, "opt_6.7b": 6.7e9,
               "llama2_7b": 7e9, "llama2_13b": 13e9, "llama2_70b": 70e9}
# The language-model rows of the paper's LLM tables (the perplexity-against-size figure draws them).
LLM_PRESET = "table5_llm_wikitext2"
DOWNSTREAM_TASKS = (("arc_challenge", "ARC (challenge)"), ("arc_easy", "ARC (easy)"), ("boolq", "BoolQ"),
                    ("hellaswag", "HellaSwag"), ("piqa", "PIQA"), ("winogrande", "WinoGrande"))
THROUGHPUT = (("decode_b1", "decode, batch 1 (tok/s)"), ("decode_b1_vs_fp16", "vs FP16"),
              ("decode_b16", "decode, batch 16 (tok/s)"), ("prefill", "prefill 1x2048 (tok/s)"))
ABLATION_SWITCHES = {  # paper Table 3's ON/OFF columns: GPTQ, TFF, clip, redundancy
    "gptq_w2": ("ON", "OFF", "OFF", "OFF"), "fq_w2_r1.0_noclip": ("ON", "ON", "OFF", "OFF"),
    "fq_w2_r1.0": ("ON", "ON", "ON", "OFF"), "fq_w2_r1.1": ("ON", "ON", "ON", "ON"), "fp": ("", "", "", ""),
}

TABLES: dict[str, TableSpec] = {t.id: t for t in (
    TableSpec("table1", "ImageNet-1K top-1 accuracy of 2-bit weight-only quantized vision transformers",
              "table1_vit", VariantRows(), select={"metric": "top1"}),
    TableSpec("table2", "ImageNet-1K top-1 accuracy of large vision transformers", "table2_vit_large", VariantRows(),
              select={"metric": "top1"}),
    TableSpec("table3", "Ablation: GPTQ, + tight fusion frames, + clipping, + redundancy (top-1)", "table3_ablation",
              VariantRows(cells=ABLATION_SWITCHES), row_header=("", "GPTQ", "TFF", "clip", "Redundancy"),
              select={"metric": "top1"}),
    TableSpec("table5", "WikiText-2 perplexity (seqlen 2048) of 2-bit quantized LLMs", LLM_PRESET,
              VariantRows(fp_bits="16"), select={"metric": "wikitext2"}),
    TableSpec("table8", "Redundancy sweep: 2-bit FrameQuant at increasing redundancy (top-1)", "table8_redundancy",
              VariantRows(fp_bits="-"), row_header=("Redundancy", "bits"), select={"metric": "top1"}),
    TableSpec("table9", "Calibration set size: 2-bit FrameQuant at r = 1.1 (top-1)", "table9_calibration",
              OverrideRows("calib.nsamples"), row_header=("#images",), select={"metric": "top1"}),
    TableSpec("table10", "Clipping in weight space (GPTQ + clip) against frame space (FrameQuant), 2 bits",
              "table10_clip_space",
              ModelVariantRows({"gptq_w2": "GPTQ without clipping", "gptq_clip_w2": "GPTQ with clipping",
                                "fq_w2_r1.0": "FrameQuant with clipping"}),
              MetricColumns((("wikitext2", "WikiText2"), ("c4", "C4"))), row_header=("Model", "Quantization method")),
    TableSpec("table11", "Activation quantization in frame space: FrameQuant weights W2/W2.2 with 8- and 6-bit "
              "activations (top-1)", "table11_activations", VariantRows(fp_bits="W32/A32"),
              row_header=("Method", "bits"), select={"metric": "top1"}),
    TableSpec("table12", "RepQ-ViT alone and with FrameQuant backbone weights, on classification models (top-1; "
              "the paper's Table 12 uses Swin-T detection backbones on COCO)", "table12_repq",
              VariantRows(cells={"fp": ("W32/A32", "W32/A32"),
                                 **{v: (VARIANT_LABELS[v][1], "W32/A32") for v in VARIANT_LABELS if v.startswith("repq")}}),
              row_header=("Method", "Precision of backbone", "Precision of rest"), select={"metric": "top1"}),
    TableSpec("table13", "C4 perplexity of 2-bit quantized LLMs", "table13_llm_c4", VariantRows(fp_bits="16"),
              select={"metric": "c4"}),
    TableSpec("table6", "Sizes of packed checkpoints (GB on disk, from the files) against the FP16 original",
              "table6_sizes", SizeRows(), row_header=("Model", "#bits")),
    TableSpec("table14", "Llama2-7B zero-shot accuracy (%) on downstream tasks (lm-evaluation-harness)",
              "table14_downstream", VariantRows(fp_bits="16"), MetricColumns(DOWNSTREAM_TASKS),
              select={"model": "llama2_7b"}),
    TableSpec("table7", "Inference throughput of Llama 2 shapes (random weights; static KV cache and CUDA graphs "
              "for every variant; the GPU is named in each record)",
              "python -m fqbench.bench inference --shape 7b|13b --records DIR", VariantRows(fp_bits="16"),
              ModelMetricColumns(THROUGHPUT), axes_from="fqbench.bench.inference:TABLE7_AXES"),
)}
