"""Issue 3's benchmark: ``get_page`` round trips per second from psycopg against the
pageserver, against ``SELECT 1`` round trips on a real PostgreSQL in the same run."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import psycopg
from tests.fixtures import make_pageserver
from tests.pgcluster import PgCluster

from benchmarks.common import Section, timed
from zenith.pageserver.page_service import SYNTHETIC_REL
from zenith.postgres.keys import rel_block_key

PAGES = 2000


def _round_trips(uri: str, queries: list[str]) -> float:
    """Best of three passes (the machine is shared: single passes swing)."""
    with psycopg.connect(uri, autocommit=True, prepare_threshold=None) as conn:
        cur = conn.cursor()
        for q in queries[:200]:  # warm up
            cur.execute(q)
            cur.fetchone()
        best = min(
            timed(lambda: [cur.execute(q) or cur.fetchone() for q in queries])[1]
            for _ in range(3)
        )
    return len(queries) / best


def run(n: int = 20000) -> Section:
    section = Section(
        "Pageserver: get_page round trips (issue 3)",
        f"{n:,} `get_page` queries (random block of {PAGES:,} 8 KiB pages, at the branch's "
        "last LSN) from psycopg 3 over one loopback connection, one at a time, each answer "
        "fetched. Anchor: the same number of `SELECT 1` round trips from psycopg against a "
        "PostgreSQL 15 server on the same machine, in the same run. For scale, a second "
        "figure: the same PostgreSQL returning an 8 KiB `bytea` (what `get_page` returns), "
        "which shows what the client's decoding of the text-format answer costs alone.",
    )
    with tempfile.TemporaryDirectory(prefix="zenith-bench-") as d:
        ps = make_pageserver(Path(d) / "ps")
        ps.start()
        try:
            ps.cli("generate", "main", "--pages", str(PAGES), "--rounds", "2", check=True)
            with psycopg.connect(ps.uri(), autocommit=True) as conn:
                lsn = conn.execute("digest main").fetchone()[2]  # type: ignore[index]
            rng = random.Random(1)
            queries = [
                f"get_page main {lsn} {rel_block_key(SYNTHETIC_REL, rng.randrange(PAGES)).hex()}"
                for _ in range(n)
            ]
            zenith_rate = _round_trips(ps.uri(), queries)
        finally:
            ps.stop()
    with PgCluster() as pg:
        pg_rate = _round_trips(pg.uri(), ["SELECT 1"] * n)
        pg_page = _round_trips(pg.uri(), ["SELECT decode(repeat('ab', 8192), 'hex')"] * n)
    section.add("PostgreSQL `SELECT 1` (anchor)", f"{pg_rate:,.0f} /s", "1.00")
    section.add("PostgreSQL, an 8 KiB `bytea` (for scale)", f"{pg_page:,.0f} /s",
                f"{pg_page / pg_rate:.2f}")
    section.add("zenith `get_page` (8 KiB page)", f"{zenith_rate:,.0f} /s",
                f"{zenith_rate / pg_rate:.2f}", ">= 0.5")
    return section


if __name__ == "__main__":
    run()
