"""PostgreSQL v3 wire protocol, both roles, hand-written on asyncio.

``messages`` and ``decoder`` are the sans-I/O codec; ``stream`` drives it from asyncio
streams; ``server`` (with ``session`` and ``auth``) is what the pageserver listens with;
``client`` (with ``conninfo``) is how the CLI and pageservers connect. See docs/pgwire.md.
"""

from zenith.pgwire.client import (
    ClientCopyStream,
    Connection,
    ConnInfo,
    Notice,
    QueryResult,
    connect,
    decode_bytea,
    mask_uri,
    parse_uri,
)
from zenith.pgwire.server import (
    Credentials,
    InMemoryCredentials,
    QueryHandler,
    ServerConfig,
    Session,
    StoredUser,
    close_server,
    make_md5_hash,
    make_scram_verifier,
    serve_connection,
    start_server,
)
from zenith.pgwire.session import CopyStream

__all__ = [
    "ClientCopyStream",
    "ConnInfo",
    "Connection",
    "CopyStream",
    "Credentials",
    "InMemoryCredentials",
    "Notice",
    "QueryHandler",
    "QueryResult",
    "ServerConfig",
    "Session",
    "StoredUser",
    "close_server",
    "connect",
    "decode_bytea",
    "make_md5_hash",
    "make_scram_verifier",
    "mask_uri",
    "parse_uri",
    "serve_connection",
    "start_server",
]
