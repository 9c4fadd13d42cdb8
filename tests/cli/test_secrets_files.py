"""Issue 11, items 4 and 5: secrets never shown (every URI spelling masked in listings,
errors and the log; ``source_list`` hides sources from non-admins; ``--password-stdin``)
and private files (repository 0700, files 0600, ``export --owner`` never follows a link
nor trusts a directory the user owns, tar members checked by zenith itself)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import pwd
import socket
import stat
import struct
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.fixtures import PageserverProc, make_pageserver
from tests.pgcluster import PgCluster
from zenith.cli.export import (
    MAX_TAR_HEADER,
    UnsafeTar,
    _BoundedTarInfo,
    _unpack,
    give_to,
    open_target,
)
from zenith.errors import ZenithError
from zenith.pageserver.config import RepoConfig, secure_repository
from zenith.pgwire.auth import (
    InMemoryCredentials,
    StoredUser,
    make_md5_hash,
    md5_client_response,
)
from zenith.pgwire.client import connect
from zenith.pgwire.conninfo import MaskSecrets, add_password, mask_text, mask_uri
from zenith.pgwire.server import ServerConfig, Session, close_server, start_server
from zenith.storage import open_repository

SECRET = "Sup3rS3cret"


# -- masking ------------------------------------------------------------------------------


SPELLINGS = [
    f"postgresql://admin:{SECRET}@127.0.0.1:5/zenith",
    f"postgres://admin:{SECRET}@[::1]:5/zenith?sslmode=disable",
    f"postgresql://admin@127.0.0.1:5/zenith?password={SECRET}",
    f"postgresql://admin@127.0.0.1:5?sslmode=disable&password={SECRET}",
    f"postgresql://127.0.0.1:5/zenith?pass%77ord={SECRET}",
    f"postgresql://127.0.0.1:5/zenith?%70assword={SECRET}&sslmode=disable",
    f"postgresql://127.0.0.1:5/zenith?PASSWORD={SECRET}",
    f"postgresql://127.0.0.1:5/zenith?sslpassword={SECRET}",
    f"postgresql://admin:{SECRET}/x@127.0.0.1:5/zenith",  # unencoded '/' in the password
    f"host=127.0.0.1 port=5 password={SECRET} dbname=zenith",
    f"host=127.0.0.1 password = '{SECRET} with spaces' dbname=zenith",
]


@pytest.mark.parametrize("uri", SPELLINGS)
def test_every_spelling_is_masked(uri: str) -> None:
    assert SECRET not in mask_uri(uri)
    assert "***" in mask_uri(uri)
    assert SECRET not in mask_text(f"error: cannot reach {uri} (refused)")
    # what is not a secret stays readable
    assert "127.0.0.1" in mask_uri(uri) or "::1" in mask_uri(uri)


def test_log_filter_masks_messages_arguments_and_tracebacks() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(MaskSecrets())
    log = logging.getLogger("test.secrets")
    log.addHandler(handler)
    try:
        log.warning("pulling from %s", SPELLINGS[2])
        try:
            raise RuntimeError(f"bad {SPELLINGS[4]}")
        except RuntimeError:
            log.exception("failed on %r", SPELLINGS[0])
    finally:
        log.removeHandler(handler)
    text = stream.getvalue()
    assert SECRET not in text and text.count("***") >= 3 and "RuntimeError" in text


def test_internal_error_logs_the_command_word_only(caplog: pytest.LogCaptureFixture) -> None:
    async def crash(session: Session, sql: str) -> None:
        raise RuntimeError("handler bug")

    async def main() -> None:
        server = await start_server(
            "127.0.0.1", 0, config=ServerConfig(auth_method="trust"),
            credentials=InMemoryCredentials([StoredUser.from_password("u", "x", "admin")]),
            handler=crash)
        port = server.sockets[0].getsockname()[1]
        try:
            async with await connect(f"postgresql://u@127.0.0.1:{port}/db?sslmode=disable",
                                     timeout=10) as conn:
                with pytest.raises(ZenithError, match="internal error"):
                    await conn.simple_query(
                        f"perform_pull main 'postgresql://u:{SECRET}@h/db' main")
        finally:
            await close_server(server)

    with caplog.at_level(logging.ERROR, logger="zenith.pgwire.server"):
        asyncio.run(main())
    assert "internal error in query handler for 'perform_pull' command" in caplog.text
    assert "handler bug" in caplog.text and SECRET not in caplog.text


def test_add_password() -> None:
    uri = add_password("postgresql://u@h:5/db?sslmode=disable", "p&w d")
    from zenith.pgwire.conninfo import parse_uri

    assert parse_uri(uri).password == "p&w d" and parse_uri(uri).user == "u"
    with pytest.raises(Exception, match="already holds a password"):
        add_password("postgresql://u:x@h/db", "y")
    with pytest.raises(Exception, match="empty"):
        add_password("postgresql://u@h/db", "")


def test_origins_errors_and_log_never_show_a_password(pageserver: PageserverProc) -> None:
    ps = pageserver
    port = ps.port
    # spellings zenith accepts, pointing at the live pageserver with a wrong password
    accepted = {
        "userinfo": f"postgresql://admin:{SECRET}1@127.0.0.1:{port}/zenith?sslmode=disable",
        "query": f"postgresql://admin@127.0.0.1:{port}/zenith?password={SECRET}2"
                 "&sslmode=disable",
        "encoded": f"postgresql://admin@127.0.0.1:{port}/zenith?sslmode=disable"
                   f"&pass%77ord={SECRET}3",
    }
    for name, uri in accepted.items():
        res = ps.cli("origin", "add", name, uri)
        assert res.returncode == 0, res.stderr
        assert SECRET not in res.stdout + res.stderr
    listing = ps.cli("origin", "list", check=True).stdout
    assert SECRET not in listing and listing.count("***") == 3
    for name in accepted:
        res = ps.cli("pull", "main", name)
        assert res.returncode == 1 and res.stderr.startswith("error: "), res.stderr
        assert SECRET not in res.stdout + res.stderr
    # refused spellings: the error names the URI masked
    for bad in [f"host=127.0.0.1 password={SECRET}4",
                f"postgresql://u:{SECRET}5@h1,h2/db?password={SECRET}6",
                f"postgresql://u@h/db?pass%77ord={SECRET}7&bogus=1",
                f"postgresql://u@h/db?password=%zz{SECRET}8"]:
        res = ps.cli("origin", "add", "bad", bad)
        assert res.returncode == 1 and res.stderr.startswith("error: "), res.stderr
        assert SECRET not in res.stdout + res.stderr, res.stderr
    # the pageserver itself, given such URIs over the wire
    with psycopg.connect(ps.uri(), autocommit=True) as conn:
        for bad in [f"postgresql://u:{SECRET}9@h1,h2/db",
                    f"postgresql://u@127.0.0.1:1/db?pass%77ord={SECRET}10&sslmode=disable",
                    f"postgresql://u@127.0.0.1:1/db?password={SECRET}11&sslmode=disable"]:
            with pytest.raises(psycopg.Error) as info:
                conn.execute(f"perform_pull main '{bad}' main")
            assert SECRET not in str(info.value), str(info.value)
    ps.stop()
    log = ps.config.log_path.read_text()
    assert SECRET not in log


# -- source_list and import --password-stdin -------------------------------------------------


@pytest.fixture(scope="module")
def password_source() -> Iterator[PgCluster]:
    """A PostgreSQL whose replication user ``repl`` signs in with a password."""
    settings = {"wal_level": "replica", "wal_consistency_checking": "'all'",
                "max_wal_senders": "5", "max_replication_slots": "5"}
    with PgCluster(settings=settings) as pg:
        pg.psql(f"CREATE ROLE repl LOGIN REPLICATION PASSWORD '{SECRET}'")
        pg.psql("CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 100) g")
        hba = pg.datadir / "pg_hba.conf"
        hba.write_text("host all repl 127.0.0.1/32 scram-sha-256\n"
                       "host replication repl 127.0.0.1/32 scram-sha-256\n"
                       + hba.read_text())
        pg.psql("SELECT pg_reload_conf()")
        yield pg


def test_import_password_stdin_and_source_list(pageserver: PageserverProc,
                                               password_source: PgCluster) -> None:
    ps, pg = pageserver, password_source
    uri = pg.uri(user="repl")
    refused = ps.cli("import", "main", uri, "--timeout", "120")
    assert refused.returncode == 1 and SECRET not in refused.stderr
    wrong = ps.cli("import", "main", uri, "--password-stdin", input="not-it\n")
    assert wrong.returncode == 1 and "not-it" not in wrong.stderr
    res = ps.cli("import", "main", uri, "--password-stdin", "--timeout", "120",
                 input=SECRET + "\n")
    assert res.returncode == 0, res.stderr
    assert SECRET not in res.stdout + res.stderr
    # the source keeps it (config.toml, 0600) to reconnect; it is never shown
    assert SECRET in ps.config.sources()["main"]["uri"]
    [row] = ps.query("source_list")
    assert row["source"] is not None and "repl" in row["source"]
    assert SECRET not in str(row)
    ps.add_user("reader", "reader-pw", "read")
    with psycopg.connect(ps.uri("reader", "reader-pw"), autocommit=True) as conn:
        cur = conn.execute("source_list")
        names = [d.name for d in cur.description or []]
        [values] = cur.fetchall()
    seen = dict(zip(names, values, strict=True))
    assert seen["name"] == "main" and seen["source"] is None
    assert seen["state"] in ("streaming", "reconnecting", "stopped")  # no reason for them
    assert SECRET not in str(seen) and "repl" not in str(seen)
    ps.cli("detach", "main", check=True)
    ps.stop()
    assert SECRET not in ps.config.log_path.read_text()


def test_origin_add_password_stdin(pageserver: PageserverProc) -> None:
    ps = pageserver
    user, password = ps.config.cli_credentials
    uri = f"postgresql://{user}@127.0.0.1:{ps.port}/zenith?sslmode=disable"
    res = ps.cli("origin", "add", "self", uri, "--password-stdin", input=password + "\n")
    assert res.returncode == 0, res.stderr
    assert password not in res.stdout + res.stderr
    assert password not in ps.cli("origin", "list", check=True).stdout
    assert ps.config.origins()["self"].startswith(uri)
    ps.cli("generate", "main", "--pages", "4", check=True)
    pulled = ps.cli("pull", "main", "self:main")  # signs in with it: up to date
    assert pulled.returncode == 0, pulled.stderr
    both = ps.cli("origin", "add", "two", f"postgresql://{user}:x@127.0.0.1:{ps.port}/zenith",
                  "--password-stdin", input=password + "\n")
    assert both.returncode == 1 and "already holds a password" in both.stderr


# -- file modes -----------------------------------------------------------------------------


def _wide(path: Path) -> list[str]:
    """Everything under ``path`` (and it) open to group or others."""
    found = []
    for p in [path, *path.rglob("*")]:
        info = p.lstat()
        if stat.S_ISLNK(info.st_mode):
            continue
        if stat.S_IMODE(info.st_mode) & 0o077:
            found.append(f"{p} {stat.S_IMODE(info.st_mode):04o}")
    return found


def test_modes_after_init_and_start(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        ps = make_pageserver(tmp_path / "repo")
        assert stat.S_IMODE(ps.path.stat().st_mode) == 0o700
        assert _wide(ps.path) == []
        # made wider by hand: start fixes it and says so
        os.chmod(ps.path, 0o755)
        os.chmod(ps.path / "config.toml", 0o644)
        (ps.path / "pageserver.log").write_text("")
        os.chmod(ps.path / "pageserver.log", 0o644)
        res = ps.cli("start")
        try:
            assert res.returncode == 0, res.stderr
            assert "warning: repository directory" in res.stderr and "0755" in res.stderr
            assert "changed to 0700" in res.stderr
            ps.cli("generate", "main", "--pages", "64", check=True)
            ps.cli("branch", "create", "b", "--from", "main", check=True)
            files = {p.name for p in ps.path.rglob("*")}
            assert {"config.toml", "users.json", "pageserver.log", "pageserver.pid",
                    "zenith.db", "zenith.db-wal", "zenith.db-shm"} <= files, files
            assert any(p.is_file() for p in (ps.path / "zenith.db.d").iterdir())
            assert _wide(ps.path) == []
            for p in ps.path.rglob("*"):
                want = 0o700 if p.is_dir() else 0o600
                assert stat.S_IMODE(p.lstat().st_mode) == want, p
        finally:
            ps.stop()
    finally:
        os.umask(old)


def _repo_before_private_modes(tmp_path: Path) -> tuple[PageserverProc, Path]:
    """A repository as made before files were private (0644, directories 0755), with a
    victim file outside it and links to it planted inside."""
    ps = make_pageserver(tmp_path / "repo")
    victim = tmp_path / "victim"
    victim.write_text("not zenith's")
    os.chmod(victim, 0o644)
    for name in ["config.toml", "users.json"]:
        os.chmod(ps.path / name, 0o644)
    os.chmod(ps.path / "zenith.db", 0o754)  # the owner's execute bit is kept
    os.chmod(ps.path / "zenith.db.d", 0o755)
    os.chmod(ps.path, 0o755)
    (ps.path / "config.toml.lock").symlink_to(victim)  # one of zenith's names
    (ps.path / "zenith.db.d" / "planted").symlink_to(victim)
    (ps.path / "notes.txt").write_text("the user's own")
    os.chmod(ps.path / "notes.txt", 0o644)
    return ps, victim


def test_start_fixes_an_old_repository_and_never_follows_a_link(tmp_path: Path) -> None:
    ps, victim = _repo_before_private_modes(tmp_path)
    res = ps.cli("start")
    try:
        assert res.returncode == 0, res.stderr
        assert "Traceback" not in res.stderr
        assert "had mode 0755, open to other users; changed to 0700" in res.stderr
        assert f"{ps.path / 'config.toml.lock'} is a symbolic link; left alone" in res.stderr
        assert "planted is a symbolic link; left alone" in res.stderr
        assert "group and other access removed" in res.stderr
        assert stat.S_IMODE(victim.stat().st_mode) == 0o644  # never followed
        assert (ps.path / "config.toml.lock").is_symlink()
        for name, want in [("config.toml", 0o600), ("users.json", 0o600),
                           ("zenith.db", 0o700), ("zenith.db.d", 0o700), (".", 0o700)]:
            assert stat.S_IMODE((ps.path / name).lstat().st_mode) == want, name
        # not zenith's: left as it is
        assert stat.S_IMODE((ps.path / "notes.txt").stat().st_mode) == 0o644
        ps.cli("generate", "main", "--pages", "8", check=True)
    finally:
        ps.stop()


def test_secure_repository_uses_no_chmod_without_following(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """glibc < 2.32 has no fchmodat(AT_SYMLINK_NOFOLLOW): Python raises
    NotImplementedError from ``os.chmod(..., follow_symlinks=False)``. No chmod by name
    is used at all now; and a file swapped for a link during the check is left alone."""
    ps, victim = _repo_before_private_modes(tmp_path)

    def no_chmod(*args: object, **kw: object) -> None:
        raise NotImplementedError("chmod: follow_symlinks unavailable on this platform")

    monkeypatch.setattr(os, "chmod", no_chmod)
    monkeypatch.setattr(os, "lchmod", no_chmod, raising=False)
    real_open = os.open

    def swapping_open(path: object, flags: int, *args: object, **kw: object) -> int:
        if path == "users.json":  # swapped between the check and the open
            os.unlink(ps.path / "users.json")
            os.symlink(victim, ps.path / "users.json")
        return real_open(path, flags, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", swapping_open)
    warnings = secure_repository(ps.path)
    monkeypatch.undo()
    assert any("users.json changed while it was checked" in w for w in warnings), warnings
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644
    assert stat.S_IMODE((ps.path / "config.toml").stat().st_mode) == 0o600
    assert stat.S_IMODE(ps.path.stat().st_mode) == 0o700


def test_init_leaves_a_non_empty_directory_mode_alone(tmp_path: Path) -> None:
    busy, empty = tmp_path / "busy", tmp_path / "empty"
    busy.mkdir(mode=0o755)
    empty.mkdir(mode=0o755)
    os.chmod(busy, 0o755)
    os.chmod(empty, 0o755)
    (busy / "other").write_text("x")
    RepoConfig.create(busy)
    RepoConfig.create(empty)
    assert stat.S_IMODE(busy.stat().st_mode) == 0o755
    assert stat.S_IMODE(empty.stat().st_mode) == 0o700
    assert stat.S_IMODE((busy / "config.toml").stat().st_mode) == 0o600


def test_storage_creates_private_files(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        repo = open_repository(tmp_path / "x.db")
        repo.close()
    finally:
        os.umask(old)
    for p in tmp_path.rglob("*"):
        assert stat.S_IMODE(p.stat().st_mode) & 0o077 == 0, p


# -- export --owner ---------------------------------------------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")


@needs_root
def test_give_to_never_follows_a_symlink(tmp_path: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    victim = tmp_path / "victim"
    victim.write_text("root's")
    target = tmp_path / "export"
    (target / "sub").mkdir(parents=True)
    (target / "sub" / "file").write_text("x")
    (target / "link").symlink_to(victim)
    (target / "sub" / "dirlink").symlink_to(tmp_path)
    give_to(target, nobody.pw_uid, nobody.pw_gid)
    assert victim.stat().st_uid == 0 and tmp_path.stat().st_uid == 0
    assert (target / "link").lstat().st_uid == nobody.pw_uid
    for p in [target, target / "sub", target / "sub" / "file"]:
        assert p.stat().st_uid == nobody.pw_uid, p


@needs_root
def test_export_owner_refuses_a_directory_the_user_owns(tmp_path: Path) -> None:
    ps = make_pageserver(tmp_path / "repo")
    base = Path(tempfile.mkdtemp(prefix="zenith-owner-"))
    try:
        owned = base / "owned"
        owned.mkdir()
        os.chown(owned, pwd.getpwnam("nobody").pw_uid, -1)
        for target in [owned, owned / "below"]:
            res = ps.cli("export", "main", str(target), "--owner", "nobody")
            assert res.returncode == 1, res.stderr
            assert f"{owned} is owned by nobody" in res.stderr, res.stderr
        assert list(owned.iterdir()) == []
        link = base / "link"
        link.symlink_to(owned)
        res = ps.cli("export", "main", str(link), "--owner", "nobody")
        assert res.returncode == 1 and "is a symbolic link" in res.stderr
        res = ps.cli("export", "main", str(base / "x"), "--owner", "no-such-user-zz")
        assert res.returncode == 1 and "no user" in res.stderr
    finally:
        subprocess.run(["rm", "-rf", str(base)], check=False)


@needs_root
def test_export_owner_refuses_races_and_open_ancestors(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    nobody = pwd.getpwnam("nobody")
    ps = make_pageserver(tmp_path / "repo")
    base = Path(tempfile.mkdtemp(prefix="zenith-owner-"))
    try:
        # made by the user between the check and the export's mkdir: refused, not adopted
        early = base / "early"
        early.mkdir(mode=0o700)
        os.chown(early, nobody.pw_uid, nobody.pw_gid)
        res = ps.cli("export", "main", str(early), "--owner", "nobody")
        assert res.returncode == 1 and f"{early} is owned by nobody" in res.stderr, \
            res.stderr
        # root's, but others may write into it
        shared = base / "shared"
        shared.mkdir()
        os.chmod(shared, 0o777)
        res = ps.cli("export", "main", str(shared), "--owner", "nobody")
        assert res.returncode == 1 and "writable by its group or by others" in res.stderr
        # an ancestor writable by its group (no sticky bit)
        group = base / "group"
        group.mkdir()
        os.chmod(group, 0o775)
        res = ps.cli("export", "main", str(group / "data"), "--owner", "nobody")
        assert res.returncode == 1, res.stderr
        assert f"{group} is writable by its group or by others" in res.stderr, res.stderr
        # a symlinked ancestor resolving into a directory the user owns
        owned = base / "owned"
        owned.mkdir()
        os.chown(owned, nobody.pw_uid, -1)
        (base / "via").symlink_to(owned)
        res = ps.cli("export", "main", str(base / "via" / "data"), "--owner", "nobody")
        assert res.returncode == 1 and f"{owned} is owned by nobody" in res.stderr, \
            res.stderr
        # without --owner too: an empty target another user owns is refused
        res = ps.cli("export", "main", str(early))
        assert res.returncode == 1 and "is owned by nobody" in res.stderr, res.stderr
        assert [list(p.iterdir()) for p in (early, shared, group, owned)] == [[]] * 4
        # the race itself: the directory appears between the check and the mkdir
        real_mkdir = os.mkdir

        def racing_mkdir(path: str, mode: int = 0o777, **kw: object) -> None:
            real_mkdir(path, 0o700, **kw)  # type: ignore[arg-type]
            real_mkdir(path, mode, **kw)  # type: ignore[arg-type]

        monkeypatch.setattr(os, "mkdir", racing_mkdir)
        with pytest.raises(ZenithError, match="appeared while the export was creating it"):
            open_target(base / "late" / "data", owner="nobody")
    finally:
        subprocess.run(["rm", "-rf", str(base)], check=False)


def _bounded(data: bytes) -> tarfile.TarFile:
    return tarfile.open(fileobj=io.BytesIO(data), mode="r|", tarinfo=_BoundedTarInfo)


def test_unpack_refuses_a_directory_it_did_not_create(tmp_path: Path) -> None:
    target = tmp_path / "data"
    (target / "base").mkdir(parents=True)  # there before the member that goes through it
    victim = tmp_path / "victim"
    victim.mkdir()
    (target / "global").symlink_to(victim)
    fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name, message in [("base/1/1259", "'base' is a directory this export did not "
                                              "create"),
                              ("global/pg_control", "'global' is not a directory")]:
            with _bounded(_tar((_member(name), b"x"))) as tar, \
                    pytest.raises(UnsafeTar, match=message):
                _unpack(tar, fd)
        assert list((target / "base").iterdir()) == [] and list(victim.iterdir()) == []
        # its own directories, in any order, are fine
        with _bounded(_tar(_member_dir("new"), (_member("new/a/f"), b"1"),
                           (_member("new/g"), b"2"), (_member("new/a/h"), b"3"))) as tar:
            _unpack(tar, fd)
        assert (target / "new" / "a" / "h").read_bytes() == b"3"
    finally:
        os.close(fd)


def test_tar_extended_headers_are_bounded() -> None:
    huge = "d/" + "n" * (MAX_TAR_HEADER + 10)
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
            tar.addfile(_member(huge), io.BytesIO(b""))
        with pytest.raises(UnsafeTar, match="an extended header of"):
            _bounded(out.getvalue())
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT,
                      pax_headers={"comment": "x"}) as tar:
        tar.addfile(_member("f"), io.BytesIO(b""))
    with pytest.raises(UnsafeTar, match="a pax global header"):
        _bounded(out.getvalue())
    # a long name within the bound is read as usual
    fine = "d/" + "n" * 300
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = _member(fine)
        tar.addfile(info, io.BytesIO(b""))
    with _bounded(out.getvalue()) as tar:
        assert [m.name for m in tar] == [fine]


# -- tar members from a hostile origin --------------------------------------------------------


def _tar(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            info.size = len(data) if info.isfile() else 0
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return out.getvalue()


def _member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, linkname, 0o644
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3
    return info


class FakeOrigin:
    """A pgwire server (zenith's own) that answers ``fullbackup`` with a given tar."""

    def __init__(self, tar: bytes) -> None:
        self.tar = tar
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        assert ready.wait(10)

    async def _handle(self, session: Session, sql: str) -> None:
        copy = await session.copy_out()
        for i in range(0, len(self.tar), 8192):
            await copy.write(self.tar[i:i + 8192])
        await copy.done()
        await session.send_command_complete(f"COPY {len(self.tar)}")

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)

        async def main() -> None:
            self.server = await start_server(
                "127.0.0.1", 0, config=ServerConfig(auth_method="trust"),
                credentials=InMemoryCredentials([StoredUser.from_password("evil", "x",
                                                                          "admin")]),
                handler=self._handle)
            self.port = self.server.sockets[0].getsockname()[1]
            self.stop = asyncio.Event()
            ready.set()
            await self.stop.wait()
            await close_server(self.server)

        self.loop.run_until_complete(main())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(10)


