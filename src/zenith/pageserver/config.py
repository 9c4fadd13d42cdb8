"""The repository directory and its ``config.toml``.

Layout of a repository directory (``./.zenith`` unless ``-D``/``ZENITH_REPO_DIR`` say
otherwise)::

    config.toml      listen address, authentication, TLS, the local CLI's credentials (0600)
    tls/             with ``zenith init --tls``: a CA, the server's and the CLI's certificates
    zenith.db        the repository's index and metadata (storage)
    zenith.db.d/     the repository's data files, one per timeline
    users.json       users and their SCRAM/MD5 verifiers, never passwords (0600)
    pageserver.pid   pid of the running pageserver
    pageserver.log   log of a pageserver started with ``zenith start``

The directory is 0700 and every file in it 0600 (:func:`secure_repository` makes a wider
one private again when the pageserver starts, with a warning; docs/security.md).
``config.toml`` is read and written with tomlkit, so comments a user adds survive.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import tomlkit
import tomlkit.exceptions

from zenith.bucket.layout import is_s3_uri, parse_s3_uri
from zenith.errors import AlreadyExists, InvalidArgument, NotFound, PermissionDenied
from zenith.pgwire.conninfo import file_parameters, mask_uri, parse_uri
from zenith.transfer.messages import DEFAULT_TIMEOUT

if TYPE_CHECKING:
    from zenith.pageserver.retention import Window

DEFAULT_LISTEN: Final = "127.0.0.1:64000"
AUTH_METHODS: Final = ("scram-sha-256", "md5", "trust", "cert", "scram+cert")
#: Methods that need TLS and a client certificate whose CN is the user name.
CERT_METHODS: Final = ("cert", "scram+cert")
CONFIG_FILE: Final = "config.toml"
DB_FILE: Final = "zenith.db"
USERS_FILE: Final = "users.json"
PID_FILE: Final = "pageserver.pid"
LOG_FILE: Final = "pageserver.log"
CERTS_DIR: Final = "certs"
ADMIN_USER: Final = "admin"

_HOST_PORT: Final = re.compile(
    r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9.\-]+)):(?P<port>\d{1,5})"
)


#: config.toml's limits and their defaults (docs/limits.md).
LIMITS: Final[dict[str, float]] = {
    "max_query_size": 1024 * 1024,
    "max_connections": 256,
    "max_connections_per_user": 64,
    "reserved_connections": 3,
    "idle_timeout": 300.0,
    "statement_timeout": 600.0,
    "max_delta_chain": 10_000,
    "worker_short_threads": 8,
    "worker_long_threads": 4,
    "worker_wal_threads": 4,
    "long_jobs_per_user": 2,
    "gc_period": 600,
    "bucket_segment_bytes": 32 * 1024 * 1024,
}

LIMIT_COMMENTS: Final = (
    "limits (docs/limits.md), with their defaults:",
    "max_query_size = 1048576  # bytes of one command's text",
    "max_connections = 256  # connections at once; more are refused (53300)",
    "max_connections_per_user = 64  # signed-in connections of one non-admin user",
    "reserved_connections = 3  # of max_connections, slots only admins may take",
    "idle_timeout = 300  # seconds between commands before a connection is closed; 0: never",
    "statement_timeout = 600  # seconds a command may go without reading or sending",
    "max_delta_chain = 10000  # deltas get_page applies before it refuses (54000)",
    "worker_short_threads = 8  # threads for quick steps (get_page, branch changes)",
    "worker_long_threads = 4  # threads for digest, export, push/pull steps",
    "worker_wal_threads = 4  # threads for WAL ingest and base-backup imports",
    "long_jobs_per_user = 2  # long jobs one non-admin user runs at once; more wait",
    "history windows (docs/storage.md): every branch's, and per branch in [pitr_branches]",
    'pitr = "7d"  # a time ("12h", "30m"), an LSN distance ("2GiB") or "forever"',
    "gc_period = 600  # seconds between background GC runs; 0: only `zenith gc`",
    "bucket_segment_bytes = 33554432  # a push to a bucket cuts segment objects of about this",
)

_ORIGIN_NAME: Final = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,62}")


class RepoNotFound(NotFound):
    pass


class UnknownOrigin(NotFound):
    pass


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) to its parts."""
    match = _HOST_PORT.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None or not 0 < int(match["port"]) < 65536:
        raise InvalidArgument(f"invalid listen address {text!r}: expected HOST:PORT")
    return match["v6"] or match["host"], int(match["port"])


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically with mode 0600 (never readable by others)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def private_opener(path: str, flags: int) -> int:
    """``open(..., opener=private_opener)``: a file created by it has mode 0600, and a
    symbolic link in its place is refused, never followed."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InvalidArgument(f"{path} is a symbolic link; zenith does not write through "
                                  "one", hint=f"remove {path}") from None
        raise


#: zenith's own files in the repository directory, the ones :func:`secure_repository`
#: makes private (a user's own file there, e.g. a TLS certificate, is left alone).
OWN_FILES: Final = (CONFIG_FILE, CONFIG_FILE + ".lock", USERS_FILE, PID_FILE, LOG_FILE,
                    DB_FILE, DB_FILE + "-wal", DB_FILE + "-shm", DB_FILE + "-journal")
#: The directory of data files beside the database (every regular file in it is zenith's).
DATA_DIR: Final = DB_FILE + ".d"


def _private(dir_fd: int, name: str, shown: str, *, directory: bool,
             warnings: list[str]) -> bool | None:
    """Clear the group/other bits of ``name`` (relative to ``dir_fd``) through a descriptor
    opened ``O_NOFOLLOW``, never through a path: True if it was changed, False if it was
    private already, None if it is missing or was skipped (a symbolic link, not the kind
    expected, or swapped during the check: with a warning)."""
    try:
        before = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    kind_ok = stat.S_ISDIR if directory else stat.S_ISREG
    if stat.S_ISLNK(before.st_mode):
        warnings.append(f"{shown} is a symbolic link; left alone (not followed)")
        return None
    if not kind_ok(before.st_mode):
        warnings.append(f"{shown} is not a {'directory' if directory else 'regular file'}; "
                        "left alone")
        return None
    if not stat.S_IMODE(before.st_mode) & 0o077:
        return False
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(name, flags | (os.O_DIRECTORY if directory else 0), dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):  # swapped since the stat
            warnings.append(f"{shown} changed while it was checked; left alone")
            return None
        warnings.append(f"{shown} has mode {stat.S_IMODE(before.st_mode):04o}, open to other "
                        f"users, and cannot be opened to fix it: {exc.strerror}")
        return None
    try:
        info = os.fstat(fd)
        if (info.st_dev, info.st_ino) != (before.st_dev, before.st_ino) or \
                not kind_ok(info.st_mode):
            warnings.append(f"{shown} changed while it was checked; left alone")
            return None
        mode = stat.S_IMODE(info.st_mode)
        if not mode & 0o077:
            return False
        os.fchmod(fd, mode & ~0o077)
        return True
    finally:
        os.close(fd)


def secure_repository(path: Path) -> list[str]:
    """Clear the group/other permission bits (the owner's are kept) of the repository
    directory and of zenith's own files in it (:data:`OWN_FILES`, the data files directory
    and the regular files in it); returns the warnings to show. Everything inside is
    opened relative to a directory descriptor with ``O_NOFOLLOW`` and changed with
    ``fchmod`` (no ``chmod(..., follow_symlinks=False)``, which older glibc lacks): a
    symbolic link is never followed, only named in a warning; anything else in the
    directory is not touched."""
    warnings: list[str] = []
    try:
        top = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise RepoNotFound(f"no zenith repository at {path}") from None
    try:
        mode = stat.S_IMODE(os.fstat(top).st_mode)
        if mode & 0o077:
            try:
                os.fchmod(top, mode & ~0o077)
            except PermissionError as exc:
                raise InvalidArgument(
                    f"repository directory {path} has mode {mode:04o}, open to other users, "
                    f"and cannot be made private: {exc.strerror}",
                    hint=f"chmod go-rwx {path} as its owner") from None
            warnings.append(f"repository directory {path} had mode {mode:04o}, open to other "
                            f"users; changed to {mode & ~0o077:04o}")
        fixed = 0
        for name in OWN_FILES:
            fixed += bool(_private(top, name, str(path / name), directory=False,
                                   warnings=warnings))
        data = path / DATA_DIR
        changed = _private(top, DATA_DIR, str(data), directory=True, warnings=warnings)
        if changed is not None:
            fixed += changed
            try:
                data_fd = os.open(DATA_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW |
                                  os.O_CLOEXEC, dir_fd=top)
            except OSError as exc:
                warnings.append(f"{data} cannot be opened to check its files: {exc.strerror}")
            else:
                try:
                    for name in sorted(os.listdir(data_fd)):
                        fixed += bool(_private(data_fd, name, str(data / name),
                                               directory=False, warnings=warnings))
                finally:
                    os.close(data_fd)
    finally:
        os.close(top)
    if fixed:
        warnings.append(f"{fixed} of zenith's files or directories in {path} were open to "
                        "other users; group and other access removed")
    return warnings


def resolve_repo_dir(option: str | os.PathLike[str] | None) -> Path:
    if option:
        return Path(option)
    env = os.environ.get("ZENITH_REPO_DIR")
    return Path(env) if env else Path.cwd() / ".zenith"


@dataclass
class RepoConfig:
    """A repository directory and its parsed ``config.toml``."""

    path: Path
    doc: tomlkit.TOMLDocument

    # -- creation and loading --------------------------------------------------------------

    @classmethod
    def create(
        cls, path: Path, *, listen: str = DEFAULT_LISTEN, auth_method: str = "scram-sha-256",
        tls_dir: str | None = None,
    ) -> tuple[RepoConfig, str]:
        """Create the directory and ``config.toml``; returns the config and the admin
        password generated for the local CLI. ``tls_dir``: the directory (relative to the
        repository) where ``zenith init --tls`` put ``ca.crt``, ``server.crt``/``.key``
        and ``admin.crt``/``.key``: TLS is on, client certificates of that CA are
        accepted, and the local CLI checks the server's certificate and has one."""
        parse_listen(listen)
        if auth_method not in AUTH_METHODS:
            raise InvalidArgument(f"unknown auth method {auth_method!r}: one of {AUTH_METHODS}")
        if auth_method in CERT_METHODS and tls_dir is None:
            raise InvalidArgument(f"auth method {auth_method} needs TLS and a CA for client "
                                  "certificates", hint="add --tls")
        if (path / CONFIG_FILE).exists():
            raise InvalidArgument(f"{path} already holds a zenith repository")
        try:
            path.mkdir(parents=True, mode=0o700)
        except FileExistsError:
            # An existing directory is made private only when it is empty: one holding
            # other things keeps its mode (`zenith start` then removes group/other access
            # from the directory itself, with a warning).
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                if not os.listdir(fd):
                    os.fchmod(fd, 0o700)
            finally:
                os.close(fd)
        password = secrets.token_urlsafe(24)
        doc = tomlkit.document()
        doc.add(tomlkit.comment("zenith pageserver configuration"))
        doc.add("listen", listen)
        doc["listen"].comment("HOST:PORT the pageserver listens on")
        doc.add("auth_method", auth_method)
        doc["auth_method"].comment("scram-sha-256 | md5 | trust | cert | scram+cert")
        if tls_dir is None:
            doc.add(tomlkit.comment('tls_cert_file = "server.crt"  # TLS when both are set'))
            doc.add(tomlkit.comment('tls_key_file = "server.key"'))
            doc.add(tomlkit.comment('tls_ca_file = "ca.crt"  # CA of client certificates '
                                    "(cert, scram+cert)"))
        else:
            doc.add("tls_cert_file", f"{tls_dir}/server.crt")
            doc["tls_cert_file"].comment("TLS: this server's certificate and key")
            doc.add("tls_key_file", f"{tls_dir}/server.key")
            doc.add("tls_ca_file", f"{tls_dir}/ca.crt")
            doc["tls_ca_file"].comment("CA of client certificates (cert, scram+cert)")
        doc.add(tomlkit.comment("transfer_timeout = 60  # seconds before a silent peer of a "
                                "push or pull is dropped"))
        for line in LIMIT_COMMENTS:
            doc.add(tomlkit.comment(line))
        doc.add(tomlkit.nl())
        cli = tomlkit.table()
        cli.add(tomlkit.comment("credentials the local `zenith` command uses to reach it"))
        cli.add("user", ADMIN_USER)
        cli.add("password", password)
        if tls_dir is not None:
            cli.add("sslrootcert", f"{tls_dir}/ca.crt")
            cli.add("sslcert", f"{tls_dir}/admin.crt")
            cli.add("sslkey", f"{tls_dir}/admin.key")
        doc.add("cli", cli)
        doc.add(tomlkit.nl())
        doc.add(tomlkit.comment("more addresses, each with its own method (docs/pgwire.md); "
                                "they never take the reserved_connections slots:"))
        doc.add(tomlkit.comment("[[listeners]]"))
        doc.add(tomlkit.comment('listen = "0.0.0.0:64443"'))
        doc.add(tomlkit.comment('auth_method = "cert"'))
        config = cls(path, doc)
        config.save()
        return config, password

    @classmethod
    def load(cls, path: Path) -> RepoConfig:
        file = path / CONFIG_FILE
        try:
            text = file.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise RepoNotFound(
                f"no zenith repository at {path}",
                hint="run `zenith init`, or point -D / ZENITH_REPO_DIR at one",
            ) from None
        try:
            doc = tomlkit.parse(text)
        except tomlkit.exceptions.TOMLKitError as exc:
            raise InvalidArgument(f"{file} is not valid TOML: {exc}") from exc
        config = cls(path, doc)
        parse_listen(config.listen)  # refuse a bad address now, not when it is used
        if config.auth_method not in AUTH_METHODS:
            raise InvalidArgument(f"{file}: auth_method must be one of {AUTH_METHODS}")
        config.listeners  # noqa: B018 - checks [[listeners]] and the TLS files they need
        config.pitr  # noqa: B018 - and the history windows
        return config

    def save(self) -> None:
        write_private(self.path / CONFIG_FILE, tomlkit.dumps(self.doc))

    @contextlib.contextmanager
    def updating(self) -> Iterator[tomlkit.TOMLDocument]:
        """Read-modify-write of ``config.toml``: the CLI (origins) and the pageserver
        (sources) both write it, so each change starts from the file as it is now, under
        a lock, and is saved atomically."""
        with open(self.path / (CONFIG_FILE + ".lock"), "a", opener=private_opener) as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            self.doc = RepoConfig.load(self.path).doc
            yield self.doc
            self.save()

    # -- values ----------------------------------------------------------------------------

    def _get(self, name: str, default: Any = None) -> Any:
        value = self.doc.get(name, default)
        return value.unwrap() if hasattr(value, "unwrap") else value

    @property
    def listen(self) -> str:
        return str(self._get("listen", DEFAULT_LISTEN))

    @property
    def listen_address(self) -> tuple[str, int]:
        return parse_listen(self.listen)

    @property
    def auth_method(self) -> str:
        return str(self._get("auth_method", "scram-sha-256"))

    @property
    def transfer_timeout(self) -> float:
        """Seconds a push or pull waits for a silent peer before dropping it (DESIGN §12)."""
        value = self._get("transfer_timeout", DEFAULT_TIMEOUT)
        if isinstance(value, bool) or not isinstance(value, int | float) or \
                not 0 < value <= 86400:
            raise InvalidArgument(
                f"{self.path / CONFIG_FILE}: transfer_timeout must be seconds in (0, 86400]"
            )
        return float(value)

    def _limit(self, name: str, low: float, high: float, *, integer: bool = False) -> float:
        value = self._get(name, LIMITS[name])
        if isinstance(value, bool) or not isinstance(value, int | float) or \
                not low <= value <= high or (integer and not isinstance(value, int)):
            kind = "an integer" if integer else "a number"
            raise InvalidArgument(
                f"{self.path / CONFIG_FILE}: {name} must be {kind} in [{low:g}, {high:g}]")
        return value

    @property
    def bucket_segment_bytes(self) -> int:
        """A push to a bucket cuts a new segment object at the first LSN boundary past
        this many bytes of frames (docs/s3.md)."""
        return int(self._limit("bucket_segment_bytes", 64 * 1024, 4 << 30, integer=True))

    @property
    def max_query_size(self) -> int:
        """Bytes of one command's text after sign-in (COPY data is not a query)."""
        return int(self._limit("max_query_size", 1024, 64 * 1024 * 1024, integer=True))

    @property
    def max_connections(self) -> int:
        """Connections at once, signing in or signed in."""
        return int(self._limit("max_connections", 1, 100_000, integer=True))

    @property
    def max_connections_per_user(self) -> int:
        """Signed-in connections of one non-admin user."""
        return int(self._limit("max_connections_per_user", 1, 100_000, integer=True))

    @property
    def reserved_connections(self) -> int:
        """Of ``max_connections``, the slots only admins may take."""
        value = int(self._limit("reserved_connections", 0, 100_000, integer=True))
        if value >= self.max_connections:
            raise InvalidArgument(f"{self.path / CONFIG_FILE}: reserved_connections must be "
                                  "smaller than max_connections")
        return value

    @property
    def idle_timeout(self) -> float | None:
        """Seconds a signed-in connection may wait between commands; 0 (``None``): no
        limit, as PostgreSQL's idle_session_timeout = 0."""
        return float(self._limit("idle_timeout", 0, 7 * 86400)) or None

    @property
    def statement_timeout(self) -> float:
        """Seconds a command may run with nothing read or sent (progress keeps it alive);
        also the longest ``wait``."""
        return float(self._limit("statement_timeout", 0.001, 7 * 86400))

    @property
    def max_delta_chain(self) -> int:
        """Deltas ``get_page`` applies on top of an image before it refuses (54000)."""
        return int(self._limit("max_delta_chain", 1, 10_000_000, integer=True))

    @property
    def pitr(self) -> tuple[Window, dict[str, Window]]:
        """Every branch's history window (``pitr``, default 7 days) and the windows of the
        branches named in ``[pitr_branches]`` (docs/storage.md, "History windows")."""
        from zenith.pageserver.retention import DEFAULT_WINDOW, Window

        where = self.path / CONFIG_FILE
        try:
            default = Window.parse(self._get("pitr", DEFAULT_WINDOW))
            table = self._get("pitr_branches") or {}
            if not isinstance(table, dict):
                raise InvalidArgument("[pitr_branches] must be a table of branch = window")
            return default, {str(k): Window.parse(v) for k, v in table.items()}
        except InvalidArgument as exc:
            raise InvalidArgument(f"{where}: {exc.message}", hint=exc.hint) from None

    @property
    def gc_period(self) -> float:
        """Seconds between background GC runs; 0: only ``zenith gc``."""
        return float(self._limit("gc_period", 0, 7 * 86400))

    @property
    def workers(self) -> dict[str, int]:
        """Thread pool sizes and the per-user cap of long jobs (docs/limits.md)."""
        return {name: int(self._limit(name, 1, 256, integer=True)) for name in (
            "worker_short_threads", "worker_long_threads", "worker_wal_threads",
            "long_jobs_per_user")}

    @property
    def tls_files(self) -> tuple[Path, Path] | None:
        cert, key = self._get("tls_cert_file"), self._get("tls_key_file")
        if not cert or not key:
            return None
        return self.path / str(cert), self.path / str(key)

    @property
    def tls_ca_file(self) -> Path | None:
        """The CA whose certificates clients sign in with (``cert`` and ``scram+cert``)."""
        ca = self._get("tls_ca_file")
        return self.path / str(ca) if ca else None

    @property
    def listeners(self) -> list[tuple[str, str]]:
        """Every address the pageserver listens on, with its authentication method:
        ``listen``/``auth_method`` first (the local CLI's), then each ``[[listeners]]``
        table's ``listen`` and ``auth_method`` (default: the top-level one)."""
        where = self.path / CONFIG_FILE
        found = [(self.listen, self.auth_method)]
        extra = self._get("listeners") or []
        if not isinstance(extra, list) or not all(isinstance(t, dict) for t in extra):
            raise InvalidArgument(f"{where}: listeners must be an array of tables "
                                  "([[listeners]] with listen and auth_method)")
        for table in extra:
            unknown = set(table) - {"listen", "auth_method"}
            if unknown or "listen" not in table:
                raise InvalidArgument(f"{where}: each [[listeners]] table has listen = "
                                      '"HOST:PORT" and optionally auth_method'
                                      + (f" (unknown: {', '.join(sorted(unknown))})"
                                         if unknown else ""))
            listen, method = str(table["listen"]), str(table.get("auth_method",
                                                                 self.auth_method))
            parse_listen(listen)
            if method not in AUTH_METHODS:
                raise InvalidArgument(f"{where}: auth_method of listener {listen} must be "
                                      f"one of {', '.join(AUTH_METHODS)}")
            found.append((listen, method))
        addresses = [parse_listen(listen) for listen, _ in found]
        for i, (host, port) in enumerate(addresses):
            for other, other_port in addresses[:i]:
                if port == other_port and (host == other or
                                           {host, other} & {"0.0.0.0", "::", ""}):
                    raise InvalidArgument(f"{where}: listen addresses {other}:{port} and "
                                          f"{host}:{port} overlap (a wildcard address holds "
                                          "the port on every address)")
        if any(method in CERT_METHODS for _, method in found) and (
                self.tls_files is None or self.tls_ca_file is None):
            raise InvalidArgument(
                f"{where}: auth_method cert and scram+cert need tls_cert_file, tls_key_file "
                "and tls_ca_file (the CA that signs client certificates)",
                hint="`zenith init --tls` creates them for a new repository")
        return found

    @property
    def cli_credentials(self) -> tuple[str, str]:
        cli = self._get("cli") or {}
        return str(cli.get("user", ADMIN_USER)), str(cli.get("password", ""))

    def _cli_file(self, name: str) -> str | None:
        cli = self._get("cli") or {}
        value = cli.get(name)
        return str(self.path / str(value)) if value else None

    def local_uri(self) -> str:
        """The URI the local CLI connects to (password included: never print it). With
        ``[cli]`` ``sslrootcert`` (``zenith init --tls``) the CLI checks the server's
        certificate (verify-full); ``sslcert``/``sslkey`` sign it in under ``cert``."""
        from urllib.parse import quote

        host, port = self.listen_address
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        user, password = self.cli_credentials
        shown = f"[{host}]" if ":" in host else host
        auth = f"{quote(user, safe='')}:{quote(password, safe='')}"
        params: list[tuple[str, str]] = []
        root = self._cli_file("sslrootcert")
        if root is not None:
            params += [("sslmode", "verify-full"), ("sslrootcert", root)]
        elif self.auth_method in CERT_METHODS:
            # Nothing would authenticate the server: whoever holds the port would get the
            # CLI's commands (verifiers, origin URIs).
            raise InvalidArgument(
                f"{self.path / CONFIG_FILE}: with auth_method {self.auth_method} the local "
                "CLI needs [cli] sslrootcert (the CA of the server's certificate) to check "
                "whom it talks to", hint="`zenith init --tls` sets it up")
        for name in ("sslcert", "sslkey"):
            value = self._cli_file(name)
            if value is not None:
                params.append((name, value))
        query = "&".join(f"{k}={quote(v, safe='/')}" for k, v in params)
        return f"postgresql://{auth}@{shown}:{port}/zenith" + (f"?{query}" if query else "")

    # -- origins ---------------------------------------------------------------------------

    @property
    def certs_dir(self) -> Path:
        """Where ``zenith import`` copies a source URI's certificate files."""
        return self.path / CERTS_DIR

    def check_wire_files(self, uri: str) -> None:
        """A URI a client sent (``perform_push``/``perform_pull``, ``import``) is opened by
        the pageserver's OS user: it may name certificate files (``sslrootcert``,
        ``sslcert``, ``sslkey``) only when it is one of this repository's origins as
        ``config.toml`` lists them (only the repository's owner adds origins: the CLI
        writes the file), or when every file is inside the repository's ``certs/``
        directory (where ``zenith import`` copies them). Otherwise an admin of this
        server could sign in elsewhere with any key the process can read."""
        files = file_parameters(parse_uri(uri))
        if not files:
            return
        if uri in RepoConfig.load(self.path).origins().values():
            return
        certs = os.path.realpath(self.certs_dir) + os.sep
        if all(os.path.realpath(f).startswith(certs) for f in files):
            return
        raise PermissionDenied(
            "a URI sent to the pageserver may name certificate files only if it is one of "
            "the repository's origins or the files are in its certs/ directory",
            hint="add it with `zenith origin add` (or import with `zenith import`, which "
                 "copies the files) on the pageserver's machine")

    def origins(self) -> dict[str, str]:
        """Origin name -> URI (with its password: never print it unmasked)."""
        table = self._get("origins") or {}
        return {str(k): str(v) for k, v in table.items()}

    def sources(self) -> dict[str, dict[str, str]]:
        """Branch -> its PostgreSQL source (uri, slot, timeline_id, pg_timeline)."""
        table = self._get("sources") or {}
        return {str(k): {str(a): str(b) for a, b in v.items()} for k, v in table.items()}

    def origin(self, name: str) -> str:
        try:
            return self.origins()[name]
        except KeyError:
            raise UnknownOrigin(
                f'unknown origin "{name}"', hint="see `zenith origin list`"
            ) from None

    def add_origin(self, name: str, uri: str) -> None:
        if _ORIGIN_NAME.fullmatch(name) is None:
            raise InvalidArgument(
                f"invalid origin name {name!r}", hint="letters, digits, '_', '.', '-'"
            )
        if is_s3_uri(uri):
            parse_s3_uri(uri)  # a bucket: refuses credentials in it, names what is wrong
        else:
            parse_uri(uri)  # refuses what is not a postgresql:// URI, with the reason
        if name in self.origins():
            raise AlreadyExists(
                f'origin "{name}" already exists ({mask_uri(self.origins()[name])})',
                hint=f"remove it first: zenith origin remove {name}",
            )
        with self.updating() as doc:
            if "origins" not in doc:
                doc.add(tomlkit.nl())
                doc.add("origins", tomlkit.table())
            doc["origins"][name] = uri

    def remove_origin(self, name: str) -> None:
        self.origin(name)
        with self.updating() as doc:
            del doc["origins"][name]

    @property
    def db_path(self) -> Path:
        return self.path / DB_FILE

    @property
    def users_path(self) -> Path:
        return self.path / USERS_FILE

    @property
    def pid_path(self) -> Path:
        return self.path / PID_FILE

    @property
    def log_path(self) -> Path:
        return self.path / LOG_FILE
