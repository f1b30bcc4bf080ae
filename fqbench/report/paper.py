"""The paper's published numbers, as package data with their table ids.

``data/paper_numbers.csv`` holds every number the FrameQuant paper's text gives
and, for cells the text lost, the full tables of the authors' repository README;
each value keeps the spelling it was published with (``5.7e3``). Cells nobody
published are absent: ``paper_value`` returns None for them, never a guess.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources


@dataclass(frozen=True)
class PaperValue:
    text: str  # as printed
    source: str  # "paper" or "FrameQuant README"

    @property
    def value(self) -> float:
        return float(self.text)


@lru_cache(maxsize=1)
def paper_numbers() -> dict[tuple[str, str, str], PaperValue]:
    """``{(table, row, column): PaperValue}`` for every published cell."""
    text = resources.files("fqbench.report").joinpath("data/paper_numbers.csv").read_text()
    lines = [line for line in io.StringIO(text) if not line.startswith("#")]
    numbers = {}
    for row in csv.DictReader(lines):
        key = (row["table"], row["row"], row["column"])
        if key in numbers:
            raise ValueError(f"paper_numbers.csv: cell {key} appears twice")
        numbers[key] = PaperValue(row["value"], row["source"])
    return numbers


def paper_value(table: str, row: str, column: str) -> PaperValue | None:
    return paper_numbers().get((table, row, column))
