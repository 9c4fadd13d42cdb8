"""Fixtures for the pgwire tests: a test query handler, servers (in the test's event loop or
on a thread of their own, for blocking peers such as psql and raw sockets), a self-signed
TLS certificate, and a clean environment for libpq programs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import ssl
import struct
import subprocess
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from zenith.errors import InvalidArgument, SyntaxError_
from zenith.pgwire.decoder import Decoder
from zenith.pgwire.messages import (
    BackendMessage,
    ErrorResponse,
    ReadyForQuery,
    Sender,
    StartupMessage,
)
from zenith.pgwire.server import (
    InMemoryCredentials,
    ServerConfig,
    Session,
    StoredUser,
    close_server,
    make_md5_hash,
    start_server,
)

USER, PASSWORD = "alice", "s3cret:p@ss/wörd"
MD5_ONLY_USER, MD5_ONLY_PASSWORD = "bob", "hunter2"


def make_credentials() -> InMemoryCredentials:
    return InMemoryCredentials([
        StoredUser.from_password(USER, PASSWORD, "admin"),
        StoredUser(MD5_ONLY_USER, "read", scram_verifier=None,
                   md5_hash=make_md5_hash(MD5_ONLY_USER, MD5_ONLY_PASSWORD)),
    ])


async def handler(session: Session, sql: str) -> None:
    """The commands the tests use."""
    command, _, arg = sql.strip().partition(" ")
    command = command.rstrip(";").lower()
    # psql 15.19 and later accept a COPY result only for a statement that is a COPY.
    if command == "copy":
        words = arg.upper().split()
        command, arg = ("copyin", "") if "FROM" in words else ("copyout", words[-1])
    if command == "echo":
        await session.send_rows(
            ["user", "database", "arg", "tls", "application_name"],
            [[session.user.name, session.database, arg or None, "on" if session.tls else "off",
              session.application_name]], "SELECT 1")
    elif command == "fail":
        raise InvalidArgument("you asked for it", detail="some detail", hint="some hint")
    elif command == "crash":
        raise RuntimeError("handler bug")
    elif command == "notice":
        for step in range(int(arg or 3)):
            await session.send_notice(f"step {step}")
        await session.send_command_complete("NOTICE")
    elif command == "bytes":
        await session.send_rows(["v", "t"], [[b"\x00\xff", "x"], [None, None]], "SELECT 2")
    elif command == "rows":
        count = int(arg)
        await session.send_rows(["n"], ([str(i)] for i in range(count)), f"SELECT {count}")
    elif command == "copyboth":  # echo each chunk upper-cased, then a summary
        stream = await session.copy_both()
        total = 0
        async for chunk in stream:
            total += len(chunk)
            await stream.write(chunk.upper())
        await stream.done()
        await session.send_rows(["bytes"], [[str(total)]], "SELECT 1")
    elif command == "copyboth_fail":
        stream = await session.copy_both()
        await stream.read()
        raise InvalidArgument("rejected the stream")
    elif command == "copyout":
        stream = await session.copy_out()
        for i in range(int(arg or 3)):
            await stream.write(f"line {i}\n".encode())
        await stream.done()
        await session.send_command_complete(f"COPY {arg or 3}")
    elif command == "copyin":
        stream = await session.copy_in()
        data = b"".join([chunk async for chunk in stream])
        await session.send_command_complete(f"COPY {len(data)}")
    elif command == "sleep":
        await asyncio.sleep(float(arg or 30))
        await session.send_command_complete("SLEEP")
    elif command in ("begin", "commit", "rollback", "set", "reset"):
        pass  # completed by the server with the upper-cased first word
    else:
        raise SyntaxError_(f'unknown command "{command}"')


def free_errors(loop: asyncio.AbstractEventLoop, sink: list[dict[str, Any]]) -> None:
    """Record anything the event loop would report as an unhandled error."""
    loop.set_exception_handler(lambda _loop, context: sink.append(context))


class _ErrorLogs(logging.Handler):
    """Errors the server logs other than a query handler's own failure (the "crash"
    command): an exception that escaped the protocol code."""

    def __init__(self, sink: list[dict[str, Any]]):
        super().__init__(logging.ERROR)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        if not record.msg.startswith("internal error in query handler"):
            self.sink.append({"log": record.getMessage(), "exc": record.exc_info})


@contextlib.contextmanager
def server_error_logs(sink: list[dict[str, Any]]) -> Iterator[None]:
    handler = _ErrorLogs(sink)
    logger = logging.getLogger("zenith.pgwire")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


@dataclass
class RunningServer:
    server: asyncio.Server
    port: int
    errors: list[dict[str, Any]] = field(default_factory=list)

    def uri(self, user: str = USER, password: str | None = PASSWORD, *,
            query: str = "sslmode=disable", host: str = "127.0.0.1") -> str:
        return make_uri(self.port, user, password, query=query, host=host)


def make_uri(port: int, user: str = USER, password: str | None = PASSWORD, *,
             query: str = "sslmode=disable", host: str = "127.0.0.1") -> str:
    auth = quote(user, safe="")
    if password is not None:
        auth += ":" + quote(password, safe="")
    return f"postgresql://{auth}@{host}:{port}/testdb?{query}"


ServerFactory = Callable[..., Awaitable[RunningServer]]


@pytest.fixture
async def pg_server() -> AsyncIterator[ServerFactory]:
    """``await pg_server(**ServerConfig kwargs)``: a server in the test's event loop."""
    servers: list[RunningServer] = []
    errors: list[dict[str, Any]] = []
    free_errors(asyncio.get_running_loop(), errors)
    logs = server_error_logs(errors)
    logs.__enter__()

    async def start(**config: Any) -> RunningServer:
        server = await start_server("127.0.0.1", 0, config=ServerConfig(**config),
                                    credentials=make_credentials(), handler=handler)
        running = RunningServer(server, server.sockets[0].getsockname()[1], errors)
        servers.append(running)
        return running

    yield start
    for running in servers:
        await close_server(running.server)
    logs.__exit__(None, None, None)
    assert not errors, f"unhandled errors in the event loop: {errors}"