HOSTILE = {
    "dotdot": ([(_member("base/../../escaped"), b"x")], "'..' in its path"),
    "dotdot-first": ([(_member("../escaped"), b"x")], "'..' in its path"),
    "absolute": ([(_member("/tmp/zenith-escaped-abs"), b"x")], "absolute path"),
    "symlink": ([(_member("global", tarfile.SYMTYPE, "/etc"), b"")], "a symbolic link"),
    "symlink-then-file": ([(_member("PG_VERSION", tarfile.REGTYPE), b"15\n"),
                           (_member("sub", tarfile.SYMTYPE, ".."), b""),
                           (_member("sub/escaped"), b"x")], "a symbolic link"),
    "hardlink": ([(_member("passwd", tarfile.LNKTYPE, "/etc/passwd"), b"")], "a hard link"),
    "device": ([(_member("null", tarfile.CHRTYPE), b"")], "a device"),
    "fifo": ([(_member("fifo", tarfile.FIFOTYPE), b"")], "a FIFO"),
    "twice": ([(_member("PG_VERSION"), b"15\n"), (_member("PG_VERSION"), b"16\n")],
              "appears twice"),
    "pax-huge": ([(_member("base/" + "x" * 70000), b"x")], "an extended header of"),
}


@pytest.fixture(scope="module")
def exporter(tmp_path_factory: pytest.TempPathFactory) -> PageserverProc:
    """One repository for the hostile origins (not started: an export from an origin runs
    in the CLI); a refused export writes nothing to it, each case adds an origin of its own."""
    return make_pageserver(tmp_path_factory.mktemp("exporter") / "repo")


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_tar_members_are_refused(exporter: PageserverProc, tmp_path: Path,
                                         case: str) -> None:
    members, message = HOSTILE[case]
    fake = FakeOrigin(_tar(_member_dir("base"), *members))
    try:
        uri = f"postgresql://evil@127.0.0.1:{fake.port}/zenith?sslmode=disable"
        exporter.cli("origin", "add", f"evil-{case}", uri, check=True)
        target = tmp_path / "out" / "data"
        target.mkdir(parents=True)
        res = exporter.cli("export", f"evil-{case}:main", str(target))
        assert res.returncode == 1, (res.stdout, res.stderr)
        assert "refused tar member" in res.stderr and message in res.stderr, res.stderr
        assert list(target.iterdir()) == []
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["data"]
        assert not (tmp_path / "escaped").exists() and not Path("/escaped").exists()
        assert not Path("/tmp/zenith-escaped-abs").exists()
    finally:
        fake.close()


