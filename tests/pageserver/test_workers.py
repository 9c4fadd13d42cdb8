"""Worker pools (``zenith.pageserver.workers``): whole-state work of one user never delays
another user's quick commands, a user's long jobs are capped, and a cancelled digest stops
its thread at once.

The live tests share one pageserver whose branch ``big`` holds enough keys that a digest
takes a second or more; timings are compared with one digest measured in the same run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest

from tests.fixtures import PageserverProc, make_pageserver, stop_all
from zenith.errors import Cancelled
from zenith.lsn import Lsn
from zenith.pageserver.page_service import SYNTHETIC_REL
from zenith.pageserver.workers import LONG_PER_USER, LONG_THREADS, Workers
from zenith.postgres.keys import rel_block_key
from zenith.storage import Record, RecordKind, open_repository

KEYS = 600_000
READERS = {"r1": "pw-r1-secret", "r2": "pw-r2-secret", "r3": "pw-r3-secret"}


def _write_big(ps: PageserverProc) -> str:
    """Branch ``big``: KEYS small images. Returns its last LSN."""
    repo = open_repository(ps.config.db_path, durable=False)
    try:
        tid = repo.create_branch("big").timeline.timeline_id
        lsn = 0x1000
        step = 50_000
        for first in range(0, KEYS, step):
            lsn += 8
            repo.put_records(tid, (
                Record(rel_block_key(SYNTHETIC_REL, b), Lsn(lsn), RecordKind.IMAGE,
                       b.to_bytes(4, "big") * 8)
                for b in range(first, first + step)))
        return str(Lsn(lsn))
    finally:
        repo.close()


class Big:
    def __init__(self, ps: PageserverProc, lsn: str) -> None:
        self.ps = ps
        self.lsn = lsn
        self.one_digest = 0.0  # seconds for one digest alone, measured once

    def connect(self, user: str | None = None) -> psycopg.Connection[tuple[object, ...]]:
        uri = self.ps.uri() if user is None else self.ps.uri(user=user, password=READERS[user])
        return psycopg.connect(uri, autocommit=True, prepare_threshold=None)

    def workers(self) -> list[tuple[str, str, int, int, int]]:
        with self.connect() as conn:
            rows = conn.execute("workers").fetchall()
        return [(str(k), str(n), int(str(s)), int(str(r)), int(str(w))) for k, n, s, r, w in rows]

    def pool(self, name: str) -> tuple[int, int]:
        """(busy, queued) of a pool."""
        row = next(r for r in self.workers() if r[:2] == ("pool", name))
        return row[3], row[4]


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Big]:
    ps = make_pageserver(tmp_path_factory.mktemp("workers") / "ps")
    lsn = _write_big(ps)
    ps.start()
    for name, password in READERS.items():
        ps.add_user(name, password, "read")
    b = Big(ps, lsn)
    try:
        with b.connect("r3") as conn:
            start = time.perf_counter()
            conn.execute("digest big").fetchall()
            b.one_digest = time.perf_counter() - start
        yield b
    finally:
        stop_all([ps])


class Digests:
    """Digests of ``big`` running in threads, one connection each."""

    def __init__(self, big: Big, users: list[str]) -> None:
        self.conns = [big.connect(u) for u in users]
        self.errors: list[BaseException | None] = [None] * len(users)
        self.ended: list[float] = [0.0] * len(users)
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                        for i in range(len(users))]

    def _run(self, i: int) -> None:
        try:
            self.conns[i].execute("digest big").fetchall()
        except BaseException as exc:  # looked at by the test
            self.errors[i] = exc
        self.ended[i] = time.perf_counter()

    def __enter__(self) -> Digests:
        for t in self.threads:
            t.start()
        return self

    def running(self) -> int:
        return sum(t.is_alive() for t in self.threads)

    def cancel(self) -> None:
        for conn in self.conns:
            conn.cancel()

    def __exit__(self, *exc: object) -> None:
        self.cancel()
        for t in self.threads:
            t.join(60)
        for conn in self.conns:
            conn.close()


def _wait_for(what: str, check: object, timeout: float) -> float:
    """Poll ``check()`` until true; the seconds it took."""
    start = time.perf_counter()
    while not check():  # type: ignore[operator]
        assert time.perf_counter() - start < timeout, f"timed out waiting for {what}"
        time.sleep(0.02)
    return time.perf_counter() - start


def test_digests_do_not_delay_get_page(big: Big) -> None:
    """More digests (of two readers) than the long pool has threads; meanwhile the
    admin's get_page answers at once, not after a digest."""
    assert big.one_digest > 0.3, f"branch too small: one digest took {big.one_digest:.2f} s"
    key = rel_block_key(SYNTHETIC_REL, 7).hex()
    with big.connect() as admin:
        admin.execute(f"get_page big {big.lsn} {key}").fetchall()
        n = LONG_THREADS + 2  # > the long pool, and = the default executor's 6 threads
        users = [("r1", "r2")[i % 2] for i in range(n)]
        with Digests(big, users) as digests:
            time.sleep(min(1.0, big.one_digest / 3))
            start = time.perf_counter()
            rows = admin.execute(f"get_page big {big.lsn} {key}").fetchall()
            took = time.perf_counter() - start
            assert took < big.one_digest / 2, (
                f"get_page took {took:.2f} s while digests ran (one digest alone: "
                f"{big.one_digest:.2f} s)")
            print(f"\nget_page took {took * 1000:.1f} ms while {n} digests ran "
                  f"(one digest alone: {big.one_digest:.2f} s)")
            assert digests.running() == n, "the digests ended before get_page was timed"
            busy, queued = big.pool("long")
            assert busy == LONG_THREADS and queued == 0  # 2 more wait for their users' slots
        assert rows[0][0] == (7).to_bytes(4, "big") * 8


