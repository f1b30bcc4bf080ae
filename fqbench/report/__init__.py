"""The paper's tables and figures from run records, with the published numbers beside ours.

    python -m fqbench.report RUNS_DIR --table table1     # Markdown, LaTeX and CSV of one table
    python -m fqbench.report RUNS_DIR --all              # every table and figure

In Python: ``build(TABLES["table1"], finished_records(root))`` then ``to_markdown``,
``to_latex``, ``to_csv``; ``write_figures(records, out_dir)``.
"""

from fqbench.report.figures import FIGURES, write_figures
from fqbench.report.match import Cell, Recipes, finished_records
from fqbench.report.paper import PaperValue, paper_numbers, paper_value
from fqbench.report.render import build, to_csv, to_latex, to_long_csv, to_markdown
from fqbench.report.specs import METRICS, TABLES, TableSpec

__all__ = ["FIGURES", "METRICS", "TABLES", "Cell", "PaperValue", "Recipes", "TableSpec", "build", "finished_records",
           "paper_numbers", "paper_value", "to_csv", "to_latex", "to_long_csv", "to_markdown", "write_figures",
           "write_table"]


def write_table(table, out_dir) -> list:
    """``<id>.md``, ``<id>.tex``, ``<id>.csv`` (the paper's layout) and ``<id>_cells.csv`` (one line per cell)."""
    from pathlib import Path

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for suffix, render in ((".md", to_markdown), (".tex", to_latex), (".csv", to_csv), ("_cells.csv", to_long_csv)):
        path = out_dir / f"{table.spec.id}{suffix}"
        path.write_text(render(table))
        paths.append(path)
    return paths