def _member_dir(name: str) -> tuple[tarfile.TarInfo, bytes]:
    return _member(name, tarfile.DIRTYPE), b""


def test_plain_tar_from_an_origin_is_written_private(tmp_path: Path) -> None:
    fake = FakeOrigin(_tar(_member_dir("."), _member_dir("base"), _member_dir("base/1"),
                           (_member("base/1/1259"), b"p" * 20000),
                           (_member("PG_VERSION"), b"15\n")))
    try:
        ps = make_pageserver(tmp_path / "repo")
        ps.cli("origin", "add", "evil",
               f"postgresql://evil@127.0.0.1:{fake.port}/zenith?sslmode=disable", check=True)
        target = tmp_path / "data"
        res = ps.cli("export", "evil:main", str(target))
        assert res.returncode == 0, res.stderr
        assert (target / "PG_VERSION").read_text() == "15\n"
        assert (target / "base" / "1" / "1259").read_bytes() == b"p" * 20000
        assert _wide(target) == []
    finally:
        fake.close()


# -- the CLI's connection to its own pageserver ---------------------------------------------


class Impostor:
    """Holds a pageserver's port before it starts: declines TLS, asks the CLI for
    ``method`` (cleartext, MD5 or nothing) and records every byte it receives."""

    def __init__(self, port: int, method: str):
        self.method = method
        self.received = bytearray()
        self.listener = socket.create_server(("127.0.0.1", port))
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _read_packet(self, sock: socket.socket) -> bytes:
        head = self._exact(sock, 4)
        return self._exact(sock, struct.unpack("!i", head)[0] - 4)

    def _exact(self, sock: socket.socket, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = sock.recv(n - len(out))
            if not chunk:
                raise EOFError
            self.received += chunk
            out += chunk
        return out

    def _serve(self, sock: socket.socket) -> None:
        sock.settimeout(10)
        with sock, contextlib.suppress(OSError, EOFError):
            body = self._read_packet(sock)
            if struct.unpack("!i", body[:4])[0] == 80877103:  # SSLRequest
                sock.sendall(b"N")
                self._read_packet(sock)
            if self.method == "password":
                sock.sendall(b"R" + struct.pack("!ii", 8, 3))
            elif self.method == "md5":
                sock.sendall(b"R" + struct.pack("!ii", 12, 5) + b"salt")
            sock.sendall(b"R" + struct.pack("!ii", 8, 0) + b"Z" + struct.pack("!i", 5) + b"I")
            # Keep what the client sends until it waits for an answer that never comes:
            # then hang up (it fails at once instead of at its own timeout).
            sock.settimeout(1.0)
            while chunk := sock.recv(65536):
                self.received += chunk

    def close(self) -> None:
        self.listener.close()


@pytest.mark.parametrize("auth_method", ["scram-sha-256", "md5", "trust"])
@pytest.mark.parametrize("asked", ["password", "md5", "none"])
def test_an_impostor_on_the_local_port_gets_no_password(tmp_path: Path, auth_method: str,
                                                         asked: str) -> None:
    """The CLI allows its pageserver only the configured method: never cleartext, and
    never no authentication when the pageserver is configured to ask for a password."""
    ps = make_pageserver(tmp_path / "repo", "--auth-method", auth_method)
    user, password = ps.config.cli_credentials
    impostor = Impostor(ps.port, asked)
    try:
        res = ps.cli("status")
    finally:
        impostor.close()
    time.sleep(0.1)
    assert password.encode() not in impostor.received
    assert make_md5_hash(user, password)[3:].encode() not in impostor.received
    allowed = {"scram-sha-256": "scram-sha-256", "md5": "md5", "trust": "none"}[auth_method]
    if asked != allowed:
        assert res.returncode != 0
        assert "authentication method requirement" in res.stderr, res.stderr
        assert password not in res.stderr + res.stdout
    if asked == "md5" and auth_method == "md5":  # allowed: the response to its salt only
        assert md5_client_response(user, password, b"salt").encode() in impostor.received