def test_user_cap(big: Big) -> None:
    """A reader's third digest waits for one of its own; another reader's starts at once."""
    with Digests(big, ["r1"] * (LONG_PER_USER + 1)) as mine:
        _wait_for("r1's digests", lambda: big.pool("long")[0] == LONG_PER_USER, 10)
        users = {r[1]: r for r in big.workers() if r[0] == "user"}
        assert users["r1"][2:] == (LONG_PER_USER, LONG_PER_USER, 1)
        with Digests(big, ["r2"]):
            _wait_for("r2's digest", lambda: big.pool("long")[0] == LONG_PER_USER + 1,
                      big.one_digest / 2)
            users = {r[1]: r for r in big.workers() if r[0] == "user"}
            assert users["r1"][3:] == (LONG_PER_USER, 1)
            assert users["r2"][3:] == (1, 0)
        assert mine.running() == LONG_PER_USER + 1


def test_cancelled_digest_stops_its_thread(big: Big) -> None:
    """Cancelled digests (CancelRequest, then a closed connection) free their threads
    and the user's slots at once, far sooner than a digest takes."""
    with Digests(big, ["r1"] * LONG_PER_USER) as digests:
        _wait_for("the digests", lambda: big.pool("long")[0] == LONG_PER_USER, 10)
        started = time.perf_counter()
        digests.cancel()
        took = _wait_for("the threads to stop", lambda: big.pool("long")[0] == 0,
                         big.one_digest * 3)
        assert took < big.one_digest / 2, f"threads ran on {took:.2f} s after the cancel"
        for t in digests.threads:
            t.join(10)
        assert all(isinstance(e, psycopg.errors.QueryCanceled) for e in digests.errors), \
            digests.errors
        assert all(end - started < big.one_digest / 2 for end in digests.ended)
        assert not [r for r in big.workers() if r[0] == "user" and r[1] == "r1"]


def test_disconnected_digest_stops_its_thread(big: Big) -> None:
    """A client that just goes away: its digest stops too."""
    conn = big.connect("r1")

    def run() -> None:
        with contextlib.suppress(psycopg.Error):
            conn.execute("digest big")

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    _wait_for("the digest", lambda: big.pool("long")[0] == 1, 10)
    # Shut the socket down under the running query (a dup: libpq keeps its own fd).
    with socket.socket(fileno=os.dup(conn.fileno())) as sock:
        sock.shutdown(socket.SHUT_RDWR)
    took = _wait_for("the thread to stop", lambda: big.pool("long")[0] == 0,
                     big.one_digest * 3)
    assert took < big.one_digest / 2, f"thread ran on {took:.2f} s after the disconnect"
    thread.join(10)
    conn.close()


# -- without a server ---------------------------------------------------------------------


def test_digest_stops_when_cancelled(tmp_path: object) -> None:
    repo = open_repository(f"{tmp_path}/r.db", durable=False)
    try:
        tid = repo.create_branch("b").timeline.timeline_id
        repo.put_records(tid, [Record(rel_block_key(SYNTHETIC_REL, b), Lsn(0x100),
                                      RecordKind.IMAGE, b"x" * 16) for b in range(20_000)])
        whole = repo.digest(tid, Lsn(0x100))
        assert repo.digest(tid, Lsn(0x100), cancel=threading.Event()) == whole
        stop = threading.Event()
        stop.set()
        with pytest.raises(Cancelled):
            repo.digest(tid, Lsn(0x100), cancel=stop)
        # Set while running: the iteration stops within a few hundred keys.
        stop = threading.Event()
        seen = 0
        with pytest.raises(Cancelled):
            for _ in repo.materialize(tid, Lsn(0x100), cancel=stop):
                seen += 1
                if seen == 1000:
                    stop.set()
        assert seen < 1000 + 300
    finally:
        repo.close()


def test_long_job_slot_freed_when_thread_stops() -> None:
    """A cancelled job's slot is held until its thread has stopped, then given to the
    user's next job (first come, first served); other users never wait for it."""
    workers = Workers(short_threads=1, long_threads=4, wal_threads=1, long_per_user=1)
    release = threading.Event()

    def blocked(cancel: threading.Event) -> str:
        while not cancel.is_set() and not release.is_set():
            time.sleep(0.005)
        if cancel.is_set():
            raise Cancelled("stopped")
        return "done"

    async def job(user: str) -> str:
        async with workers.long_job(user) as j:
            return await j.run(blocked, j.cancel)

    async def main() -> None:
        first = asyncio.create_task(job("a"))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(job("a"))
        other = asyncio.create_task(job("b"))
        await asyncio.sleep(0.05)
        assert workers.long.busy == 2  # a's first and b's; a's second waits
        assert ["user", "a", "1", "1", "1"] in workers.rows()
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        await asyncio.sleep(0.1)
        assert workers.long.busy == 2  # a's second took the slot
        release.set()
        assert await second == "done" and await other == "done"
        assert [r for r in workers.rows() if r[0] == "user"] == []

    try:
        asyncio.run(main())
    finally:
        workers.shutdown()
