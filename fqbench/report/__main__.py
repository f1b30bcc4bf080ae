"""``python -m fqbench.report RUNS_DIR [--table ID ...] [--figure NAME ...] [--all] [--out DIR]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fqbench.report import FIGURES, TABLES, Recipes, build, finished_records, write_figures, write_table
from fqbench.report.render import to_markdown


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fqbench.report",
                                     description="The paper's tables (ours / paper / difference) and figures from run records.")
    parser.add_argument("runs", type=Path, help="runs root: every result.json below it is read")
    parser.add_argument("--table", action="append", default=[], choices=sorted(TABLES), metavar="ID",
                        help=f"a table to write (repeatable): {', '.join(TABLES)}")
    parser.add_argument("--figure", action="append", default=[], choices=FIGURES, metavar="NAME",
                        help=f"a figure to write (repeatable): {', '.join(FIGURES)}")
    parser.add_argument("--all", action="store_true", help="every table and every figure")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: RUNS/report)")
    args = parser.parse_args(argv)
    if not args.runs.is_dir():
        parser.error(f"runs folder {args.runs} does not exist")
    tables = list(TABLES) if args.all else args.table
    figures = list(FIGURES) if args.all else args.figure
    if not tables and not figures:
        parser.error("name at least one --table or --figure, or use --all")
    out = args.out or args.runs / "report"
    records = finished_records(args.runs)
    print(f"{len(records)} finished records under {args.runs}", file=sys.stderr)
    recipes = Recipes()
    for table_id in tables:
        table = build(TABLES[table_id], records, recipes)
        paths = write_table(table, out)
        print(to_markdown(table))
        print(f"wrote {', '.join(map(str, paths))}", file=sys.stderr)
    for path in write_figures(records, out / "figures", figures, recipes):
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
