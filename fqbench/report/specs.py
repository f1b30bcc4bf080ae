"""The paper's tables as data: rows, columns and what each cell measures.

A cell selects records by model (the ``model`` config group choice), by variant
(a ``conf/variant`` option: a method and its options, i.e. one paper row), by
config overrides (``calib.nsamples=32``) and reads one metric. Row and column
ids are the keys of the paper's numbers in ``data/paper_numbers.csv``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
}


@dataclass(frozen=True)
class Line:
    """A row or a column: an id, a label and what it selects (model, variant, metric, overrides)."""

    id: str
    label: str
    select: dict = field(default_factory=dict)
    cells: tuple[str, ...] = ()  # extra header cells of a row (#bits, ablation switches)


@dataclass(frozen=True)
class TableSpec:
    id: str
    title: str
    preset: str  # the conf/experiment preset whose sweep fills it
    rows: tuple[Line, ...]
    columns: tuple[Line, ...]
    row_header: tuple[str, ...] = ("Method", "#bits")
    groups: tuple[tuple[str, int], ...] = ()  # column groups: (label, number of columns)
    select: dict = field(default_factory=dict)  # table-wide selection (the metric)

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


def model_columns(*names: str) -> tuple[tuple[Line, ...], tuple[tuple[str, int], ...]]:
    columns = tuple(Line(name, MODELS[name][1], {"model": name}) for name in names)
    groups: list[list] = []
    for name in names:
        family = MODELS[name][0]
        if groups and groups[-1][0] == family:
            groups[-1][1] += 1
        else:
            groups.append([family, 1])
    return columns, tuple((label, span) for label, span in groups)


def rows(*entries) -> tuple[Line, ...]:
    """``(variant, label, *cells)`` -> row lines selecting that variant."""
    return tuple(Line(variant, label, {"variant": variant}, tuple(cells)) for variant, label, *cells in entries)


MAIN_ROWS = rows(
    ("fp", "Full-Precision", "32"),
    ("ptq4vit_w2", "PTQ4ViT", "2"),
    ("gptq_w2", "GPTQ", "2"),
    ("quip_w2", "QuIP", "2"),
    ("quip_clip_w2", "QuIP (with our clip)", "2"),
    ("fq_w2_r1.0", "FrameQuant (r = 1.0)", "2"),
    ("fq_w2_r1.1", "FrameQuant (r = 1.1)", "2.2"),
    ("ptq4vit_w3", "PTQ4ViT", "3"),
)
LLM_ROWS = rows(
    ("fp", "Full-Precision", "16"),
    ("gptq_w2", "GPTQ", "2"),
    ("quip_w2", "QuIP", "2"),
    ("fq_w2_r1.0", "FrameQuant (r = 1.0)", "2"),
    ("fq_w2_r1.1", "FrameQuant (r = 1.1)", "2.2"),
)
SMALL_VISION = ("vit_s", "vit_b", "vit_h", "deit3_s", "deit3_b", "deit3_h", "swin_s", "swin_b", "swin_l")
CALIBRATION_SIZES = (32, 64, 128, 256, 512)
TABLE8_REDUNDANCIES = ("1.0", "1.1", "1.25", "1.5")
CLIP_THRESHOLDS = (1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0)


def _table(id, title, preset, rows, models, **kwargs) -> TableSpec:
    columns, groups = model_columns(*models)
    return TableSpec(id, title, preset, rows, columns, groups=groups, **kwargs)


TABLES: dict[str, TableSpec] = {t.id: t for t in (
    _table("table1", "ImageNet-1K top-1 accuracy of 2-bit weight-only quantized vision transformers",
           "table1_vit", MAIN_ROWS,
           ("vit_t", "vit_s", "vit_s32", "vit_b", "deit_t", "deit_s", "deit_b", "swin_s", "swin_b", "swin_b384"),
           select={"metric": "top1"}),
    _table("table2", "ImageNet-1K top-1 accuracy of large vision transformers", "table2_vit_large", MAIN_ROWS,
           ("vit_l", "vit_h", "deit3_l", "deit3_h", "swin_l"), select={"metric": "top1"}),
    _table("table3", "Ablation: GPTQ, + tight fusion frames, + clipping, + redundancy (top-1)", "table3_ablation",
           rows(("gptq_w2", "", "ON", "OFF", "OFF", "OFF"),
                ("fq_w2_r1.0_noclip", "", "ON", "ON", "OFF", "OFF"),
                ("fq_w2_r1.0", "", "ON", "ON", "ON", "OFF"),
                ("fq_w2_r1.1", "", "ON", "ON", "ON", "ON"),
                ("fp", "Full Precision", "", "", "", "")),
           SMALL_VISION, row_header=("", "GPTQ", "TFF", "clip", "Redundancy"), select={"metric": "top1"}),
    _table("table5", "WikiText-2 perplexity (seqlen 2048) of 2-bit quantized LLMs", "table5_llm_wikitext2",
           LLM_ROWS, ("opt_125m", "opt_1.3b", "opt_2.7b", "opt_6.7b", "llama2_7b", "llama2_70b"),
           select={"metric": "wikitext2"}),
    _table("table8", "Redundancy sweep: 2-bit FrameQuant at increasing redundancy (top-1)", "table8_redundancy",
           rows(("fp", "Full Precision", "-"),
                *((f"fq_w2_r{r}", f"r = {r}", f"{2 * float(r):g}") for r in TABLE8_REDUNDANCIES)),
           SMALL_VISION, row_header=("Redundancy", "bits"), select={"metric": "top1"}),
    _table("table9", "Calibration set size: 2-bit FrameQuant at r = 1.1 (top-1)", "table9_calibration",
           tuple(Line(str(n), str(n), {"variant": "fq_w2_r1.1", "overrides": (f"calib.nsamples={n}",)})
                 for n in CALIBRATION_SIZES),
           SMALL_VISION, row_header=("#images",), select={"metric": "top1"}),
    TableSpec("table10", "Clipping in weight space (GPTQ + clip) against frame space (FrameQuant), 2 bits",
              "table10_clip_space",
              tuple(Line(f"{model}:{variant}", MODELS[model][0] + " " + MODELS[model][1],
                         {"model": model, "variant": variant}, (label,))
                    for model in ("llama2_7b", "llama2_70b")
                    for variant, label in (("gptq_w2", "GPTQ without clipping"), ("gptq_clip_w2", "GPTQ with clipping"),
                                           ("fq_w2_r1.0", "FrameQuant with clipping"))),
              (Line("wikitext2", "WikiText2", {"metric": "wikitext2"}), Line("c4", "C4", {"metric": "c4"})),
              row_header=("Model", "Quantization method")),
    _table("table11", "Activation quantization in frame space: FrameQuant weights W2/W2.2 with 8- and 6-bit "
           "activations (top-1)", "table11_activations",
           rows(("fp", "Full Precision", "W32/A32"),
                ("fq_w2_r1.0", "FrameQuant", "W2/A32"), ("fq_w2_r1.1", "FrameQuant", "W2.2/A32"),
                ("fq_w2_r1.0_a8", "FrameQuant", "W2/A8"), ("fq_w2_r1.1_a8", "FrameQuant", "W2.2/A8"),
                ("fq_w2_r1.0_a6", "FrameQuant", "W2/A6"), ("fq_w2_r1.1_a6", "FrameQuant", "W2.2/A6")),
           ("vit_s", "vit_b"), row_header=("Method", "bits"), select={"metric": "top1"}),
    _table("table12", "RepQ-ViT alone and with FrameQuant backbone weights, on classification models (top-1; "
           "the paper's Table 12 uses Swin-T detection backbones on COCO)", "table12_repq",
           rows(("fp", "Full Precision", "W32/A32", "W32/A32"),
                *((f"{variant}_w{w}a{a}", label, f"W{w}/A{a}", "W32/A32")
                  for w, a in ((6, 6), (4, 4), (3, 4))
                  for variant, label in (("repq", "RepQ-ViT"), ("repq_fq", "FrameQuant")))),
           ("vit_s", "vit_b", "deit_t", "deit_s", "deit_b", "swin_t", "swin_s"),
           row_header=("Method", "Precision of backbone", "Precision of rest"), select={"metric": "top1"}),
    _table("table13", "C4 perplexity of 2-bit quantized LLMs", "table13_llm_c4", LLM_ROWS,
           ("opt_125m", "opt_350m", "opt_1.3b", "opt_2.7b", "opt_6.7b", "llama2_7b", "llama2_70b"),
           select={"metric": "c4"}),
    _table("table6", "Sizes of packed checkpoints (GB on disk, from the files) against the FP16 original",
           "table6_sizes",
           (Line("fp16", "Original model (FP16)", {"variant": "fq_w2_r1.1", "metric": "fp16_gb"}, ("16",)),
            *(Line(f"{variant}:{metric}", f"{label}{suffix}", {"variant": variant, "metric": metric}, (bits,))
              for variant, label, bits in (("gptq_w2", "GPTQ", "2"), ("fq_w2_r1.0", "FrameQuant (r = 1.0)", "2"),
                                           ("fq_w2_r1.1", "FrameQuant (r = 1.1)", "2.2"))
              for metric, suffix in (("packed_gb", ""), ("packed_bits", ": bits per weight")))),
           ("llama2_7b", "llama2_13b"), row_header=("Model", "#bits")),
    TableSpec("table14", "Llama2-7B zero-shot accuracy (%) on downstream tasks (lm-evaluation-harness)",
              "table14_downstream", LLM_ROWS,
              tuple(Line(task, label, {"metric": task}) for task, label in (
                  ("arc_challenge", "ARC (challenge)"), ("arc_easy", "ARC (easy)"), ("boolq", "BoolQ"),
                  ("hellaswag", "HellaSwag"), ("piqa", "PIQA"), ("winogrande", "WinoGrande"))),
              select={"model": "llama2_7b"}),
)}
