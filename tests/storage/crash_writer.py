"""Child process of the crash test: writes deterministic batches and reports each commit.

Run as ``python -m tests.storage.crash_writer DB``; prints ``committed N`` after batch N
is committed, until it is killed.
"""

from __future__ import annotations

import random
import sys

from zenith.ids import TimelineId
from zenith.lsn import Lsn
from zenith.storage import Record, RecordKind, open_repository
from zenith.storage.redo import make_patch

TIMELINE = TimelineId(bytes(range(16)))
KEYS = 40
BATCHES = 10_000


def batch(n: int) -> list[Record]:
    """Batch n (from 1) at LSN 1000*n: every key gets an image, a delta or a tombstone."""
    rng = random.Random(n)
    out = []
    for k in range(KEYS):
        key = k.to_bytes(18, "big")
        roll = rng.random()
        if roll < 0.3 or n == 1:
            payload = rng.randbytes(2048)
            out.append(Record(key, Lsn(1000 * n), RecordKind.IMAGE, payload))
        elif roll < 0.9:
            patch = make_patch([(rng.randrange(4096), rng.randbytes(64))])
            out.append(Record(key, Lsn(1000 * n), RecordKind.DELTA, patch))
        else:
            out.append(Record(key, Lsn(1000 * n), RecordKind.TOMBSTONE))
    return out


def main() -> None:
    repo = open_repository(sys.argv[1])
    try:
        start = repo.get_timeline(TIMELINE).last_record_lsn // 1000 + 1
    except Exception:
        repo.create_timeline(TIMELINE)
        start = 1
    for n in range(start, BATCHES):
        repo.put_records(TIMELINE, batch(n), Lsn(1000 * n + 7))
        print(f"committed {n}", flush=True)


if __name__ == "__main__":
    main()
