"""Export against real PostgreSQL 15 processes (DESIGN §7, issue 6).

A source cluster (with and without data checksums) is imported and followed; pgbench and
DDL run on it; at a middle LSN and at the end the table contents are remembered. Each LSN
is exported into a directory on which the stock ``postgres`` must start, show the same
contents (a transaction open at the middle LSN reads as aborted, an unlogged table as
empty), pass ``pg_amcheck --heapallindexed`` and ``pg_checksums --check``, accept writes and
restart. The oracles are PostgreSQL's own tools; nothing here reads the export's files.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from zenith.errors import InvalidArgument
from zenith.ids import TimelineId
from zenith.lsn import Lsn
from zenith.postgres import pgcontrol
from zenith.postgres.export import export_entries, tar_chunks, write_directory
from zenith.postgres.import_basebackup import import_base_backup
from zenith.postgres.replication import connect_replication
from zenith.postgres.waldecoder import WalStreamDecoder
from zenith.postgres.walingest import WalIngest
from zenith.storage import SqliteRepository, open_repository

from ..pgcluster import PG_USER, PGBIN, PgCluster

pytestmark = [
    pytest.mark.skipif(not (PGBIN / "postgres").exists(), reason="PostgreSQL 15 not installed"),
    pytest.mark.timeout(300),
]

SETTINGS = {
    "wal_level": "replica",
    "wal_consistency_checking": "'all'",
    "max_wal_senders": "5",
    "max_replication_slots": "5",
    "autovacuum": "off",
    "max_prepared_transactions": "3",
}
TABLES = ("pgbench_accounts", "pgbench_branches", "pgbench_tellers", "pgbench_history",
          "items", "wide")


def sql(pg: PgCluster, script: str, db: str = "postgres") -> list[str]:
    out = subprocess.run(
        ["psql", "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", pg.uri(db=db), "-f", "-"],
        input=script, check=True, capture_output=True, text=True, timeout=120,
    )
    return [line for line in out.stdout.splitlines() if line]


def contents(pg: PgCluster) -> dict[str, str]:
    """md5 of every table's rows (missing tables read as ``missing``)."""
    out: dict[str, str] = {}
    for t in TABLES:
        exists = sql(pg, f"SELECT to_regclass('{t}') IS NOT NULL")[0] == "t"
        out[t] = sql(pg, f"SELECT count(*) || ':' || md5(coalesce(string_agg(x::text, ',' "
                         f"ORDER BY x::text), '')) FROM {t} x")[0] if exists else "missing"
    return out


def flush_lsn(pg: PgCluster) -> Lsn:
    return Lsn.parse(sql(pg, "SELECT pg_current_wal_flush_lsn()")[0])


class Follower:
    """Streams WAL from the slot into storage until stopped (as wal_service does)."""

    def __init__(self, ingest: WalIngest, start: Lsn) -> None:
        self.ingest, self.start = ingest, start
        self.decoder = WalStreamDecoder(start)

    async def run(self, uri: str, slot: str, timeline: int, stop: asyncio.Event) -> None:
        conn = await connect_replication(uri)
        try:  # closed even when ingest raises, so the source's shutdown need not wait
            stream = await conn.start_replication(slot, self.start, timeline)
            last = time.monotonic()
            while not stop.is_set():
                try:
                    item = await asyncio.wait_for(stream.read(), 0.1)
                except TimeoutError:
                    item = None
                if item is not None:
                    self.decoder.feed(item[1])
                    while (rec := self.decoder.poll()) is not None:
                        self.ingest.add(rec)
                if time.monotonic() - last > 0.5:
                    self.ingest.flush()
                    done = self.ingest.last_lsn
                    await stream.send_status(done, done, done)
                    last = time.monotonic()
        finally:
            await conn.close()

    async def catch_up(self, target: Lsn, task: asyncio.Task[None]) -> None:
        while self.ingest.last_lsn < target:
            assert not task.done(), task
            await asyncio.sleep(0.05)
        # On the loop, like ``run``'s own flushes: WalIngest is not thread-safe, and a flush
        # in a worker thread raced with ``run`` adding records (publishing past them).
        self.ingest.flush()


