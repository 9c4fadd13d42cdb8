"""Crash safety: a writer killed with SIGKILL at random moments leaves exactly the batches it
committed, and every read afterwards matches the model (the records of every committed
batch folded in LSN order, as tests.storage.model folds them)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.storage.crash_writer import KEYS, TIMELINE, batch
from zenith.lsn import Lsn
from zenith.storage import RecordKind, open_repository
from zenith.storage.datafile import file_name
from zenith.storage.redo import apply_delta

ROOT = Path(__file__).resolve().parents[2]
TRIALS = 24


def _run_and_kill(db: Path, delay: float) -> int:
    """Start the writer, kill it after ``delay`` seconds, return the last batch it reported."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.storage.crash_writer", str(db)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    reported = [0]

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            reported[0] = int(line.split()[1])

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    t.join(timeout=10)
    return reported[0]


def _fold(values: dict[bytes, bytes | None], n: int) -> dict[bytes, bytes | None]:
    """The value of every key after batch ``n``, from its value after batch ``n - 1``: the
    model's fold (``Model.value``: an image sets, a tombstone clears, a delta applies) of the
    batch's records. The test keeps the values after each batch it reaches instead of keeping
    every record and folding them all again from batch 1 for each read (the writer commits
    thousands of batches; refolding them took most of the test's time)."""
    out = dict(values)
    for rec in sorted(batch(n), key=lambda r: r.lsn):
        if rec.kind is RecordKind.IMAGE:
            out[rec.key] = rec.payload
        elif rec.kind is RecordKind.TOMBSTONE:
            out[rec.key] = None
        else:
            out[rec.key] = apply_delta(out[rec.key], rec.payload)
    return out


def test_sigkill_leaves_exactly_the_committed_batches(tmp_path: Path) -> None:
    rng = random.Random(20261125)
    db = tmp_path / "crash.db"
    nothing: dict[bytes, bytes | None] = {k.to_bytes(18, "big"): None for k in range(KEYS)}
    # the model: the values after batch 1, after the batch before the last and after the last
    first, before, after = nothing, nothing, nothing
    applied = 0
    for trial in range(TRIALS):
        reported = max(_run_and_kill(db, rng.uniform(0.2, 0.7)), applied)
        repo = open_repository(db)
        try:
            last = repo.get_timeline(TIMELINE).last_record_lsn
        except Exception:
            assert reported == 0, f"trial {trial}: batches reported but no timeline"
            repo.close()
            continue
        # The batch in flight may have committed before its line was printed.
        assert last % 1000 == 7, f"trial {trial}: last_record_lsn {last} is not a batch end"
        committed = last // 1000
        assert committed in (reported, reported + 1), (trial, reported, committed)
        for n in range(applied + 1, committed + 1):
            before, after = after, _fold(after, n)
            if n == 1:
                first = after
        applied = committed
        # The bytes of a batch in flight are gone from the data file.
        internal, data_end = (
            repo._conn()
            .execute("SELECT id, data_end FROM timelines WHERE timeline_id = ?", (bytes(TIMELINE),))
            .fetchone()
        )
        data_file = repo.data_dir / file_name(TIMELINE, internal)
        assert data_file.stat().st_size == data_end, f"trial {trial}: uncommitted bytes left"
        # Nothing beyond the committed batches is visible, not even through the LSN index.
        assert repo.count_records(TIMELINE, Lsn(0), Lsn(1 << 62))[0] == committed * KEYS
        expected = {last: after, max(1000 * committed - 1000, 0) + 7: before, 1007: first}
        for lsn, values in expected.items():
            if lsn > last:
                continue
            for k in range(KEYS):
                key = k.to_bytes(18, "big")
                assert repo.get_value(TIMELINE, key, Lsn(lsn)) == values[key]
        repo.close()
    assert applied > 5, "the writer never got far enough for the test to mean anything"
