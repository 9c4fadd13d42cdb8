"""The replication client against a real PostgreSQL 15: the server's own views and files are
the oracles (``pg_control_system()``, ``pg_replication_slots``, ``pg_stat_replication``, the
data directory and the WAL segments in ``pg_wal``)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from zenith.errors import AlreadyExists, ConnectionFailed, InvalidArgument, LsnOutOfRange
from zenith.lsn import Lsn
from zenith.pgwire.client import connect
from zenith.postgres.basebackup import (
    EntryType,
    RelationSegment,
    RelMapFile,
    SpecialFile,
    SpecialKind,
    TarReader,
    VersionFile,
    classify_path,
)
from zenith.postgres.keys import ForkNumber
from zenith.postgres.replication import (
    ReplicationConnection,
    ReplicationNotPermitted,
    ReplicationUnavailable,
    SlotNotFound,
    WalRemoved,
    connect_replication,
)

from ..pgcluster import PG_USER, PGBIN, PgCluster

pytestmark = [
    pytest.mark.skipif(not (PGBIN / "postgres").exists(), reason="PostgreSQL 15 not installed"),
    pytest.mark.timeout(120),
]

SETTINGS = {
    "wal_level": "replica",
    "max_wal_senders": "5",
    "max_replication_slots": "5",
    "wal_consistency_checking": "'all'",
    # Short, so that unanswered keepalives would end a stream within the test.
    "wal_sender_timeout": "'3s'",
    # Nothing may touch the tables whose files are compared with the backup.
    "autovacuum": "off",
}
SEGMENT = 16 * 1024 * 1024


@pytest.fixture(scope="module")
def pg() -> Iterator[PgCluster]:
    with PgCluster(settings=SETTINGS) as cluster:
        yield cluster


async def rows(pg: PgCluster, sql: str) -> list[list[str | None]]:
    async with await connect(pg.uri(), timeout=10) as conn:
        return (await conn.simple_query(sql)).rows


async def scalar(pg: PgCluster, sql: str) -> str:
    value = (await rows(pg, sql))[0][0]
    assert value is not None
    return value


async def replication(pg: PgCluster, user: str = "postgres") -> ReplicationConnection:
    return await connect_replication(pg.uri(user=user), timeout=10)


async def test_identify_system(pg: PgCluster) -> None:
    async with await replication(pg) as rc:
        before = Lsn.parse(await scalar(pg, "SELECT pg_current_wal_flush_lsn()"))
        info = await rc.identify_system()
        after = Lsn.parse(await scalar(pg, "SELECT pg_current_wal_flush_lsn()"))
    assert info.systemid == int(await scalar(
        pg, "SELECT system_identifier FROM pg_control_system()"))
    assert info.timeline == int(await scalar(pg, "SELECT timeline_id FROM pg_control_checkpoint()"))
    assert before <= info.xlogpos <= after
    assert info.dbname is None  # a physical replication connection has no database


async def test_show_and_source_settings(pg: PgCluster) -> None:
    async with await replication(pg) as rc:
        assert await rc.show("wal_level") == "replica"
        assert await rc.show("wal_consistency_checking") == "all"
        assert await rc.show("block_size") == "8192"
        assert await rc.show("server_version_num") == await scalar(pg, "SHOW server_version_num")
        settings = await rc.source_settings()
        with pytest.raises(InvalidArgument):
            await rc.show("wal_level; DROP TABLE x")
    assert settings.server_version_num // 10000 == 15
    assert settings.wal_segment_size == SEGMENT
    assert settings.data_checksums is False
    assert settings.problems() == []
    weak = type(settings)(150000, "replica", "", False, SEGMENT, 8192)
    assert any("wal_consistency_checking" in p for p in weak.problems())


async def slot_row(pg: PgCluster, name: str) -> list[str | None] | None:
    found = await rows(pg, "SELECT slot_type, restart_lsn, active FROM pg_replication_slots "
                           f"WHERE slot_name = '{name}'")
    return found[0] if found else None


async def test_slots(pg: PgCluster) -> None:
    async with await replication(pg) as rc:
        restart = await rc.create_physical_slot("zs_reserved")
        assert restart is not None
        assert await slot_row(pg, "zs_reserved") == ["physical", str(restart), "f"]
        slot = await rc.read_slot("zs_reserved")
        assert slot is not None and slot.restart_lsn == restart and slot.restart_tli == 1
        assert slot.slot_type == "physical"

        assert await rc.create_physical_slot("zs_lazy", reserve_wal=False) is None
        assert await slot_row(pg, "zs_lazy") == ["physical", None, "f"]
        lazy = await rc.read_slot("zs_lazy")
        assert lazy is not None and lazy.restart_lsn is None
        with pytest.raises(AlreadyExists):
            await rc.create_physical_slot("zs_lazy")

        await rc.drop_slot("zs_reserved")
        await rc.drop_slot("zs_lazy")
        assert await slot_row(pg, "zs_reserved") is None
        assert not await rc.slot_exists("zs_lazy")
        assert await rc.read_slot("zs_lazy") is None
        with pytest.raises(SlotNotFound):
            await rc.drop_slot("zs_lazy")
        await rc.drop_slot("zs_lazy", missing_ok=True)
        for bad in ("Upper", "with space", "x" * 64, "a;b"):
            with pytest.raises(InvalidArgument):
                await rc.create_physical_slot(bad)
        assert (await rc.identify_system()).timeline == 1  # still usable after errors


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# What BASE_BACKUP leaves out of the archives (basebackup.c): the contents of these
# directories, and these files.
EXCLUDED_DIRS = ("pg_wal", "pg_replslot", "pg_stat_tmp", "pg_dynshmem", "pg_notify",
                 "pg_serial", "pg_snapshots", "pg_subtrans")
EXCLUDED_FILES = ("postmaster.pid", "postmaster.opts", "backup_label", "tablespace_map")


def expected_files(datadir: Path, tablespaces: dict[int, Path]) -> set[str]:
    found = set()
    roots = [(datadir, "")] + [(loc, f"pg_tblspc/{oid}/") for oid, loc in tablespaces.items()]
    for root, prefix in roots:
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                rel = prefix + os.path.relpath(os.path.join(dirpath, name), root)
                top = rel.split("/")[0]
                if (top in EXCLUDED_DIRS or rel in EXCLUDED_FILES
                        or name.startswith("pg_internal.init") or "pgsql_tmp" in rel):
                    continue
                found.add(rel)
    return found


async def test_base_backup(pg: PgCluster) -> None:
    location = pg.base / "zts"
    location.mkdir()
    if os.geteuid() == 0:
        shutil.chown(location, PG_USER, PG_USER)
    await rows(pg, f"CREATE TABLESPACE zts LOCATION '{location}'")
    await rows(pg, "CREATE TABLE t_static AS SELECT g AS id, repeat('x', 100) AS v "
                   "FROM generate_series(1, 5000) g")
    await rows(pg, "CREATE TABLE t_ts TABLESPACE zts AS SELECT generate_series(1, 3000) g")
    await rows(pg, "SELECT count(*) FROM t_static UNION ALL SELECT count(*) FROM t_ts")
    await rows(pg, "CHECKPOINT")  # the pages, hint bits set, are on disk and stay as they are
    spcoid = int(await scalar(pg, "SELECT oid FROM pg_tablespace WHERE spcname = 'zts'"))
    dboid = int(await scalar(pg, "SELECT oid FROM pg_database WHERE datname = 'postgres'"))
    static_path = await scalar(pg, "SELECT pg_relation_filepath('t_static')")
    ts_path = await scalar(pg, "SELECT pg_relation_filepath('t_ts')")

    received: dict[str, hashlib._Hash] = {}
    sizes: dict[str, int] = {}
    types: dict[str, EntryType] = {}
    total = 0
    async with await replication(pg) as rc:
        tracemalloc.start()
        try:
            async with await rc.base_backup(label="zenith test") as backup:
                async for piece in backup.files():
                    if piece.offset == 0:
                        assert piece.path not in types, f"{piece.path} sent twice"
                        types[piece.path] = piece.type
                        sizes[piece.path] = piece.size
                        received[piece.path] = hashlib.sha256()
                    received[piece.path].update(piece.chunk)
                    total += len(piece.chunk)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert (await rc.identify_system()).timeline == 1  # the connection is usable again
    files = {p for p, t in types.items() if t is EntryType.FILE}

    assert total > 20_000_000
    assert peak < 4_000_000, f"{peak} bytes of Python memory at the peak of the backup"
    assert backup.end_lsn is not None and backup.start_lsn <= backup.end_lsn
    assert backup.timeline == backup.end_timeline == 1
    assert [(a.name, a.spcoid, a.location) for a in backup.archives] == [  # base.tar last
        (f"{spcoid}.tar", spcoid, str(location)), ("base.tar", None, None)]
    assert {t.spcoid for t in backup.tablespaces} == {spcoid, None}

    # Every file of the data directory and the tablespace arrived, and nothing else.
    expected = expected_files(pg.datadir, {spcoid: location})
    assert expected - files == set()
    assert files - expected <= {"backup_label", "tablespace_map"}
    assert "backup_label" in files
    assert types["pg_wal"] is EntryType.DIRECTORY
    assert not any(p.startswith("pg_wal/") and types[p] is EntryType.FILE for p in types)

    # Files that do not change while the cluster runs are byte for byte the same.
    stable = ["PG_VERSION", f"base/{dboid}/PG_VERSION", "global/pg_filenode.map",
              f"base/{dboid}/pg_filenode.map", "pg_hba.conf", "postgresql.conf",
              static_path, ts_path]
    for path in stable:
        on_disk = pg.datadir / path
        assert sizes[path] == on_disk.stat().st_size, path
        assert received[path].hexdigest() == sha256(on_disk), path
    assert sizes[static_path] > 8192 * 50

    assert classify_path(static_path) == RelationSegment(
        static_path, 1663, dboid, int(static_path.rsplit("/", 1)[1]), ForkNumber.MAIN, 0)
    ts_kind = classify_path(ts_path)
    assert isinstance(ts_kind, RelationSegment) and ts_kind.spcnode == spcoid
    assert ts_kind.dbnode == dboid
    assert classify_path("global/pg_filenode.map") == RelMapFile("global/pg_filenode.map",
                                                                 1664, 0)
    assert isinstance(classify_path(f"base/{dboid}/PG_VERSION"), VersionFile)
    assert classify_path("tablespace_map") == SpecialFile("tablespace_map",
                                                          SpecialKind.TABLESPACE_MAP)
    kinds = {type(classify_path(p)).__name__ for p in files}
    assert {"RelationSegment", "SlruSegment", "RelMapFile", "VersionFile"} <= kinds


async def test_backup_label_and_chunks(pg: PgCluster) -> None:
    """The raw chunk interface: the backup_label names the start LSN and the label."""
    reader, label = TarReader(), b""
    async with await replication(pg) as rc, \
            await rc.base_backup(label="it's zenith", progress=True) as backup:
        async for archive, chunk in backup:
            if archive != "base.tar":
                continue
            for piece in reader.feed(chunk):
                if piece.path == "backup_label":
                    label += piece.chunk
    reader.close()
    text = label.decode()
    assert f"START WAL LOCATION: {backup.start_lsn} " in text
    assert "LABEL: it's zenith" in text
    assert backup.bytes_done > 0
    assert all(t.size_kb is not None for t in backup.tablespaces)


def segment_path(pg: PgCluster, timeline: int, lsn: int) -> Path:
    segno = lsn // SEGMENT
    per_id = 0x100000000 // SEGMENT
    return pg.datadir / "pg_wal" / f"{timeline:08X}{segno // per_id:08X}{segno % per_id:08X}"


async def wait_for(probe: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if await probe():
            return
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.1)


async def test_wal_streaming_and_status_updates(pg: PgCluster) -> None:
    async with await replication(pg) as rc:
        info = await rc.identify_system()
        restart = await rc.create_physical_slot("zs_stream")
        assert restart is not None
        await rows(pg, "CREATE TABLE t_wal AS SELECT generate_series(1, 2000) g")
        switch = Lsn.parse(await scalar(pg, "SELECT pg_switch_wal()"))
        target = -(-int(switch) // SEGMENT) * SEGMENT  # the end of the switched segment

        stream = await rc.start_replication("zs_stream", restart, info.timeline)
        chunks: list[tuple[Lsn, bytes]] = []
        async with asyncio.timeout(20):
            while stream.received_lsn < target:
                chunk = await stream.read()
                assert chunk is not None
                chunks.append(chunk)
        assert chunks[0][0] == restart

        # The bytes are those of the segment files, wherever the chunks cross segments.
        compared = 0
        for lsn, data in chunks:
            pos = int(lsn)
            view = memoryview(data)
            while view:
                take = min(len(view), SEGMENT - pos % SEGMENT)
                with open(segment_path(pg, info.timeline, pos), "rb") as f:
                    f.seek(pos % SEGMENT)
                    assert f.read(take) == view[:take], f"WAL differs at {Lsn(pos)}"
                compared += take
                pos += take
                view = view[take:]
        assert compared == stream.received_lsn - restart >= target - restart

        async def keep_reading() -> None:  # answers keepalives while the test polls
            while await stream.read() is not None:
                pass

        reader = asyncio.create_task(keep_reading())
        try:
            confirmed = Lsn(target)
            await stream.send_status(confirmed, confirmed, confirmed, reply=True)

            async def slot_advanced() -> bool:
                row = await slot_row(pg, "zs_stream")
                return row is not None and row[1] is not None and \
                    Lsn.parse(row[1]) == confirmed

            async def flush_reported() -> bool:
                found = await rows(pg, "SELECT flush_lsn FROM pg_stat_replication")
                return bool(found) and found[0][0] == str(confirmed)

            await wait_for(slot_advanced)
            await wait_for(flush_reported)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        await stream.stop()
        assert stream.timeline_end is None
        await rc.drop_slot("zs_stream")


async def test_keepalives_are_answered(pg: PgCluster) -> None:
    """With wal_sender_timeout = 3s, a stream nobody answered would be dropped by now."""
    async with await replication(pg) as rc:
        info = await rc.identify_system()
        stream = await rc.start_replication(None, info.xlogpos, info.timeline)
        deadline = time.monotonic() + 4.5
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(asyncio.get_running_loop().time() + 4.5):
                while time.monotonic() < deadline:
                    await stream.read()
        assert stream.keepalives_answered >= 1
        assert stream.server_wal_end >= info.xlogpos
        assert await scalar(pg, "SELECT count(*) FROM pg_stat_replication "
                                "WHERE state = 'streaming'") == "1"
        await rows(pg, "CREATE TABLE t_alive AS SELECT 1 AS one")
        async with asyncio.timeout(10):
            chunk = await stream.read()
        assert chunk is not None and chunk[0] == info.xlogpos
        await stream.stop()


async def test_slot_dropped_during_streaming(pg: PgCluster) -> None:
    async with await replication(pg) as rc:
        info = await rc.identify_system()
        restart = await rc.create_physical_slot("zs_doomed")
        assert restart is not None
        stream = await rc.start_replication("zs_doomed", restart, info.timeline)

        async def read_to_the_end() -> None:
            # Keep reading: a walsender blocked writing WAL to a client that does not
            # read cannot exit, and the slot would stay active.
            while await stream.read() is not None:
                pass

        reader = asyncio.create_task(read_to_the_end())
        await wait_for(lambda: _slot_active(pg, "zs_doomed", True))
        await rows(pg, "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                       "WHERE slot_name = 'zs_doomed'")
        # The walsender sends its FATAL unless it was blocked writing at that moment;
        # then PostgreSQL drops the message and just closes the socket.
        with pytest.raises(ConnectionFailed, match=r"terminat|closed the connection"):
            async with asyncio.timeout(10):
                await reader
        await wait_for(lambda: _slot_active(pg, "zs_doomed", False))
        await rows(pg, "SELECT pg_drop_replication_slot('zs_doomed')")
        assert await stream.read() is None  # ended for good
    async with await replication(pg) as rc:  # resuming finds the slot gone
        with pytest.raises(SlotNotFound, match="zs_doomed"):
            await rc.start_replication("zs_doomed", restart, info.timeline)


async def _slot_active(pg: PgCluster, name: str, active: bool) -> bool:
    row = await slot_row(pg, name)
    return row is not None and row[2] == ("t" if active else "f")


async def test_requested_wal_already_removed(pg: PgCluster) -> None:
    async with await replication(pg) as rc:
        assert await rc.create_physical_slot("zs_nowal", reserve_wal=False) is None
        for i in range(3):  # move on by segments and let checkpoints recycle the old ones
            await rows(pg, f"CREATE TABLE t_recycle_{i} AS SELECT 1 AS one")
            await rows(pg, "SELECT pg_switch_wal()")
            await rows(pg, "CHECKPOINT")
        names = {r[0] for r in await rows(pg, "SELECT name FROM pg_ls_waldir()")}
        assert "000000010000000000000001" not in names
        try:
            with pytest.raises(WalRemoved, match="already been removed") as caught:
                stream = await rc.start_replication("zs_nowal", Lsn(SEGMENT), 1)
                async with asyncio.timeout(10):
                    await stream.read()
            assert caught.value.hint
            await rc.drop_slot("zs_nowal")
        finally:
            async with await replication(pg) as other:
                await other.drop_slot("zs_nowal", missing_ok=True)


async def test_start_beyond_the_flush_position(pg: PgCluster) -> None:
    async with await replication(pg) as rc:
        info = await rc.identify_system()
        with pytest.raises(LsnOutOfRange, match="ahead of the WAL flush position"):
            # PostgreSQL says so after it started the COPY: on the first read
            stream = await rc.start_replication(None, info.xlogpos + 100 * SEGMENT,
                                                info.timeline)
            async with asyncio.timeout(10):
                await stream.read()
        assert (await rc.identify_system()).systemid == info.systemid


async def test_role_without_replication_attribute(pg: PgCluster) -> None:
    await rows(pg, "DROP ROLE IF EXISTS r; CREATE ROLE r LOGIN")
    with pytest.raises(ReplicationNotPermitted) as caught:
        await replication(pg, user="r")
    assert "REPLICATION" in (caught.value.hint or "")
    assert '"r"' in caught.value.message
    async with await connect(pg.uri(user="r"), timeout=10) as conn:  # an ordinary login works
        assert (await conn.simple_query("SELECT 1")).rows == [["1"]]


def test_wal_level_minimal_source_is_refused() -> None:
    with PgCluster(settings={"wal_level": "minimal", "max_wal_senders": "0"}) as minimal, \
            pytest.raises(ReplicationUnavailable, match="max_wal_senders") as caught:
        asyncio.run(connect_replication(minimal.uri(), timeout=10))
    assert "wal_level" in (caught.value.hint or "")
