"""Hostile users against live pageservers: the limits of docs/limits.md hold, nothing a
client sends stalls the event loop for the others, and the repository is never changed.

A prober thread loops on ``status`` over its own connection while a hostile client does
its worst; its worst round trip is the figure docs/limits.md records.
"""

from __future__ import annotations

import asyncio
import shlex
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import psycopg
import pytest

from tests.fixtures import PageserverProc, make_pageserver, stop_all
from zenith.errors import (
    ConnectionFailed,
    InvalidArgument,
    LimitExceeded,
    SyntaxError_,
    TooManyConnections,
    ZenithError,
)
from zenith.lsn import Lsn
from zenith.pageserver.page_service import SYNTHETIC_REL, split_words
from zenith.pageserver.pidfile import running_pid
from zenith.pgwire.client import connect
from zenith.pgwire.messages import ErrorResponse
from zenith.postgres.keys import rel_block_key
from zenith.storage import Record, RecordKind, open_repository
from zenith.storage.redo import make_patch

#: A status round trip of another client may take at most this long (2 cores, shared).
MAX_DELAY = 0.2
CHAIN_OK, CHAIN_TOO_LONG, MAX_DELTA_CHAIN = 12_000, 16_000, 15_000


def _configure(ps: PageserverProc, **limits: object) -> None:
    with ps.config.updating() as doc:
        for name, value in limits.items():
            doc[name] = value


def _write_chains(ps: PageserverProc) -> tuple[str, str, str]:
    """Branch ``chain`` with two keys: an image then CHAIN_OK deltas, and an image then
    CHAIN_TOO_LONG deltas. Returns the keys in hex and the LSN to read at."""
    repo = open_repository(ps.config.db_path)
    try:
        tid = repo.create_branch("chain").timeline.timeline_id
        lsn = 0x1000
        keys = []
        for n, deltas in enumerate((CHAIN_OK, CHAIN_TOO_LONG)):
            key = rel_block_key(SYNTHETIC_REL, n)
            keys.append(key.hex())
            records = [Record(key, Lsn(lsn), RecordKind.IMAGE, bytes(8192))]
            for i in range(deltas):
                lsn += 8
                records.append(Record(key, Lsn(lsn), RecordKind.DELTA,
                                      make_patch([(i % 8000, i.to_bytes(4, "big"))])))
            lsn += 8
            repo.put_records(tid, records)
        return keys[0], keys[1], str(Lsn(lsn))
    finally:
        repo.close()


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PageserverProc]:
    """Small limits: 40 connections, 20 per user, 3 reserved for admins; 4 MiB queries."""
    ps = make_pageserver(tmp_path_factory.mktemp("limits") / "ps")
    _configure(ps, max_query_size=4 * 1024 * 1024, max_connections=40,
               max_connections_per_user=20, reserved_connections=3,
               max_delta_chain=MAX_DELTA_CHAIN)
    _write_chains(ps)
    ps.start()
    ps.cli("generate", "main", "--pages", "50", check=True)
    ps.add_user("r1", "pw-r1-secret", "read")
    ps.add_user("r2", "pw-r2-secret", "read")
    try:
        yield ps
    finally:
        stop_all([ps])


@pytest.fixture(scope="module")
def impatient(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PageserverProc]:
    """Default query size (1 MiB), idle timeout 1 s, statement timeout 2 s."""
    ps = make_pageserver(tmp_path_factory.mktemp("idle") / "ps")
    _configure(ps, idle_timeout=1, statement_timeout=2)
    ps.start()
    ps.cli("generate", "main", "--pages", "1", check=True)
    try:
        yield ps
    finally:
        stop_all([ps])


def _state(ps: PageserverProc) -> list[tuple[str | None, str]]:
    """Every branch and its digest: what no refused request may change."""
    return [(b["name"], ps.digest(str(b["name"]))) for b in ps.query("branch_list")]


