"""Issue 2's benchmark: 1 GiB of 8 KiB images written into one timeline and read back in
LSN order, against the same bytes written (with fsync) to and read from a plain file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from benchmarks.common import MiB, Section, timed
from zenith.lsn import Lsn
from zenith.storage import Record, RecordKind, open_repository

PAGE = 8192
BATCH = 2048  # records per transaction (16 MiB), the plain file is fsynced as often
#: Reads take a fraction of a second and the machine may be shared: each read is timed
#: over this many alternating passes (plain, repository, plain, ...) and the best pass of
#: each side counts. Interference only ever slows a pass down, so the best is the truest.
READ_PASSES = 3


def _pages(n: int) -> list[bytes]:
    # Distinct, incompressible-looking pages without paying for os.urandom per record.
    block = os.urandom(PAGE * 64)
    return [block[(i % 64) * PAGE : (i % 64 + 1) * PAGE] for i in range(n)]


def run(total_bytes: int = 1 << 30) -> Section:
    n = total_bytes // PAGE
    mib = n * PAGE / MiB
    pages = _pages(64)
    section = Section(
        "Storage: write and LSN-ordered read (issue 2)",
        f"{n:,} records of 8 KiB ({mib:.0f} MiB) into one timeline of the repository (SQLite "
        "index in WAL mode with synchronous=FULL, payloads in the timeline's append-only data "
        f"file, fdatasync before each commit; {BATCH} records a transaction), then read back "
        "in LSN order through `iter_records` as `Record` objects. Anchor: the same bytes "
        f"written to a plain file in 8 KiB writes with an fsync every {BATCH} records, and read "
        "back in 8 KiB reads. Both reads come from the page cache; each is the best of "
        f"{READ_PASSES} alternating passes.",
    )
    with tempfile.TemporaryDirectory(prefix="zenith-bench-", dir=os.environ.get("TMPDIR")) as d:
        plain = Path(d) / "plain"

        def write_plain() -> None:
            with open(plain, "wb", buffering=0) as f:
                for i in range(n):
                    f.write(pages[i % 64])
                    if (i + 1) % BATCH == 0:
                        os.fsync(f.fileno())
                os.fsync(f.fileno())

        def read_plain() -> int:
            total = 0
            with open(plain, "rb", buffering=0) as f:
                while chunk := f.read(PAGE):
                    total += len(chunk)
            return total

        repo = open_repository(Path(d) / "zenith.db")
        tid = repo.create_timeline().timeline_id

        def write_repo() -> None:
            for start in range(0, n, BATCH):
                end = min(n, start + BATCH)
                repo.put_records(
                    tid,
                    (
                        Record(
                            i.to_bytes(18, "big"), Lsn(8 * (i + 1)), RecordKind.IMAGE, pages[i % 64]
                        )
                        for i in range(start, end)
                    ),
                )

        def read_repo() -> int:
            total = 0
            for rec in repo.iter_records(tid, Lsn(0), Lsn(8 * (n + 1))):
                total += len(rec.payload)
            return total

        _, t_plain_w = timed(write_plain)
        _, t_repo_w = timed(write_repo)
        t_plain_r = t_repo_r = float("inf")
        for _ in range(READ_PASSES):
            got_plain, t = timed(read_plain)
            t_plain_r = min(t_plain_r, t)
            got_repo, t = timed(read_repo)
            t_repo_r = min(t_repo_r, t)
            assert got_plain == got_repo == n * PAGE
        repo.close()

    w_plain, w_repo = mib / t_plain_w, mib / t_repo_w
    r_plain, r_repo = mib / t_plain_r, mib / t_repo_r
    section.add("plain file write + fsync (anchor)", f"{w_plain:.0f} MiB/s", "1.00")
    section.add("repository write", f"{w_repo:.0f} MiB/s", f"{w_repo / w_plain:.2f}", ">= 0.5")
    section.add("plain file read (anchor)", f"{r_plain:.0f} MiB/s", "1.00")
    section.add(
        "repository LSN-ordered read", f"{r_repo:.0f} MiB/s", f"{r_repo / r_plain:.2f}", ">= 0.8"
    )
    return section


if __name__ == "__main__":
    import sys

    run(int(sys.argv[1]) if len(sys.argv) > 1 else 1 << 30)
