"""``make bench``: run every benchmark and write BENCHMARKS.md.

Each figure is a ratio to an anchor measured in the same run on the same machine, never an
absolute number compared across runs. ``ZENITH_BENCH_QUICK=1`` runs small sizes (to check
that the benchmarks work; its figures are not the ones to record).
"""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path

from benchmarks import (
    bucket_bench,
    catchup_bench,
    export_bench,
    ingest_bench,
    pageserver_bench,
    real_push_bench,
    shallow_bench,
    storage_bench,
    transfer_bench,
)
from benchmarks.common import Section, machine

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    quick = os.environ.get("ZENITH_BENCH_QUICK") == "1"
    only = set(sys.argv[1:])
    benches = {
        "storage": lambda: storage_bench.run((64 << 20) if quick else (1 << 30)),
        "pageserver": lambda: pageserver_bench.run(2000 if quick else 20000),
        "transfer": lambda: transfer_bench.run((32 << 20) if quick else (1 << 30)),
        "ingest": lambda: ingest_bench.run(10 if quick else 60, 2 if quick else 10),
        "catch-up": lambda: catchup_bench.run(5 if quick else 30, 2 if quick else 10),
        "export": lambda: export_bench.run(2 if quick else 50),
        "real_push": lambda: real_push_bench.run(2 if quick else 25),
        "shallow": lambda: shallow_bench.run(5 if quick else 60, 2 if quick else 10),
        "bucket": lambda: bucket_bench.run((32 << 20) if quick else (1 << 30)),
    }
    load_before = os.getloadavg()[0]
    sections: list[Section] = []
    for name, bench in benches.items():
        if only and name not in only:
            continue
        print(f"== {name}", flush=True)
        sections.append(bench())
    if quick or only:
        print("(quick or partial run: BENCHMARKS.md left as it is)")
        return
    text = [
        "# Benchmarks",
        "",
        "Written by `make bench`. Every figure is a ratio to an anchor measured in the same "
        "run on the same machine.",
        "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- machine: {machine()}",
        f"- load average (1 min) before / after: {load_before:.1f} / {os.getloadavg()[0]:.1f}"
        " — above ~0.5 other work shared the 2 cores, and absolute figures drop with it;"
        " ratios are less affected since anchors run under the same load",
        "",
    ]
    text += [s.markdown() for s in sections]
    (ROOT / "BENCHMARKS.md").write_text("\n".join(text))
    print("wrote BENCHMARKS.md")


if __name__ == "__main__":
    main()