class Prober(threading.Thread):
    """Loops on ``status`` over one psycopg connection; ``worst`` is the slowest round
    trip seen."""

    def __init__(self, ps: PageserverProc) -> None:
        super().__init__(daemon=True)
        self.conn = psycopg.connect(ps.uri(), autocommit=True, prepare_threshold=None)
        self.stop_event = threading.Event()
        self.times: list[float] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop_event.is_set():
                start = time.perf_counter()
                self.conn.execute("status").fetchall()
                self.times.append(time.perf_counter() - start)
                time.sleep(0.002)
        except BaseException as exc:  # reported by finish()
            self.error = exc

    def __enter__(self) -> Prober:
        self.start()
        deadline = time.monotonic() + 10
        while len(self.times) < 20:
            assert time.monotonic() < deadline and self.error is None, self.error
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.join(10)
        self.conn.close()
        assert self.error is None, self.error

    @property
    def worst(self) -> float:
        return max(self.times)

    def figures(self) -> str:
        times = sorted(self.times)
        return (f"worst {times[-1] * 1000:.1f} ms, p99 {times[len(times) * 99 // 100] * 1000:.1f}"
                f" ms over {len(times)} probes")


async def _expect(uri: str, sql: str, error: type[ZenithError]) -> ZenithError:
    async with await connect(uri, timeout=30) as conn:
        with pytest.raises(error) as info:
            await conn.simple_query(sql)
        await conn.simple_query("status")  # still usable
    return info.value


async def _oversized_query(uri: str, size: int) -> ErrorResponse:
    """Claim a Query of ``size`` bytes, send only its start, and return the answer: the
    server refuses from the header, without waiting for (or buffering) the text."""
    conn = await connect(uri, timeout=30)
    stream = conn._stream  # type: ignore[attr-defined]
    try:
        stream.write_raw(b"Q" + struct.pack("!I", 4 + size + 1) + b"status '")
        await stream.drain()
        answer = await asyncio.wait_for(stream.recv(), 10)
        assert isinstance(answer, ErrorResponse)
        with pytest.raises(ConnectionFailed):  # and the connection is closed
            await asyncio.wait_for(stream.recv(), 10)
        return answer
    finally:
        await conn.close()


def test_splitter_is_linear_and_matches_shlex() -> None:
    for text in ["a 'b c' \"d\\\"e\" f\\ g", "x '' \"\"", 'a"b"\'c\'d', "\"a\\b\\\\\"",
                 "tab\there\nnewline"]:
        assert split_words(text) == shlex.split(text), text
    for text in ["a 'b", 'a "b\\"', "a\\"]:
        with pytest.raises(SyntaxError_):
            split_words(text)
    for text in ["status '" + "a" * 2_000_000 + "'", "s " + "a\\ " * 300_000,
                 'status "' + "\\a" * 500_000 + '"', "status '" + "a" * 2_000_000]:
        start = time.perf_counter()
        with pytest.raises(SyntaxError_) if text.count("'") == 1 else nullcontext():
            split_words(text)
        assert time.perf_counter() - start < 2.0  # shlex: minutes for the first


def test_big_query_does_not_delay_others(limited: PageserverProc) -> None:
    before = _state(limited)
    uri = limited.uri(user="r1", password="pw-r1-secret")

    async def hostile() -> None:
        for _ in range(3):  # 2 MB: under this server's 4 MiB limit, split, refused
            err = await _expect(uri, "status '" + "a" * 2_000_000 + "'", SyntaxError_)
            assert "expected 0 arguments" in err.message
            await _expect(uri, "status " + "a\\ " * 600_000, SyntaxError_)
            await _expect(uri, 'status "' + "\\a" * 1_000_000 + '"', SyntaxError_)
        for _ in range(3):  # over the limit: FATAL 54000 from the header alone
            answer = await _oversized_query(uri, 5_000_000)
            assert answer.code == LimitExceeded.sqlstate
            assert "query text is too long" in answer.message

    with Prober(limited) as prober:
        asyncio.run(hostile())
    print(f"big query: other client's status round trip: {prober.figures()}")
    assert prober.worst < MAX_DELAY
    assert _state(limited) == before


def test_default_query_limit_is_1_mib(impatient: PageserverProc) -> None:
    answer = asyncio.run(_oversized_query(impatient.uri(), 2_000_000))
    assert answer.code == "54000" and "limit 1048576" in answer.message


