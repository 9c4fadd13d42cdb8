"""The pageserver process: repository + users + pgwire listener, and its pid file.

``run_pageserver`` serves in the foreground until SIGTERM or SIGINT, then stops listening,
lets open connections finish briefly, closes the repository and removes the pid file. The
pid file is locked (``flock``) for the life of the process, which is how ``zenith start``
and a second ``zenith pageserver`` know that one is already running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import ssl
import sys
import time
from typing import Any, Final

from zenith import __version__
from zenith.errors import InvalidArgument

# Importing a command module registers its commands with the dispatcher.
from zenith.pageserver import export_service, gc_service, transfer_service, wal_service
from zenith.pageserver.config import RepoConfig, parse_listen, secure_repository
from zenith.pageserver.page_service import dispatch
from zenith.pageserver.pidfile import PidFile
from zenith.pageserver.users import UserStore
from zenith.pageserver.workers import Workers
from zenith.pgwire.conninfo import MaskSecrets
from zenith.pgwire.server import (
    CancelRegistry,
    ConnectionSlots,
    ServerConfig,
    Session,
    close_server,
    start_server,
)
from zenith.storage import SqliteRepository, open_repository
from zenith.transfer.channel import TransferLocks

#: Seconds a thread holds the GIL while another waits for it (Python's default: 0.005).
SWITCH_INTERVAL: Final = 0.0005

log = logging.getLogger("zenith.pageserver")
_COMMAND_MODULES = (export_service, gc_service, transfer_service, wal_service)


class Pageserver:
    """What command handlers see: the repository, the users and the configuration."""

    def __init__(self, config: RepoConfig, repo: SqliteRepository, users: UserStore) -> None:
        self.config = config
        self.repo = repo
        self.users = users
        self.listen = config.listen
        self.started = time.monotonic()
        #: Incoming pushes and pulls lock their destination name and timelines.
        self.transfer_locks = TransferLocks()
        self.followers: dict[str, wal_service.Follower] = {}  # branches following PostgreSQL
        sizes = config.workers
        self.workers = Workers(short_threads=sizes["worker_short_threads"],
                               long_threads=sizes["worker_long_threads"],
                               wal_threads=sizes["worker_wal_threads"],
                               long_per_user=sizes["long_jobs_per_user"])

    async def handle(self, session: Session, query: str) -> None:
        await dispatch(self, session, query)


def _ssl_context(config: RepoConfig) -> ssl.SSLContext | None:
    """The server's TLS context: its certificate, and with ``tls_ca_file`` the CA whose
    client certificates it accepts (a certificate a client sends is then checked on every
    listener; ``cert``/``scram+cert`` listeners require one)."""
    files = config.tls_files
    if files is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(str(files[0]), str(files[1]))
        ca = config.tls_ca_file
        if ca is not None:
            ctx.load_verify_locations(str(ca))
            ctx.verify_mode = ssl.CERT_OPTIONAL
    except (OSError, ssl.SSLError) as exc:
        raise InvalidArgument(f"cannot load the TLS files named in {config.path}/config.toml: "
                              f"{exc}") from None
    return ctx


async def _listen(host: str, port: int, **kw: Any) -> asyncio.Server:
    try:
        return await start_server(host, port, **kw)
    except OSError as exc:
        raise InvalidArgument(f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                              hint="another process (or another listen address of this "
                                   "pageserver) holds it; see listen and [[listeners]] in "
                                   "config.toml") from None


async def serve(server: Pageserver, stop: asyncio.Event) -> None:
    context = _ssl_context(server.config)
    registry, slots = CancelRegistry(), ConnectionSlots()  # shared by every address
    listeners = []
    try:
        for n, (listen, method) in enumerate(server.config.listeners):
            host, port = parse_listen(listen)
            listeners.append(await _listen(
                host,
                port,
                config=ServerConfig(
                    auth_method=method,
                    admin_listener=n == 0,
                    ssl_context=context,
                    server_version=f"15.0 (zenith {__version__})",
                    max_query_size=server.config.max_query_size,
                    max_connections=server.config.max_connections,
                    max_connections_per_user=server.config.max_connections_per_user,
                    reserved_connections=server.config.reserved_connections,
                    idle_timeout=server.config.idle_timeout,
                    statement_timeout=server.config.statement_timeout,
                ),
                credentials=server.users,
                handler=server.handle,
                cancel_registry=registry,
                slots=slots,
            ))
            log.info("zenith %s listening on %s (auth %s%s, repository %s)", __version__,
                     listen, method, ", TLS" if context is not None else "",
                     server.config.path)
        wal_service.resume_followers(server)
        collector = asyncio.create_task(gc_service.background_gc(server, stop))
        await stop.wait()
        collector.cancel()  # a pass in progress stops at its next batch
        with contextlib.suppress(asyncio.CancelledError):
            await collector
    finally:
        log.info("shutting down")
        await wal_service.stop_followers(server)
        await asyncio.gather(*(close_server(listener, grace=5.0) for listener in listeners))


def run_pageserver(config: RepoConfig) -> None:
    """Serve in the foreground until SIGTERM/SIGINT.

    Files it creates are private (umask 077), a repository directory or file open to other
    users is made private with a warning, and every log line goes through
    :class:`MaskSecrets` (no password in the log, whatever wrote it)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, MaskSecrets) for f in handler.filters):
            handler.addFilter(MaskSecrets())
    os.umask(0o077)
    # WAL ingest keeps a worker thread busy in Python while catching up; at the default
    # 5 ms switch interval the event loop waits that long for the GIL after every socket
    # read, and the replication stream (hence catch-up) crawls (docs/ingest.md).
    sys.setswitchinterval(SWITCH_INTERVAL)
    for warning in secure_repository(config.path):
        log.warning("%s", warning)
    pid = PidFile(config.pid_path)
    pid.acquire(config.listen)
    # What bucket transfers left on their way when the process was killed.
    shutil.rmtree(config.path / transfer_service.SCRATCH, ignore_errors=True)
    repo = open_repository(config.db_path)
    try:
        server = Pageserver(config, repo, UserStore(config.users_path))

        async def main() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            await serve(server, stop)

        try:
            asyncio.run(main())
        finally:
            # Cancelled jobs end promptly; none may run on a closed repository.
            server.workers.shutdown(wait=True)
    finally:
        repo.close()
        pid.release()
        log.info("stopped")
