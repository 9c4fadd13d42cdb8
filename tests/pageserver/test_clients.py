"""Real clients against a real pageserver process: psql and psycopg 3 with SCRAM, md5 and
TLS; answers parse as docs/protocol.md says; refusals keep the connection usable."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import psycopg
import pytest

from tests.fixtures import PageserverProc
from zenith.pageserver.page_service import SYNTHETIC_REL
from zenith.postgres.keys import rel_block_key

PSQL = shutil.which("psql") or "/usr/bin/psql"


def psql(uri: str, command: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    return subprocess.run(
        [PSQL, uri, "-X", "-A", "-F", "|", "-v", "ON_ERROR_STOP=1", "-c", command],
        capture_output=True, text=True, timeout=60,
        env={**clean, "PGCONNECT_TIMEOUT": "10", **env},
    )


def rows(out: str) -> list[list[str]]:
    lines = out.strip().splitlines()
    return [line.split("|") for line in lines[1:-1]]  # header ... (N rows)


def test_psql_scram(pageserver: PageserverProc) -> None:
    res = psql(pageserver.uri(), "status")
    assert res.returncode == 0, res.stderr
    header = res.stdout.splitlines()[0].split("|")
    assert header[:3] == ["server_version", "repository_id", "listen_address"]
    (row,) = rows(res.stdout)
    assert row[0].startswith("zenith ") and len(row[1]) == 32
    assert row[2] == f"127.0.0.1:{pageserver.port}"
    res = psql(pageserver.uri(), "branch_create main")
    assert res.returncode == 0, res.stderr
    (row,) = rows(res.stdout)
    assert row[0] == "main" and len(row[1]) == 32 and row[4] == "0/0"


def test_psql_md5(pageserver_factory) -> None:  # type: ignore[no-untyped-def]
    ps = pageserver_factory("--auth-method", "md5")
    ps.add_user("reader", "s3cret pass", "read")
    res = psql(ps.uri("reader", "s3cret pass"), "branch_list")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0].split("|") == [
        "name", "timeline_id", "ancestor_timeline_id", "ancestor_lsn", "last_record_lsn"]
    bad = psql(ps.uri("reader", "wrong"), "status")
    assert bad.returncode != 0 and "password authentication failed" in bad.stderr


def _self_signed(dir: Path) -> None:
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=127.0.0.1", "-keyout", str(dir / "server.key"),
         "-out", str(dir / "server.crt")],
        check=True, capture_output=True,
    )


def test_tls_with_psql_and_psycopg(pageserver_factory) -> None:  # type: ignore[no-untyped-def]
    ps = pageserver_factory(start=False)
    _self_signed(ps.path)
    text = (ps.path / "config.toml").read_text()
    text = text.replace('# tls_cert_file = "server.crt"', 'tls_cert_file = "server.crt"')
    text = text.replace('# tls_key_file = "server.key"', 'tls_key_file = "server.key"')
    (ps.path / "config.toml").write_text(text)
    ps.start()
    res = psql(ps.uri(query="?sslmode=require"), "status")
    assert res.returncode == 0, res.stderr
    with psycopg.connect(ps.uri(query="?sslmode=require"), autocommit=True) as conn:
        assert conn.pgconn.ssl_in_use
        cur = psycopg.ClientCursor(conn)
        cur.execute("status")
        assert cur.fetchone()[0].startswith("zenith")


def test_psycopg_commands_and_refusals(pageserver: PageserverProc) -> None:
    pageserver.add_user("reader", "rpw", "read")
    with psycopg.connect(pageserver.uri(), autocommit=True) as conn:
        cur = psycopg.ClientCursor(conn)
        cur.execute("generate main 4 2 7")
        (name, _tid, start, last, records) = cur.fetchone()
        assert (name, start, records) == ("main", "0/0", "8")
        cur.execute(f"get_page main {last} {rel_block_key(SYNTHETIC_REL, 3).hex()}")
        (page,) = cur.fetchone()
        assert isinstance(page, bytes) and len(page) == 8192
        cur.execute("digest main")
        digest_row = cur.fetchone()
        assert digest_row[2] == last and len(digest_row[3]) == 64
        # an unknown command: 42601, and the connection stays usable
        with pytest.raises(psycopg.errors.SyntaxError):
            cur.execute("frobnicate")
        with pytest.raises(psycopg.errors.SyntaxError):
            cur.execute("get_page main not-an-lsn 00")
        with pytest.raises(psycopg.errors.UndefinedObject):
            cur.execute("digest nosuchbranch")
        cur.execute("branch_list")
        assert [r[0] for r in cur.fetchall()] == ["main"]
    # psycopg without autocommit wraps commands in BEGIN/COMMIT: accepted as no-ops
    with psycopg.connect(pageserver.uri("reader", "rpw")) as conn:
        cur = psycopg.ClientCursor(conn)
        cur.execute("status")
        assert cur.fetchone()[4:] == ("reader", "read")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            cur.execute("branch_create other")
        conn.rollback()
        cur.execute("branch_list")
        assert len(cur.fetchall()) == 1
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(pageserver.uri("reader", "nope"))
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(pageserver.uri("nobody", "nope"))


def test_extended_protocol_gets_a_clear_error(pageserver: PageserverProc) -> None:
    with psycopg.connect(pageserver.uri(), autocommit=True) as conn:
        # psycopg sends a query with parameters through the extended protocol
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            conn.execute("digest %s", ["main"])
        assert conn.execute("status").fetchone() is not None  # still usable
        # a ClientCursor merges parameters client side and sends a simple query
        cur = psycopg.ClientCursor(conn)
        with pytest.raises(psycopg.errors.UndefinedObject):
            cur.execute("digest %s", ["main"])
