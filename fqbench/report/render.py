"""Tables in the paper's layout as Markdown, LaTeX and CSV: every cell is ours, the paper's value, the difference."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass

from fqbench.report.match import Cell, Recipes, fill
from fqbench.report.paper import paper_value
from fqbench.report.specs import TableSpec

MISSING = "–"
FLAG = "⚠"
# A full-precision cell this far from the paper's measures a different setup (tokenizer, context length,
# evaluation text, checkpoint), not quantization: the report flags it (docs/lm.md, "Tokenizers").
FP_TOLERANCE = 0.05


@dataclass
class FilledTable:
    spec: TableSpec
    cells: dict[tuple[str, str], Cell]  # (row id, column id) -> cell

    def cell(self, row: str, column: str) -> Cell:
        return self.cells[(row, column)]


def build(spec: TableSpec, records: list[dict], recipes: Recipes | None = None) -> FilledTable:
    recipes = recipes or Recipes()
    cells = {}
    for row in spec.rows:
        for column in spec.columns:
            cell = fill(spec.selection(row, column), records, recipes)
            cell.paper = paper_value(spec.id, row.id, column.id)
            cell.flagged = (row.select.get("variant") == "fp" and cell.diff is not None and cell.paper.value
                            and abs(cell.diff) > FP_TOLERANCE * abs(cell.paper.value))
            cells[(row.id, column.id)] = cell
    return FilledTable(spec, cells)


def number(value: float | None) -> str:
    """As the paper prints: two decimals, or ``5.7e3`` from 1000 on."""
    if value is None:
        return MISSING
    if not math.isfinite(value):
        return str(value)
    if abs(value) >= 1000:
        mantissa, exponent = f"{value:.1e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    return f"{value:.2f}"


def signed(value: float | None) -> str:
    return MISSING if value is None else ("+" if value >= 0 else "−") + number(abs(value))


def cell_text(cell: Cell) -> str:
    """``ours / paper (ours − paper)``; an empty string when neither exists."""
    if cell.ours is None and cell.paper is None:
        return ""
    paper = cell.paper.text if cell.paper else MISSING
    text = f"{number(cell.ours)} / {paper}"
    text = text + f" ({signed(cell.diff)})" if cell.diff is not None else text
    return text + f" {FLAG}" if cell.flagged else text


def to_markdown(table: FilledTable) -> str:
    spec = table.spec
    lines = [f"**{spec.id}**: {spec.title}. Each cell: ours / paper (ours − paper); {MISSING}: not measured or "
             f"not published. " + (f"Filled by: `{spec.preset}`." if spec.axes_from else
                                   f"Preset: `python -m fqbench -m experiment={spec.preset}`."), ""]
    header = list(spec.row_header) + [_column_label(spec, c) for c in spec.columns]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for row in spec.rows:
        cells = [row.label, *row.cells][: len(spec.row_header)]
        cells += [cell_text(table.cell(row.id, c.id)) for c in spec.columns]
        lines.append("| " + " | ".join(cells) + " |")
    if any(cell.flagged for cell in table.cells.values()):
        lines += ["", f"{FLAG} full precision more than {FP_TOLERANCE:.0%} away from the paper's: a different tokenizer, "
                      "context length, evaluation text or checkpoint (records carry `tokenizer` and `eval_tokens`; "
                      "docs/lm.md, \"Tokenizers change the numbers\")."]
    return "\n".join(lines) + "\n"


def to_latex(table: FilledTable) -> str:
    spec = table.spec
    width = len(spec.row_header)
    out = [f"% {spec.id}: {spec.title}", "% each cell: ours / paper (ours - paper)",
           "\\begin{tabular}{" + "l" * width + "c" * len(spec.columns) + "}", "\\toprule"]
    if spec.groups:
        group_cells = [f"\\multicolumn{{{span}}}{{c}}{{{_tex(label)}}}" for label, span in spec.groups]
        out.append(" & " * width + " & ".join(group_cells) + " \\\\")
        start, rules = width + 1, []
        for _, span in spec.groups:
            rules.append(f"\\cmidrule(lr){{{start}-{start + span - 1}}}")
            start += span
        out.append(" ".join(rules))
    out.append(" & ".join(_tex(h) for h in spec.row_header) + " & "
               + " & ".join(_tex(c.label) for c in spec.columns) + " \\\\")
    out.append("\\midrule")
    for row in spec.rows:
        cells = [_tex(x) for x in [row.label, *row.cells][:width]]
        cells += [_tex(cell_text(table.cell(row.id, c.id))) for c in spec.columns]
        out.append(" & ".join(cells) + " \\\\")
    out += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(out) + "\n"


def to_csv(table: FilledTable) -> str:
    """The paper's layout with three columns per paper column: ours, paper, diff."""
    spec = table.spec
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    header = list(spec.row_header)
    for column in spec.columns:
        label = _column_label(spec, column)
        header += [f"{label} ours", f"{label} paper", f"{label} diff"]
    writer.writerow(header)
    for row in spec.rows:
        cells = [row.label, *row.cells][: len(spec.row_header)]
        for column in spec.columns:
            cell = table.cell(row.id, column.id)
            cells += [_raw(cell.ours), cell.paper.text if cell.paper else "", _raw(cell.diff)]
        writer.writerow(cells)
    return buffer.getvalue()


def to_long_csv(table: FilledTable) -> str:
    """One line per cell with its ids, sources and the records behind it."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["table", "row", "column", "ours", "paper", "diff", "paper_source", "n_records", "records", "note"])
    for row in table.spec.rows:
        for column in table.spec.columns:
            cell = table.cell(row.id, column.id)
            writer.writerow([table.spec.id, row.id, column.id, _raw(cell.ours), cell.paper.text if cell.paper else "",
                             _raw(cell.diff), cell.paper.source if cell.paper else "", len(cell.records),
                             ";".join(cell.records), cell.source])
    return buffer.getvalue()


def _column_label(spec: TableSpec, column) -> str:
    family = next((label for label, span, first in _group_starts(spec) if first <= spec.columns.index(column) < first + span),
                  None)
    return f"{family} {column.label}" if family else column.label


def _group_starts(spec: TableSpec):
    first = 0
    for label, span in spec.groups:
        yield label, span, first
        first += span


def _raw(value: float | None) -> str:
    return "" if value is None else repr(value)


def _tex(text: str) -> str:
    for plain, escaped in (("\\", "\\textbackslash{}"), ("&", "\\&"), ("%", "\\%"), ("_", "\\_"), ("#", "\\#"),
                           ("−", "$-$"), ("–", "--")):
        text = text.replace(plain, escaped)
    return text