class Exported(PgCluster):
    """A PgCluster on an exported directory: the export's config gets our port appended."""

    def __init__(self, repo: SqliteRepository, tid: TimelineId, lsn: Lsn, *,
                 keep_config: bool = False) -> None:
        super().__init__(settings={"fsync": "off", "wal_consistency_checking": "''"})
        write_directory(export_entries(repo, tid, lsn, keep_config=keep_config), self.datadir)
        self.append_settings(self.settings)

    def append_settings(self, settings: dict[str, str], *, signal: str | None = None) -> None:
        """Settings appended to postgresql.auto.conf (and the signal file ``signal``)."""
        with open(self.datadir / "postgresql.auto.conf", "a") as f:
            for k, v in settings.items():
                f.write(f"{k} = {v}\n")
        if signal is not None:
            (self.datadir / signal).touch()
        if os.geteuid() == 0:
            subprocess.run(["chown", "-R", f"{PG_USER}:{PG_USER}", str(self.base)], check=True)


def amcheck(pg: PgCluster) -> str:
    r = pg.run("pg_amcheck", "-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres",
               "--all", "--install-missing", "--heapallindexed", check=False)
    lines = [x for x in (r.stdout + r.stderr).splitlines() if x and not x.startswith("NOTICE:")]
    return "\n".join(lines) + ("" if r.returncode == 0 else f" rc={r.returncode}")


def control_data(exp: Exported) -> dict[str, str]:
    out = exp.run("pg_controldata", "-D", str(exp.datadir)).stdout
    return {k.strip(): v.strip() for k, _, v in (x.partition(":") for x in out.splitlines())}


def check_export(exp: Exported, expected: dict[str, str], checksums: bool,
                 open_xid: int, prepared: bool) -> None:
    try:
        ctl = control_data(exp)
        assert ctl["Database cluster state"] == "shut down"
        assert ctl["Data page checksum version"] == ("1" if checksums else "0")
        assert ctl["Minimum recovery ending location"] == "0/0"
        # The transaction open at the middle LSN must be below next XID (so: aborted).
        assert int(ctl["Latest checkpoint's NextXID"].split(":")[1]) > open_xid
        # The next timeline after the source's (1), its history beside the one segment.
        assert ctl["Latest checkpoint's TimeLineID"] == "2"
        assert ctl["Latest checkpoint's PrevTimeLineID"] == "1"
        wal = sorted(p.name for p in (exp.datadir / "pg_wal").glob("0*"))
        assert len(wal) == 2 and wal[0] == "00000002.history", wal
        assert wal[1].startswith("00000002"), wal
        dump = exp.run("pg_waldump", str(exp.datadir / "pg_wal" / wal[1]), check=False)
        assert "CHECKPOINT_SHUTDOWN" in dump.stdout, dump.stdout + dump.stderr
        exp.start()
        assert sql(exp, "SELECT timeline_id FROM pg_control_checkpoint()") == ["2"]
        got = contents(exp)
        assert got == expected
        assert sql(exp, "SELECT count(*) FROM unlogged_t")[0] == "0"
        assert sql(exp, "SELECT sum(g) FROM o", db="other")[0] == "4501500"
        # The row share-locked by two transactions (a multixact) can be locked again.
        assert sql(exp, "SELECT id FROM items WHERE id = 1 FOR UPDATE") == ["1"]
        assert amcheck(exp) == ""
        # A transaction prepared at the LSN is still prepared, and commits.
        assert sql(exp, "SELECT gid FROM pg_prepared_xacts") == (["p1"] if prepared else [])
        if prepared:
            assert sql(exp, "SELECT count(*) FROM items WHERE id = -2") == ["0"]
            sql(exp, "COMMIT PREPARED 'p1'")
            assert sql(exp, "SELECT count(*) FROM items WHERE id = -2") == ["1"]
        else:
            assert sql(exp, "SELECT count(*) FROM items WHERE id = -2") == ["1"]
        # Writes, a new table, a restart, and the writes are still there.
        sql(exp, "INSERT INTO items SELECT g, 'after', g FROM generate_series(100000, 100999) g;"
                 "CREATE TABLE post_export AS SELECT g FROM generate_series(1, 5000) g;"
                 "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid < 500;"
                 "CHECKPOINT;")
        exp.stop()
        exp.start()
        assert sql(exp, "SELECT count(*) FROM post_export")[0] == "5000"
        assert sql(exp, "SELECT count(*) FROM items WHERE v = 'after'")[0] == "1000"
        assert amcheck(exp) == ""
        exp.stop()
        if checksums:
            r = exp.run("pg_checksums", "--check", "-D", str(exp.datadir), check=False)
            assert r.returncode == 0, r.stdout + r.stderr
            assert "Bad checksums:  0" in r.stdout
    finally:
        if exp.running:
            log = (exp.base / "log").read_text(errors="replace") if (
                exp.base / "log").exists() else ""
            print(log[-3000:])
        exp.destroy()


