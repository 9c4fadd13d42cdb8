"""Real PostgreSQL clients against our server: psql (libpq) and psycopg 3.

psql runs as a subprocess while the server keeps running on its own event loop (a thread
for the blocking ``subprocess.run``); psycopg's async connection shares the test's loop.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from .conftest import PASSWORD, USER, ServerFactory, ThreadedServer, make_uri

PSQL = shutil.which("psql")
needs_psql = pytest.mark.skipif(PSQL is None, reason="psql is not installed")


def psql(uri: str, command: str, env: dict[str, str],
         stdin: str = "") -> subprocess.CompletedProcess[str]:
    assert PSQL is not None
    return subprocess.run([PSQL, "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", uri, "-c", command],
                          env=env, input=stdin, capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module", params=["scram-sha-256", "md5"])
def threaded_server(request: pytest.FixtureRequest) -> Iterator[ThreadedServer]:
    server = ThreadedServer(auth_method=request.param)
    yield server
    server.stop()
    assert not server.errors, server.errors


@needs_psql
def test_psql_runs_commands(threaded_server: ThreadedServer, libpq_env: dict[str, str]) -> None:
    done = psql(threaded_server.uri(query="application_name=psqltest"), "echo hello",
                libpq_env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{USER}|testdb|hello|off|psqltest"


@needs_psql
def test_psql_sees_errors_with_detail_and_hint(threaded_server: ThreadedServer,
                                               libpq_env: dict[str, str]) -> None:
    done = psql(threaded_server.uri(), "fail", libpq_env)
    assert done.returncode == 1
    assert "ERROR:  you asked for it" in done.stderr
    assert "DETAIL:  some detail" in done.stderr and "HINT:  some hint" in done.stderr


@needs_psql
def test_psql_notices_and_bytea(threaded_server: ThreadedServer,
                                libpq_env: dict[str, str]) -> None:
    done = psql(threaded_server.uri(), "notice 2", libpq_env)
    assert done.returncode == 0, done.stderr
    assert "NOTICE:  step 0" in done.stderr and "NOTICE:  step 1" in done.stderr
    done = psql(threaded_server.uri(), "bytes", libpq_env)
    assert done.stdout.splitlines()[0] == "\\x00ff|x"


@needs_psql
def test_psql_wrong_password(threaded_server: ThreadedServer,
                             libpq_env: dict[str, str]) -> None:
    done = psql(threaded_server.uri(password="wrong"), "echo", libpq_env)
    assert done.returncode == 2
    assert f'password authentication failed for user "{USER}"' in done.stderr
    assert psql(threaded_server.uri(), "echo", libpq_env).returncode == 0


@needs_psql
def test_psql_password_from_environment(threaded_server: ThreadedServer,
                                        libpq_env: dict[str, str]) -> None:
    done = psql(threaded_server.uri(password=None), "echo", {**libpq_env,
                                                             "PGPASSWORD": PASSWORD})
    assert done.returncode == 0, done.stderr


@needs_psql
def test_psql_copy_out_and_in(threaded_server: ThreadedServer,
                              libpq_env: dict[str, str]) -> None:
    done = psql(threaded_server.uri(), "COPY lines TO STDOUT 3", libpq_env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "line 0\nline 1\nline 2\n"
    done = psql(threaded_server.uri(), "COPY lines FROM STDIN", libpq_env,
                stdin="hello\nworld\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "COPY 12"


@needs_psql
def test_psql_over_tls(server_ssl_context: ssl.SSLContext, libpq_env: dict[str, str]) -> None:
    server = ThreadedServer(ssl_context=server_ssl_context)
    try:
        for mode in ("require", "prefer"):
            done = psql(server.uri(query=f"sslmode={mode}"), "echo", libpq_env)
            assert done.returncode == 0, done.stderr
            assert done.stdout.strip().split("|")[3] == "on"
    finally:
        server.stop()
    assert not server.errors


# -- psycopg 3 -----------------------------------------------------------------------


def psycopg_uri(server: Any) -> str:
    return make_uri(server.port, query="sslmode=disable")


async def test_psycopg_simple_queries(pg_server: ServerFactory) -> None:
    server = await pg_server()
    async with await psycopg.AsyncConnection.connect(psycopg_uri(server),
                                                     autocommit=True) as conn:
        assert conn.info.server_version == 150000
        cursor = await conn.execute("echo")  # no parameters: simple query protocol
        assert await cursor.fetchall() == [(USER, "testdb", None, "off", "")]
        cursor = conn.cursor()
        await cursor.execute("bytes")
        assert [d.name for d in cursor.description or []] == ["v", "t"]
        assert (await cursor.fetchone()) == (b"\x00\xff", "x")  # bytea decoded by psycopg
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="you asked for it"):
            await conn.execute("fail")
        notices: list[str] = []
        conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        await conn.execute("notice 2")
        assert notices == ["step 0", "step 1"]


async def test_psycopg_client_cursor_with_parameters(pg_server: ServerFactory) -> None:
    server = await pg_server()
    async with await psycopg.AsyncConnection.connect(
            psycopg_uri(server), autocommit=True,
            cursor_factory=psycopg.AsyncClientCursor) as conn:
        cursor = await conn.execute("echo %s", ["it's"])  # merged client-side
        assert (await cursor.fetchone() or ())[2] == "'it''s'"


async def test_psycopg_extended_protocol_gets_a_clear_error(pg_server: ServerFactory) -> None:
    server = await pg_server()
    async with await psycopg.AsyncConnection.connect(psycopg_uri(server),
                                                     autocommit=True) as conn:
        for kwargs in ({"params": ["x"]}, {"prepare": True}, {"binary": True}):
            query = "echo %s" if "params" in kwargs else "echo"
            with pytest.raises(psycopg.errors.FeatureNotSupported,
                               match="extended query protocol is not supported"):
                await conn.execute(query, **kwargs)
            cursor = await conn.execute("echo")  # and the connection still works
            assert (await cursor.fetchone() or ())[0] == USER


async def test_psycopg_copy(pg_server: ServerFactory) -> None:
    server = await pg_server()
    async with await psycopg.AsyncConnection.connect(psycopg_uri(server),
                                                     autocommit=True) as conn:
        cursor = conn.cursor()
        async with cursor.copy("copyout 2") as copy:
            assert [bytes(chunk) async for chunk in copy] == [b"line 0\n", b"line 1\n"]
        async with cursor.copy("copyin") as copy:
            await copy.write(b"12345")
        assert cursor.statusmessage == "COPY 5"
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            async with conn.pipeline():  # pipelines use the extended protocol
                await conn.execute("echo")
        assert (await (await conn.execute("echo")).fetchone() or ())[0] == USER


async def test_psycopg_without_autocommit(pg_server: ServerFactory) -> None:
    server = await pg_server()
    async with await psycopg.AsyncConnection.connect(psycopg_uri(server)) as conn:
        cursor = await conn.execute("echo")  # preceded by BEGIN, a no-op
        assert (await cursor.fetchone() or ())[0] == USER
        await conn.commit()


async def test_psycopg_wrong_password(pg_server: ServerFactory) -> None:
    server = await pg_server()
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        await psycopg.AsyncConnection.connect(make_uri(server.port, password="nope"))