class ThreadedServer:
    """A server on an event loop of its own thread, for blocking clients."""

    def __init__(self, **config: Any):
        self.errors: list[dict[str, Any]] = []
        self.loop = asyncio.new_event_loop()
        free_errors(self.loop, self.errors)
        self._logs = server_error_logs(self.errors)
        self._logs.__enter__()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(config, ready), daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("test server did not start")

    def _run(self, config: dict[str, Any], ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)

        async def start() -> asyncio.Server:
            return await start_server("127.0.0.1", 0, config=ServerConfig(**config),
                                      credentials=make_credentials(), handler=handler)

        self.server = self.loop.run_until_complete(start())
        self.port = self.server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    def stop(self) -> None:
        future = asyncio.run_coroutine_threadsafe(close_server(self.server), self.loop)
        future.result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()
        self._logs.__exit__(None, None, None)

    def uri(self, user: str = USER, password: str | None = PASSWORD, *,
            query: str = "sslmode=disable") -> str:
        return make_uri(self.port, user, password, query=query)


@pytest.fixture(scope="module")
def trust_server() -> Iterator[ThreadedServer]:
    server = ThreadedServer(auth_method="trust", auth_timeout=3.0)
    yield server
    server.stop()
    assert not server.errors, server.errors


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(certificate, key) of a self-signed certificate for "localhost" only."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "server.crt", directory / "server.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost"],
        check=True, capture_output=True, timeout=30)
    key.chmod(0o600)
    return cert, key


@pytest.fixture(scope="session")
def server_ssl_context(tls_files: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*tls_files)
    return context


@pytest.fixture
def libpq_env(tmp_path: Path) -> dict[str, str]:
    """An environment for psql with nothing inherited that could change the connection."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(HOME=str(home), PGCONNECT_TIMEOUT="5", PGPASSFILE=str(home / "nonexistent"),
               LC_ALL="C.UTF-8", PGGSSENCMODE="disable")
    return env


# -- raw socket helpers for hostile-input tests ---------------------------------------


def recv_all(sock: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """Everything the server sends within ``timeout``; (data, whether it closed)."""
    sock.settimeout(timeout)
    chunks = []
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return b"".join(chunks), True
            chunks.append(chunk)
    except TimeoutError:
        return b"".join(chunks), False
    except OSError:  # reset by the server
        return b"".join(chunks), True


def decode_backend(data: bytes) -> list[BackendMessage]:
    decoder = Decoder(Sender.BACKEND)
    decoder.feed(data)
    messages = list(decoder)
    assert decoder.buffered == 0, f"trailing bytes from the server: {data[-40:]!r}"
    return messages  # type: ignore[return-value]


def trust_login(port: int) -> socket.socket:
    """A raw socket, logged in to a trust server, after ReadyForQuery."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(StartupMessage.build({"user": USER, "database": "db"}).encode())
    decoder = Decoder(Sender.BACKEND)
    while True:
        data = sock.recv(65536)
        assert data, "server closed during login"
        decoder.feed(data)
        for message in decoder:
            assert not isinstance(message, ErrorResponse), message
            if isinstance(message, ReadyForQuery):
                return sock


def header(code: bytes, length: int) -> bytes:
    return code + struct.pack("!I", length)
