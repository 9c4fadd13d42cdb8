"""Issue 12's catch-up benchmark: how fast a pageserver ingests a WAL backlog.

Two parts:

* ``replay`` (the micro-benchmark): a WAL stream recorded once from a real PostgreSQL 15
  running pgbench with ``wal_consistency_checking=all`` (segment files copied out of
  ``pg_wal``, kept in ``ZENITH_BENCH_WAL`` or ``/tmp/zenith-bench-wal``) is read from the
  files and fed through ``WalStreamDecoder`` + ``WalIngest`` into a fresh, durable
  repository, in 128 KiB chunks as the replication stream delivers them, the way the
  follower's catch-up path (``wal_service.ingest_stream``) does. Reports MiB/s of WAL
  and CPU seconds per GiB. Repeatable: the same bytes every run.
* ``run`` (the ``catch-up`` section of ``make bench``): a source followed by a pageserver
  and by a stock PostgreSQL 15 streaming standby, both stopped while ``pgbench`` runs for
  30 s, then each started alone and timed until it has caught up with the source's flush
  LSN. The ratio is the pageserver's catch-up rate to the standby's.

``python -m benchmarks.catchup_bench record`` records the stream, ``... replay [MiB]
[skip MiB]`` replays it (default: 512 MiB from 1 GiB on, the ``pgbench -T`` part;
``--profile`` prints a cProfile of one run), ``... run`` runs the section (which adds the
replay's figures when the stream has been recorded). docs/ingest.md, "Catch-up speed".
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from tests.pgcluster import PgCluster

from benchmarks import ingest_bench
from benchmarks.common import MiB, Section
from zenith.lsn import Lsn
from zenith.pageserver.wal_service import ingest_stream
from zenith.postgres.waldecoder import WalStreamDecoder
from zenith.postgres.walingest import WalIngest
from zenith.storage import open_repository

#: ingest_bench's source settings; the standby also serves queries (its replay LSN).
FOLLOWABLE = {**ingest_bench.FOLLOWABLE, "hot_standby": "on"}
SEGMENT = 16 << 20
CHUNK = 128 << 10  # the size of a walsender's CopyData messages, about
#: The micro-benchmark's window of the recorded stream: past ``pgbench -i`` (bulk COPY and
#: index builds), into ``pgbench -T`` (small records, each with its page images).
REPLAY_SKIP = 1024 * MiB
REPLAY_BYTES = 512 * MiB
WAL_DIR = Path(os.environ.get("ZENITH_BENCH_WAL", "/tmp/zenith-bench-wal"))


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) another process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _seg_name(tli: int, lsn: int) -> str:
    seg = lsn // SEGMENT
    return f"{tli:08X}{seg >> 8:08X}{seg & 0xFF:08X}"


# -- the recorded stream --------------------------------------------------------------------


def record(seconds: int = 30, scale: int = 10, dest: Path = WAL_DIR) -> dict[str, int]:
    """Run pgbench on a fresh source and copy the WAL it wrote (whole segments) to
    ``dest``, with ``meta.json`` (``start``: a segment start, ``end``: the flush LSN)."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    with PgCluster(settings=FOLLOWABLE) as pg:
        pg.psql("SELECT pg_create_physical_replication_slot('keep', true)")
        switched = int(Lsn.parse(pg.psql("SELECT pg_switch_wal()")))
        start = -(-switched // SEGMENT) * SEGMENT
        pg.run("pgbench", "-i", "-q", "-s", str(scale), "-h", "127.0.0.1", "-p", str(pg.port),
               "-U", "postgres", "postgres", timeout=1800)
        pg.run("pgbench", "-c", "4", "-T", str(seconds), "-h", "127.0.0.1", "-p",
               str(pg.port), "-U", "postgres", "postgres", timeout=seconds + 600)
        end = int(Lsn.parse(pg.psql("SELECT pg_current_wal_flush_lsn()")))
        for seg_start in range(start, end, SEGMENT):
            name = _seg_name(1, seg_start)
            shutil.copyfile(pg.datadir / "pg_wal" / name, dest / name)
    meta = {"start": start, "end": end}
    (dest / "meta.json").write_text(json.dumps(meta))
    return meta


def recorded_chunks(limit: int | None = None, skip: int = 0, src: Path = WAL_DIR) -> tuple[
        int, int, Iterator[bytes]]:
    """``(start, end, chunks)`` of the recorded stream from ``skip`` bytes on (rounded
    down to a segment start: the decoder starts there, skipping a continued record), cut
    at ``limit`` bytes if given (at a segment boundary or the recorded end)."""
    meta = json.loads((src / "meta.json").read_text())
    start, end = int(meta["start"]), int(meta["end"])
    start = min(start + skip // SEGMENT * SEGMENT, end // SEGMENT * SEGMENT)
    if limit is not None:
        end = min(end, start + -(-limit // SEGMENT) * SEGMENT)

    def chunks() -> Iterator[bytes]:
        for seg_start in range(start, end, SEGMENT):
            data = (src / _seg_name(1, seg_start)).read_bytes()
            data = data[: end - seg_start]
            for i in range(0, len(data), CHUNK):
                yield data[i : i + CHUNK]

    return start, end, chunks()


def replay(limit: int | None = None, skip: int = 0, *, durable: bool = True) -> tuple[
        float, float, int, int, int]:
    """Replay the recorded stream (from ``skip`` bytes on, ``limit`` bytes of it) into a
    fresh repository: ``(seconds, cpu seconds, WAL bytes, bytes the repository takes on
    disk, the same after a compaction pass)``."""
    start, _end, chunks = recorded_chunks(limit, skip)
    data = list(chunks)  # read before the clock starts: the files may not be cached
    with tempfile.TemporaryDirectory(prefix="zenith-bench-", dir=os.environ.get("TMPDIR")) as d:
        repo = open_repository(Path(d) / "zenith.db", durable=durable)
        try:
            tid = repo.create_timeline().timeline_id
            ingest = WalIngest(repo, tid, {})
            decoder = WalStreamDecoder(start)
            t0, c0 = time.perf_counter(), _cpu()
            ingest_stream(decoder, ingest, iter(data))
            ingest.flush()
            wall, cpu = time.perf_counter() - t0, _cpu() - c0

            done = ingest.last_lsn
            stored = _disk(Path(d))
            repo.compact(tid)
        finally:
            repo.close()
        compacted = _disk(Path(d))
    return wall, cpu, done - start, stored, compacted


def _disk(path: Path) -> int:
    """Bytes the files under ``path`` take on disk (allocated blocks: holes do not count)."""
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


# -- the section: pageserver and standby, stopped during pgbench ------------------------------


def run(seconds: int = 30, scale: int = 10) -> Section:
    from tests.fixtures import make_pageserver

    section = Section(
        "Catch-up after a stop (issue 12)",
        f"A PostgreSQL 15 source (`wal_consistency_checking=all`, pgbench scale {scale}) "
        "followed by a pageserver (`zenith import`) and by a stock PostgreSQL 15 streaming "
        "standby (`pg_basebackup -R`, its own slot). Both are stopped while "
        f"`pgbench -c 4 -T {seconds}` runs, then each is started alone and timed until it "
        "has caught up with the source's flush LSN (the pageserver's `last_record_lsn`, the "
        "standby's `pg_last_wal_replay_lsn()`). Anchor: the standby's catch-up rate. "
        "Micro-benchmark: the recorded stream replayed from files (`catchup_bench replay`).",
    )
    with PgCluster(settings=FOLLOWABLE) as pg, \
            tempfile.TemporaryDirectory(prefix="zenith-bench-") as d:
        pg.run("pgbench", "-i", "-q", "-s", str(scale), "-h", "127.0.0.1", "-p", str(pg.port),
               "-U", "postgres", "postgres", timeout=1800)
        standby = _Standby(pg)
        ps = make_pageserver(Path(d) / "ps")
        ps.start()
        try:
            ps.cli("import", "main", pg.uri(), check=True, timeout=1800)
            imported = _disk(ps.path)
            ps.cli("gc", check=True, timeout=1800)  # the default window: compaction only
            imported_compacted = _disk(ps.path)
            standby.create()
            flush = pg.psql("SELECT pg_current_wal_flush_lsn()")
            ps.cli("wait", "main", flush, "--timeout", "600", check=True, timeout=700)
            standby.wait(int(Lsn.parse(flush)))
            ps.stop()
            standby.stop()
            start_src = int(Lsn.parse(pg.psql("SELECT pg_current_wal_flush_lsn()")))
            runner = threading.Thread(target=lambda: pg.run(
                "pgbench", "-c", "4", "-T", str(seconds), "-h", "127.0.0.1", "-p",
                str(pg.port), "-U", "postgres", "postgres", timeout=seconds + 600))
            runner.start()
            runner.join()
            end_src = int(Lsn.parse(pg.psql("SELECT pg_current_wal_flush_lsn()")))
            backlog = (end_src - start_src) / MiB
            t0 = time.monotonic()
            standby.start()
            standby.wait(end_src)
            standby_s = time.monotonic() - t0
            standby.stop()
            t0 = time.monotonic()
            ps.start()
            pid = int(ps.config.pid_path.read_text().split()[0])
            cpu0 = _proc_cpu(pid)
            ps.cli("wait", "main", str(Lsn(end_src)), "--timeout", "1800", check=True,
                   timeout=1900)
            ps_s = time.monotonic() - t0
            ps_cpu = _proc_cpu(pid) - cpu0
        finally:
            ps.stop()
            standby.destroy()
    standby_rate, ps_rate = backlog / standby_s, backlog / ps_s
    section.add("imported cluster (repository on disk), before and after compaction",
                f"{imported / MiB:.0f} -> {imported_compacted / MiB:.0f} MiB",
                f"{imported_compacted / imported:.2f}")
    section.add("backlog", f"{backlog:.0f} MiB of WAL")
    section.add("standby catch-up (anchor)", f"{standby_rate:.0f} MiB/s ({standby_s:.1f} s)",
                "1.00")
    section.add("pageserver catch-up", f"{ps_rate:.0f} MiB/s ({ps_s:.1f} s, "
                f"{ps_cpu / (backlog / 1024):.1f} CPU s/GiB)",
                f"{ps_rate / standby_rate:.2f}", ">= 0.5")
    if (WAL_DIR / "meta.json").exists():
        wall, cpu, n, stored, compacted = replay(REPLAY_BYTES, REPLAY_SKIP)
        section.add("recorded stream replayed from files",
                    f"{n / MiB / wall:.0f} MiB/s, {cpu / (n / (1 << 30)):.1f} CPU s/GiB")
        section.add("  repository size per MiB of that WAL (index, data files), as "
                    "ingested", f"{stored / n:.3f} MiB", "", "<= 0.1")
        section.add("  ... after a compaction pass", f"{compacted / n:.3f} MiB", "",
                    "<= 0.1")
    return section


class _Standby:
    """A stock streaming standby of ``pg`` (``pg_basebackup -R`` with its own slot)."""

    def __init__(self, pg: PgCluster) -> None:
        self.pg = pg
        self.datadir = pg.base / "standby"
        with socket.socket() as s:  # a free port
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.running = False

    def create(self) -> None:
        self.pg.psql("SELECT pg_create_physical_replication_slot('standby', true)")
        self.pg.run("pg_basebackup", "-D", str(self.datadir), "-h", "127.0.0.1", "-p",
                    str(self.pg.port), "-U", "postgres", "-R", "-S", "standby",
                    "--checkpoint=fast", timeout=1800)
        with open(self.datadir / "postgresql.auto.conf", "a") as f:
            f.write(f"port = {self.port}\nunix_socket_directories = '{self.pg.base}'\n")
        self.start()

    def start(self) -> None:
        self.pg.run("pg_ctl", "-D", str(self.datadir), "-l", str(self.pg.base / "standby.log"),
                    "-w", "-t", "600", "start", timeout=700)
        self.running = True

    def stop(self) -> None:
        if self.running:
            self.pg.run("pg_ctl", "-D", str(self.datadir), "-m", "fast", "-w", "stop",
                        check=False)
            self.running = False

    def replayed(self) -> int:
        import subprocess

        out = subprocess.run(
            ["psql", "-X", "-A", "-t", f"postgresql://postgres@127.0.0.1:{self.port}/postgres",
             "-c", "SELECT pg_last_wal_replay_lsn()"],
            check=True, capture_output=True, text=True, timeout=60).stdout.strip()
        return int(Lsn.parse(out)) if out else 0

    def wait(self, lsn: int, timeout: float = 1800) -> None:
        deadline = time.monotonic() + timeout
        while self.replayed() < lsn:
            if time.monotonic() > deadline:
                raise TimeoutError("the standby did not catch up")
            time.sleep(0.05)

    def destroy(self) -> None:
        self.stop()


def main(argv: list[str]) -> None:
    what = argv[0] if argv else "replay"
    if what == "record":
        print(record(int(argv[1]) if len(argv) > 1 else 30))
    elif what == "replay":
        limit = int(argv[1]) * MiB if len(argv) > 1 and argv[1].isdigit() else None
        skip = int(argv[2]) * MiB if len(argv) > 2 and argv[2].isdigit() else REPLAY_SKIP
        if "--profile" in argv:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.enable()
            wall, cpu, n, stored, compacted = replay(limit, skip)
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(30)
        else:
            wall, cpu, n, stored, compacted = replay(limit, skip)
        print(f"{n / MiB:.0f} MiB of WAL in {wall:.2f} s: {n / MiB / wall:.1f} MiB/s, "
              f"{cpu / (n / (1 << 30)):.1f} CPU s/GiB, {stored / n:.3f} bytes stored per "
              f"byte of WAL ({compacted / n:.3f} after a compaction pass)")
    elif what == "run":
        run(int(argv[1]) if len(argv) > 1 else 30)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
