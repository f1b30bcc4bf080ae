"""``python -m fqbench.bench <benchmark> [options]``; ``--help`` on a benchmark lists its options."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "layers": "fqbench.bench.layers",
    "inference": "fqbench.bench.inference",
    "lm_memory": "fqbench.bench.lm_memory",
    "lm_samples": "fqbench.bench.lm_samples",
    "orchestration": "fqbench.bench.orchestration",
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in BENCHMARKS:
        names = ", ".join(BENCHMARKS)
        given = f"unknown benchmark {argv[0]!r}; " if argv and not argv[0].startswith("-") else ""
        sys.exit(f"{given}usage: python -m fqbench.bench {{{names}}} [options]")
    importlib.import_module(BENCHMARKS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    main()