def _rss_kib(ps: PageserverProc) -> int:
    pid = running_pid(ps.config.pid_path)
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def _raw_attempt(port: int) -> tuple[bytes, asyncio.StreamWriter | None]:
    """Open a TCP connection; what the server says within 2 s (nothing while it waits for
    a startup packet), and the writer to hold it open."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return b"", None
    try:
        data = await asyncio.wait_for(reader.read(1000), 2)
    except (TimeoutError, OSError):
        data = b""
    return data, writer


def test_thousand_connections(limited: PageserverProc) -> None:
    before = _state(limited)
    rss_before = _rss_kib(limited)
    uri_r1 = limited.uri(user="r1", password="pw-r1-secret")
    uri_r2 = limited.uri(user="r2", password="pw-r2-secret")

    async def main() -> dict[str, object]:
        held = []
        figures: dict[str, object] = {}
        try:
            # 20 of r1's connections, the 21st refused: per-user limit.
            held += [await connect(uri_r1) for _ in range(20)]
            with pytest.raises(TooManyConnections, match='too many connections for role "r1"'):
                await connect(uri_r1)
            # r2 takes the slots up to 40 - 3 reserved, then is refused.
            held += [await connect(uri_r2) for _ in range(17)]
            with pytest.raises(TooManyConnections, match="reserved for users with role"):
                await connect(uri_r2)
            # An admin still gets in (a reserved slot) ...
            admin = await connect(limited.uri())
            held.append(admin)
            # ... 1,000 more attempts at once, held open: 2 slots left, then refused.
            attempts = await asyncio.gather(*(_raw_attempt(limited.port)
                                              for _ in range(1000)))
            refused = sum(1 for data, _ in attempts
                          if data.startswith(b"E") and b"C53300" in data
                          and b"sorry, too many clients already" in data)
            waiting = sum(1 for data, w in attempts if not data and w is not None)
            figures.update(refused=refused, waiting=waiting)
            # The server answers its signed-in clients meanwhile.
            worst = 0.0
            for _ in range(50):
                start = time.perf_counter()
                await admin.simple_query("status")
                worst = max(worst, time.perf_counter() - start)
            figures["worst"] = worst
            figures["rss_held"] = _rss_kib(limited)
            for _, writer in attempts:
                if writer is not None:
                    writer.close()
        finally:
            for conn in held:
                await conn.close()
        # Slots come back once connections end.
        await asyncio.sleep(0.5)
        async with await connect(uri_r1) as again:
            await again.simple_query("status")
        return figures

    figures = asyncio.run(main())
    print(f"1,000 connections: {figures}, rss before {rss_before} KiB")
    assert figures["refused"] == 998 and figures["waiting"] == 2
    assert float(figures["worst"]) < MAX_DELAY  # type: ignore[arg-type]
    assert int(figures["rss_held"]) - rss_before < 100 * 1024  # type: ignore[call-overload]
    assert _state(limited) == before


def test_long_delta_chain_stays_off_the_loop(limited: PageserverProc) -> None:
    before = _state(limited)
    rows = limited.query("branch_list")
    at = str(next(r for r in rows if r["name"] == "chain")["last_record_lsn"])
    key_ok, key_long = (rel_block_key(SYNTHETIC_REL, n).hex() for n in (0, 1))
    uri = limited.uri(user="r1", password="pw-r1-secret")

    async def hostile() -> list[float]:
        took = []
        async with await connect(uri, timeout=30) as conn:
            for _ in range(3):
                start = time.perf_counter()
                res = await conn.simple_query(f"get_page chain {at} {key_ok}")
                took.append(time.perf_counter() - start)
                assert res.rows[0][0] is not None
            with pytest.raises(LimitExceeded, match=f"more than {MAX_DELTA_CHAIN} deltas"):
                await conn.simple_query(f"get_page chain {at} {key_long}")
        return took

    with Prober(limited) as prober:
        took = asyncio.run(hostile())
    print(f"delta chain of {CHAIN_OK}: get_page took {max(took) * 1000:.0f} ms; other "
          f"client's status round trip: {prober.figures()}")
    assert prober.worst < MAX_DELAY
    assert _state(limited) == before


@pytest.mark.parametrize("timeout", ["nan", "NaN", "inf", "-inf", "1e999", "-1", "x"])
def test_wait_refuses_bad_timeouts(limited: PageserverProc, timeout: str) -> None:
    async def main() -> None:
        err = await _expect(limited.uri(), f"wait main FFFFFFFF/FFFFFFFF {timeout}",
                            InvalidArgument)
        assert err.sqlstate == "22023" and "finite number of seconds" in err.message
        err = await _expect(limited.uri(), f"import nb postgresql://127.0.0.1:1/x {timeout}",
                            InvalidArgument)
        assert "finite number of seconds" in err.message

    before = _state(limited)
    start = time.monotonic()
    asyncio.run(main())
    assert time.monotonic() - start < 10
    assert _state(limited) == before


@pytest.fixture(scope="module")
def patient(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PageserverProc]:
    """No idle timeout (0), statement timeout 1 s."""
    ps = make_pageserver(tmp_path_factory.mktemp("patient") / "ps")
    _configure(ps, idle_timeout=0, statement_timeout=1)
    ps.start()
    ps.cli("generate", "main", "--pages", "1", check=True)
    try:
        yield ps
    finally:
        stop_all([ps])


def _last_lsn(ps: PageserverProc) -> Lsn:
    return Lsn.parse(str(ps.branch("main")["last_record_lsn"]))


def test_wait_outlasts_the_statement_timeout(patient: PageserverProc) -> None:
    """A wait longer than statement_timeout keeps the user's timeout: progress NOTICEs
    keep the connection, and WAL arriving after 2.5 s (statement timeout 1 s) ends it."""
    target = Lsn(int(_last_lsn(patient)) + 1)

    async def main() -> tuple[float, int, str]:
        async with await connect(patient.uri(), timeout=30) as conn:
            start = time.monotonic()
            waiting = asyncio.create_task(conn.simple_query(f"wait main {target} 30"))
            await asyncio.sleep(2.5)
            assert not waiting.done()
            async with await connect(patient.uri(), timeout=30) as writer:
                await writer.simple_query("generate main 1 1")
            result = await asyncio.wait_for(waiting, 20)
            took = time.monotonic() - start
            return took, len(result.notices), str(result.rows[0][1])

    took, notices, reached = asyncio.run(main())
    assert 2.4 < took < 15
    assert notices >= 3  # every half statement timeout
    assert Lsn.parse(reached) >= target


def test_wait_zero_checks_once(patient: PageserverProc) -> None:
    at = _last_lsn(patient)

    async def main() -> None:
        async with await connect(patient.uri(), timeout=30) as conn:
            for zero in ("0", "-0", "0.0"):
                res = await conn.simple_query(f"wait main {at} {zero}")
                assert Lsn.parse(str(res.rows[0][1])) >= at
                start = time.monotonic()
                with pytest.raises(ZenithError, match=r"timed out after 0 s") as info:
                    await conn.simple_query(f"wait main FFFFFFFF/FFFFFFFF {zero}")
                assert info.value.sqlstate == "55000"
                assert time.monotonic() - start < 1
        for zero in ("0", "-0"):  # import's timeout must still be above 0
            err = await _expect(patient.uri(), f"import nb postgresql://127.0.0.1:1/x {zero}",
                                InvalidArgument)
            assert "finite number of seconds above 0" in err.message

    asyncio.run(main())


def test_idle_timeout_zero_is_off(patient: PageserverProc) -> None:
    async def main() -> None:
        async with await connect(patient.uri(), timeout=30) as conn:
            await conn.simple_query("status")
            await asyncio.sleep(3)  # idle, and past the statement timeout too
            await conn.simple_query("status")

    asyncio.run(main())


def _longest_run(text: str, char: str) -> int:
    best = run = 0
    for c in text:
        run = run + 1 if c == char else 0
        best = max(best, run)
    return best


def test_long_input_is_echoed_truncated(limited: PageserverProc) -> None:
    """Errors quote at most ~200 characters of what a client sent, however long it is."""
    long = "q" * 100_000
    cases = [long, f"digest {long}", f"digest {long}@0/1", f"wait {long} 0/1 0",
             f"branch_create {long}", f"branch_create x {long}@0/1",
             f"get_page {long} 0/1 00", f"generate main {long} 1", f"detach {long}",
             f"timeline_delete {long}", f"wait main {long}", f"user_add {long} read x"]

    async def main() -> None:
        async with await connect(limited.uri(), timeout=30) as conn:
            for sql in cases:
                with pytest.raises(ZenithError) as info:
                    await conn.simple_query(sql)
                err = info.value
                for text in (err.message, err.detail or "", err.hint or ""):
                    assert _longest_run(text, "q") <= 200, (sql[:30], text[:300])
                    assert len(text) < 1000, (sql[:30], text[:300])

    before = _state(limited)
    asyncio.run(main())
    assert _state(limited) == before


async def _refused_from_header(uri: str, kind: bytes, size: int) -> ErrorResponse:
    conn = await connect(uri, timeout=30)
    stream = conn._stream  # type: ignore[attr-defined]
    try:
        stream.write_raw(kind + struct.pack("!I", size + 4) + bytes(1000))
        await stream.drain()
        answer = await asyncio.wait_for(stream.recv(), 10)
        assert isinstance(answer, ErrorResponse)
        with pytest.raises(ConnectionFailed):
            await asyncio.wait_for(stream.recv(), 10)
        return answer
    finally:
        await conn.close()


def test_big_messages_after_sign_in_are_not_buffered(limited: PageserverProc) -> None:
    """Parse/Bind over max_query_size (4 MiB here) are refused from the header; 60 MiB
    CopyData outside a COPY, sent whole on 8 connections at once, is dropped as it arrives:
    the server's RSS does not grow by what they sent."""
    uri = limited.uri(user="r1", password="pw-r1-secret")
    rss_before = _rss_kib(limited)

    async def flood(big: bytes) -> None:
        async with await connect(uri, timeout=30) as conn:
            stream = conn._stream  # type: ignore[attr-defined]
            stream.write_copy_data(big)
            await stream.drain()
            await conn.simple_query("status")  # answered after all of it: usable

    async def main() -> int:
        for kind in (b"P", b"B"):
            answer = await _refused_from_header(uri, kind, 60 * 1024 * 1024)
            assert (answer.severity, answer.code) == ("FATAL", LimitExceeded.sqlstate)
            assert "limit 4194304" in answer.message
        answer = await _refused_from_header(uri, b"D", 1024 * 1024)
        assert answer.code == "08P01" and "limit 65535" in answer.message
        big = bytes(60 * 1024 * 1024)
        await asyncio.gather(*(flood(big) for _ in range(8)))
        return _rss_kib(limited)

    before = _state(limited)
    with Prober(limited) as prober:
        rss_after = asyncio.run(main())
    print(f"480 MiB of CopyData outside COPY: rss {rss_before} -> {rss_after} KiB; other "
          f"client's status round trip: {prober.figures()}")
    assert rss_after - rss_before < 40 * 1024
    assert prober.worst < MAX_DELAY
    assert _state(limited) == before


def test_idle_timeout_closes_a_signed_in_connection(impatient: PageserverProc) -> None:
    async def main() -> None:
        conn = await connect(impatient.uri(), timeout=30)
        try:
            await conn.simple_query("status")
            stream = conn._stream  # type: ignore[attr-defined]
            start = time.monotonic()
            answer = await asyncio.wait_for(stream.recv(), 10)
            assert 0.9 < time.monotonic() - start < 5
            assert isinstance(answer, ErrorResponse)
            assert (answer.severity, answer.code) == ("FATAL", "57P05")
            assert "idle-session timeout" in answer.message
            with pytest.raises(ConnectionFailed):
                await asyncio.wait_for(stream.recv(), 10)
        finally:
            await conn.close()
        # A busy connection is not idle: commands 0.5 s apart keep it open.
        async with await connect(impatient.uri(), timeout=30) as busy:
            for _ in range(5):
                await busy.simple_query("status")
                await asyncio.sleep(0.5)

    asyncio.run(main())