@pytest.mark.parametrize("checksums", [False, True], ids=["plain", "checksums"])
async def test_export_starts_and_matches_source(tmp_path: Path, checksums: bool) -> None:
    initdb = ("--data-checksums",) if checksums else ()
    with PgCluster(settings=SETTINGS, initdb_args=initdb) as pg:
        pg.run("pgbench", "-i", "-s", "1", "-q", "-h", "127.0.0.1", "-p", str(pg.port),
               "-U", "postgres", "postgres")
        repo = open_repository(tmp_path / "zenith.db", durable=False)
        tid = repo.create_timeline().timeline_id
        conn = await connect_replication(pg.uri())
        await conn.create_physical_slot("zenith_export")
        result = await import_base_backup(repo, tid, conn)
        await conn.close()
        follower = Follower(WalIngest(repo, tid, result.rel_sizes), result.start_lsn)
        stop = asyncio.Event()
        task = asyncio.create_task(
            follower.run(pg.uri(), "zenith_export", result.timeline, stop))

        def first_half() -> None:
            pg.run("pgbench", "-t", "100", "-c", "2", "-h", "127.0.0.1", "-p", str(pg.port),
                   "-U", "postgres", "postgres")
            # items: 5000 rows, dozens of heap pages and two indexes (each row written
            # carries its pages in the WAL here: 20000 rows were 400 MiB of WAL to ingest)
            sql(pg, """
                CREATE TABLE items (id int PRIMARY KEY, v text, n int);
                CREATE INDEX items_n ON items (n);
                INSERT INTO items SELECT g, md5(g::text), g % 97 FROM generate_series(1, 5000) g;
                CREATE TABLE wide (id int, t text);
                INSERT INTO wide SELECT g, repeat(md5(g::text), 200) FROM generate_series(1, 50) g;
                CREATE UNLOGGED TABLE unlogged_t (id int PRIMARY KEY);
                INSERT INTO unlogged_t SELECT generate_series(1, 100);
                DELETE FROM items WHERE id % 10 = 0;
                VACUUM items;
                CHECKPOINT;
                UPDATE items SET n = n + 1 WHERE id % 7 = 0;
                CREATE DATABASE other;
            """)
            sql(pg, "CREATE TABLE o AS SELECT g FROM generate_series(1, 3000) g;"
                    "CREATE INDEX ON o (g);", db="other")

        await asyncio.to_thread(first_half)
        # A transaction left open across the middle LSN: the middle export must not see it.
        open_tx = subprocess.Popen(
            ["psql", "-X", "-q", "-A", "-t", pg.uri()], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True)
        assert open_tx.stdin is not None and open_tx.stdout is not None
        # It also share-locks a row another transaction share-locks: a multixact.
        open_tx.stdin.write("BEGIN; INSERT INTO items VALUES (-1, 'open', 0);"
                            " SELECT id FROM items WHERE id = 1 FOR SHARE;"
                            " SELECT txid_current(); \\echo ready\n")
        open_tx.stdin.flush()
        assert open_tx.stdout.readline().strip() == "1"
        open_xid = int(open_tx.stdout.readline())
        assert open_tx.stdout.readline().strip() == "ready"
        sql(pg, "BEGIN; SELECT id FROM items WHERE id = 1 FOR SHARE; COMMIT;")
        sql(pg, "BEGIN; INSERT INTO items VALUES (-2, 'prepared', 0); PREPARE TRANSACTION 'p1';")
        assert sql(pg, "SELECT count(*) FROM pg_get_multixact_members("
                       "(SELECT xmax FROM items WHERE id = 1))")[0] == "2"
        mid_expected = contents(pg)
        mid = flush_lsn(pg)

        def second_half() -> None:
            assert open_tx.stdin is not None
            open_tx.stdin.write("COMMIT;\n\\q\n")
            open_tx.stdin.flush()
            open_tx.wait(30)
            sql(pg, "COMMIT PREPARED 'p1'")
            pg.run("pgbench", "-t", "100", "-c", "2", "-h", "127.0.0.1", "-p", str(pg.port),
                   "-U", "postgres", "postgres")
            sql(pg, """
                ALTER TABLE items ADD COLUMN extra int DEFAULT 7;
                UPDATE items SET extra = id WHERE id < 1000;
                TRUNCATE wide;
                INSERT INTO wide SELECT g, repeat('y', 3000) FROM generate_series(1, 20) g;
                VACUUM FULL pg_class;
                DROP TABLE pgbench_history;
            """)

        await asyncio.to_thread(second_half)
        end_expected = contents(pg)
        end = flush_lsn(pg)
        await follower.catch_up(end, task)
        stop.set()
        await task
        assert mid_expected["items"] != end_expected["items"]
        assert end_expected["pgbench_history"] == "missing"

        with pytest.raises(InvalidArgument):
            export_entries(repo, tid, Lsn(follower.ingest.last_lsn + 1))
        tar_path = tmp_path / "export.tar"
        with open(tar_path, "wb") as f:
            for chunk in tar_chunks(export_entries(repo, tid, mid)):
                f.write(chunk)
        with tarfile.open(tar_path) as tf:
            in_tar = {m.name: (m.isdir(), m.size if m.isfile() else 0) for m in tf}
        tar_path.unlink()
        prepared = {mid: True, end: False}
        for lsn, expected in ((mid, mid_expected), (end, end_expected)):
            t0 = time.monotonic()
            exp = await asyncio.to_thread(Exported, repo, tid, lsn)
            print(f"export at {lsn}: {time.monotonic() - t0:.2f}s")
            if lsn == mid:  # the tar form holds the same directories and files
                on_disk = {str(p.relative_to(exp.datadir)): (p.is_dir(),
                           0 if p.is_dir() else p.stat().st_size)
                           for p in exp.datadir.rglob("*")
                           if p.name != "postgresql.auto.conf"}
                in_tar.pop("postgresql.auto.conf", None)
                assert in_tar == on_disk
            await asyncio.to_thread(check_export, exp, expected, checksums, open_xid,
                                    prepared[lsn])
        repo.close()


