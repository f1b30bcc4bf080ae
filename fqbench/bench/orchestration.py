"""What resuming costs: the skip check and the records index against plainly reading the same files.

``python -m fqbench.bench orchestration [--records 1000] [--layers 224]`` writes a
runs root of records shaped like Llama-2 7B jobs (224 per-layer records each),
then times, in this process: reading every ``result.json`` with ``json.load``
(the baseline), ``find_finished`` (what every job of a sweep does before it
starts), ``load`` (the pandas index) and ``write_record``. It prints each as
seconds and as a ratio to the baseline.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from fqbench.records import RECORD_NAME, config_hash, find_finished, load, write_record


def make_record(index: int, layers: int) -> dict:
    config = {"model": {"name": "meta-llama/Llama-2-7b-hf"}, "method": {"bits": 2, "redundancy": 1.1},
              "seed": index}
    return {"status": "ok", "config": config, "config_hash": config_hash(config), "method": "framequant",
            "metrics": {"wikitext2_ppl": 8.5, "c4_ppl": 11.2}, "bits_per_weight": 2.56, "nominal_bits": 2.2,
            "finished_at": f"2024-01-01T00:00:{index:06d}", "versions": {"torch": "2.4"},
            "layers": [{"name": f"model.layers.{i // 7}.linear{i % 7}", "shape": [4096, 4096], "proxy_error": 0.01,
                        "seconds": 1.0, "damping": 0.01, "bits_per_weight": 2.56, "nominal_bits": 2.2,
                        "effective_redundancy": 1.27, "extra": {}} for i in range(layers)]}


def timed(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fqbench.bench orchestration", description=__doc__)
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--layers", type=int, default=224, help="per-layer records in each record")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        records = [make_record(i, args.layers) for i in range(args.records)]
        write_seconds = timed(lambda: [write_record(root / "sweep" / str(i), r) for i, r in enumerate(records)], 1)
        paths = sorted(root.rglob(RECORD_NAME))
        size = sum(p.stat().st_size for p in paths)

        def read_all():
            for path in paths:
                with open(path) as f:
                    json.load(f)

        baseline = timed(read_all)
        missing = timed(lambda: find_finished(root, "not-there"))
        index = timed(lambda: load(root))
        print(f"{args.records} records of {args.layers} layers ({size / 1e6:.1f} MB)")
        print(f"{'json.load of every record (baseline)':<44} {baseline:8.3f} s  1.00x")
        print(f"{'find_finished (the skip check of one job)':<44} {missing:8.3f} s  {missing / baseline:.2f}x")
        print(f"{'load (pandas index)':<44} {index:8.3f} s  {index / baseline:.2f}x")
        print(f"{'write_record, per record (atomic, fsync)':<44} {write_seconds / args.records:8.4f} s")


if __name__ == "__main__":
    main()