def test_checksum_matches_postgresql() -> None:
    """Our pg_checksum_page equals PostgreSQL's on every page of a checksummed cluster."""
    with PgCluster(initdb_args=("--data-checksums",)) as pg:
        sql(pg, "CREATE TABLE t AS SELECT g, md5(g::text) FROM generate_series(1, 5000) g;"
                "CREATE INDEX ON t (md5); CHECKPOINT;")
        pg.stop()
        checked = 0
        for f in sorted((pg.datadir / "base").glob("*/*")):
            if not f.name.isdigit():
                continue
            data = f.read_bytes()
            numbered = [(i // 8192, data[i: i + 8192]) for i in range(0, len(data), 8192)]
            numbered = [(b, p) for b, p in numbered if p[14:16] != b"\0\0"]
            if not numbered:
                continue
            blknos = [b for b, _ in numbered]
            pages = [p for _, p in numbered]
            sums = pgcontrol.page_checksums(pages, blknos)
            assert sums == [int.from_bytes(p[8:10], "little") for p in pages], f
            checked += len(pages)
        assert checked > 100
        shutil.rmtree(pg.base, ignore_errors=True)


#: Settings of a source that a copy started next to it must not share (issue 10): some in
#: postgresql.conf, the rest in postgresql.auto.conf. Commits do not wait for standby_b
#: (synchronous_commit = local), on the source nor on a copy that keeps the setting.
IN_CONF = {"archive_mode": "on", "archive_command": "'/bin/true'"}
IN_AUTO = {**SETTINGS, "primary_conninfo": "'host=127.0.0.1 port=1 user=nobody'",
           "primary_slot_name": "'nowhere'", "synchronous_standby_names": "'standby_b'",
           "restore_command": "'false'", "synchronous_commit": "local"}
ACTING = ("archive_mode", "archive_command", "primary_conninfo", "primary_slot_name",
          "synchronous_standby_names", "restore_command")


def show(pg: PgCluster) -> dict[str, str]:
    return {name: (sql(pg, f"SHOW {name}") or [""])[0] for name in ACTING}


async def test_export_timeline_settings_and_slots(tmp_path: Path) -> None:
    """The export runs on timeline 2 with a history file PostgreSQL reads (a normal start
    and an archive recovery that moves on to timeline 3); the source's archiving, standby
    and synchronous-standby settings are off in it unless keep_config; no slot comes."""
    from zenith.postgres.export import DISABLED_MARKER

    pg = PgCluster(settings=IN_AUTO)
    try:
        pg.init()
        with open(pg.datadir / "postgresql.conf", "a") as f:
            f.writelines(f"{k} = {v}\n" for k, v in IN_CONF.items())
        pg.start()
        source = show(pg)
        assert source["archive_mode"] == "on" and source["synchronous_standby_names"]
        sql(pg, "CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g")
        repo = open_repository(tmp_path / "zenith.db", durable=False)
        tid = repo.create_timeline().timeline_id
        conn = await connect_replication(pg.uri())
        await conn.create_physical_slot("zenith_cfg")
        result = await import_base_backup(repo, tid, conn)
        await conn.close()
        follower = Follower(WalIngest(repo, tid, result.rel_sizes), result.start_lsn)
        stop = asyncio.Event()
        task = asyncio.create_task(follower.run(pg.uri(), "zenith_cfg", result.timeline, stop))
        sql(pg, "INSERT INTO t SELECT generate_series(1001, 2000)")
        end = flush_lsn(pg)
        await follower.catch_up(end, task)
        stop.set()
        await task
        assert sql(pg, "SELECT count(*) FROM pg_replication_slots") == ["1"]
    finally:
        pg.destroy()

    exp = await asyncio.to_thread(Exported, repo, tid, end)
    try:
        conf = (exp.datadir / "postgresql.conf").read_text()
        assert f"{DISABLED_MARKER}\n#archive_mode = on\n" in conf
        assert f"{DISABLED_MARKER}\n#archive_command = '/bin/true'\n" in conf
        auto = (exp.datadir / "postgresql.auto.conf").read_text()
        assert not any(name in auto for name in ACTING), auto
        ctl = control_data(exp)
        assert ctl["Latest checkpoint's TimeLineID"] == "2"
        assert ctl["Latest checkpoint's PrevTimeLineID"] == "1"
        history = (exp.datadir / "pg_wal" / "00000002.history").read_text()
        assert history == f"1\t{end}\tzenith export at {end}\n"
        exp.start()
        assert sql(exp, "SELECT timeline_id FROM pg_control_checkpoint()") == ["2"]
        assert show(exp) == {"archive_mode": "off", "archive_command": "(disabled)",
                             "primary_conninfo": "", "primary_slot_name": "",
                             "synchronous_standby_names": "", "restore_command": ""}
        assert sql(exp, "SELECT count(*) FROM pg_replication_slots") == ["0"]
        assert sql(exp, "INSERT INTO t VALUES (0); SELECT count(*) FROM t") == ["2001"]
        exp.stop()
        # Archive recovery reads the history of timeline 2 (recovery_target_timeline
        # 'latest'), checks the checkpoint lies on it, and ends on timeline 3, whose
        # history is ours, then (after the blank line PostgreSQL always inserts) the switch.
        exp.append_settings({"restore_command": "'false'"}, signal="recovery.signal")
        exp.start()
        assert sql(exp, "SELECT timeline_id FROM pg_control_checkpoint()") == ["3"]
        third = (exp.datadir / "pg_wal" / "00000003.history").read_text()
        assert third.startswith(history + "\n2\t"), third
        assert sql(exp, "SELECT count(*) FROM t") == ["2001"]
    finally:
        exp.destroy()

    kept = await asyncio.to_thread(Exported, repo, tid, end, keep_config=True)
    try:
        kept.start()
        assert sql(kept, "SELECT timeline_id FROM pg_control_checkpoint()") == ["2"]
        assert show(kept) == source
        assert sql(kept, "SELECT count(*) FROM pg_replication_slots") == ["0"]
        assert sql(kept, "INSERT INTO t VALUES (0); SELECT count(*) FROM t") == ["2001"]
    finally:
        kept.destroy()
        repo.close()
