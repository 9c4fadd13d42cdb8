"""Client certificates: ``zenith init --tls``, ``auth_method = cert`` / ``scram+cert`` on a
second listen address, and push/pull between two live pageservers over mutual TLS with no
password anywhere (issue 11, Deliver 3). Clients are psycopg (libpq) and zenith itself."""

from __future__ import annotations

import socket
import stat
import time
from pathlib import Path

import psycopg
import pytest

from tests.fixtures import PageserverProc, free_port, start_together
from zenith.pageserver.quoting import command_text

pytestmark = pytest.mark.timeout(180)


def add_listener(ps: PageserverProc, method: str) -> int:
    """Append a ``[[listeners]]`` table with ``method`` on a free port; returns the port."""
    port = free_port()
    with open(ps.path / "config.toml", "a", encoding="utf-8") as f:
        f.write(f'\n[[listeners]]\nlisten = "127.0.0.1:{port}"\nauth_method = "{method}"\n')
    return port


def tls_uri(port: int, user: str, *, ca: Path, cert: Path | None = None,
            key: Path | None = None, password: str | None = None,
            sslmode: str = "verify-full") -> str:
    auth = user + (f":{password}" if password else "")
    query = f"sslmode={sslmode}&sslrootcert={ca}"
    if cert is not None:
        query += f"&sslcert={cert}&sslkey={key}"
    return f"postgresql://{auth}@127.0.0.1:{port}/zenith?{query}"


def whoami(uri: str) -> str:
    with psycopg.connect(uri, autocommit=True, connect_timeout=10) as conn:
        row = conn.execute("status").fetchone()
        assert row is not None
        return f"{row[4]}/{row[5]}"


def refused(uri: str) -> str:
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(uri, autocommit=True, connect_timeout=10).close()
    return str(info.value)


def test_init_tls_makes_private_certificates_and_the_cli_verifies_them(
        pageserver_factory) -> None:
    # As docs/pgwire.md's set-up: a public name besides the loopback ones the CLI uses.
    ps = pageserver_factory("--tls", "--tls-host", "cloud.example.com")
    tls = ps.path / "tls"
    assert stat.S_IMODE(tls.stat().st_mode) == 0o700
    names = sorted(p.name for p in tls.iterdir())
    assert names == ["admin.crt", "admin.key", "ca.crt", "ca.key", "server.crt", "server.key"]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in tls.iterdir())
    # The CLI talks to its pageserver over TLS that checks the server's certificate.
    out = ps.cli("status", check=True).stdout
    assert "you are admin" in out
    user, password = ps.config.cli_credentials
    uri = tls_uri(ps.port, user, ca=tls / "ca.crt", password=password)
    with psycopg.connect(uri, autocommit=True) as conn:
        assert conn.pgconn.ssl_in_use
    with psycopg.connect(uri.replace("127.0.0.1", "localhost"), autocommit=True) as conn:
        assert conn.pgconn.ssl_in_use
    # The server certificate is for the loopback names, signed by that CA: another CA's
    # clients refuse it.
    other = pageserver_factory("--tls", start=False)
    assert "certificate verify failed" in refused(
        tls_uri(ps.port, user, ca=other.path / "tls" / "ca.crt", password=password))


def test_cert_listener_signs_in_by_certificate_only(pageserver_factory, tmp_path: Path) -> None:
    ps = pageserver_factory("--tls", start=False)
    port = add_listener(ps, "cert")
    ps.start()
    ca = ps.path / "tls" / "ca.crt"
    ps.cli("user", "add", "bob", "--role", "push", "--no-password", check=True)
    ps.cli("tls", "client-cert", "bob", "--out", str(tmp_path / "c"), check=True)
    ps.cli("tls", "client-cert", "ghost", "--out", str(tmp_path / "c"), check=True)
    bob = (tmp_path / "c" / "bob.crt", tmp_path / "c" / "bob.key")
    assert stat.S_IMODE(bob[1].stat().st_mode) == 0o600

    assert whoami(tls_uri(port, "bob", ca=ca, cert=bob[0], key=bob[1])) == "bob/push"
    # No certificate, the wrong user for the certificate, a user that does not exist, no
    # TLS at all: refused with PostgreSQL's messages.
    assert "requires a valid client certificate" in refused(tls_uri(port, "bob", ca=ca))
    assert 'certificate authentication failed for user "admin"' in refused(
        tls_uri(port, "admin", ca=ca, cert=bob[0], key=bob[1]))
    assert 'role "ghost" does not exist' in refused(
        tls_uri(port, "ghost", ca=ca, cert=tmp_path / "c" / "ghost.crt",
                key=tmp_path / "c" / "ghost.key"))
    assert "requires TLS with a client certificate" in refused(
        f"postgresql://bob@127.0.0.1:{port}/zenith?sslmode=disable")
    # A certificate with the right CN from another CA fails the TLS handshake.
    other = pageserver_factory("--tls", start=False)
    other.cli("tls", "client-cert", "bob", "--out", str(tmp_path / "o"), check=True)
    message = refused(tls_uri(port, "bob", ca=ca, cert=tmp_path / "o" / "bob.crt",
                              key=tmp_path / "o" / "bob.key"))
    assert "SSL" in message and "bob/push" not in message
    # On the password listener the certificate is no password: bob has none.
    message = refused(tls_uri(ps.port, "bob", ca=ca, cert=bob[0], key=bob[1],
                              password="guess"))
    assert "password authentication failed" in message
    # zenith refuses a key file others may read, as libpq does, before connecting.
    bob[1].chmod(0o644)
    assert "has group or world access" in refused(
        tls_uri(port, "bob", ca=ca, cert=bob[0], key=bob[1]))


def test_scram_plus_cert_needs_both(pageserver_factory, tmp_path: Path) -> None:
    ps = pageserver_factory("--tls", start=False)
    port = add_listener(ps, "scram+cert")
    ps.start()
    ca = ps.path / "tls" / "ca.crt"
    ps.add_user("carol", "s3cret-pw", "read")
    ps.cli("tls", "client-cert", "carol", "--out", str(tmp_path), check=True)
    cert, key = tmp_path / "carol.crt", tmp_path / "carol.key"
    assert whoami(tls_uri(port, "carol", ca=ca, cert=cert, key=key,
                          password="s3cret-pw")) == "carol/read"
    assert "password authentication failed" in refused(
        tls_uri(port, "carol", ca=ca, cert=cert, key=key, password="wrong"))
    assert "requires a valid client certificate" in refused(
        tls_uri(port, "carol", ca=ca, password="s3cret-pw"))


def test_cert_method_without_a_ca_is_refused_at_start(pageserver_factory) -> None:
    ps = pageserver_factory(start=False)
    config = ps.path / "config.toml"
    before = config.read_text()
    add_listener(ps, "cert")
    result = ps.cli("start")
    config.write_text(before)  # for the fixture's stop
    assert result.returncode != 0
    assert "tls_ca_file" in result.stderr and "Traceback" not in result.stderr


def test_push_and_pull_over_mutual_tls_without_passwords(pageserver_factory,
                                                         tmp_path: Path) -> None:
    cloud = pageserver_factory("--tls", name="cloud", start=False)
    port = add_listener(cloud, "cert")
    laptop = pageserver_factory(name="laptop", start=False)
    start_together(cloud, laptop)
    cloud.cli("user", "add", "laptop", "--role", "push", "--no-password", check=True)
    certs = tmp_path / "laptop-certs"
    cloud.cli("tls", "client-cert", "laptop", "--out", str(certs), check=True)

    laptop.cli("generate", "main", "--pages", "200", "--rounds", "3", check=True)
    uri = tls_uri(port, "laptop", ca=cloud.path / "tls" / "ca.crt",
                  cert=certs / "laptop.crt", key=certs / "laptop.key")
    added = laptop.cli("origin", "add", "cloud", uri, check=True)
    assert "warning" not in added.stderr  # no password, verified TLS: nothing to warn of
    assert "password" not in (laptop.path / "config.toml").read_text().split("[origins]")[1]

    laptop.cli("push", "main", "cloud", check=True)
    assert cloud.digest("main") == laptop.digest("main")
    cloud.cli("generate", "more", "--pages", "50", "--rounds", "2", check=True)
    laptop.cli("pull", "more", "cloud", check=True)
    assert laptop.digest("more") == cloud.digest("more")

    # The same origin without the client certificate is refused, and nothing moves.
    bare = tls_uri(port, "laptop", ca=cloud.path / "tls" / "ca.crt")
    laptop.cli("origin", "add", "nocert", bare, check=True)
    result = laptop.cli("push", "main", "nocert")
    assert result.returncode != 0
    assert "client certificate" in result.stderr, result.stderr


def test_a_uri_from_the_wire_may_not_name_any_key_file(pageserver_factory,
                                                      tmp_path: Path) -> None:
    """An admin of one pageserver must not sign in elsewhere with key files the process can
    read (here: another repository's admin key on the same machine)."""
    cloud = pageserver_factory("--tls", name="cloud", start=False)
    port = add_listener(cloud, "cert")
    other = pageserver_factory(name="other", start=False)
    start_together(cloud, other)
    cloud.cli("generate", "secret", "--pages", "5", check=True)
    tls = cloud.path / "tls"
    stolen = tls_uri(port, "admin", ca=tls / "ca.crt", cert=tls / "admin.crt",
                     key=tls / "admin.key")
    for sql in (command_text("perform_pull", "stolen", stolen, "secret"),
                command_text("perform_push", "main", stolen, "x"),
                command_text("import", "stolen", stolen, "5")):
        with psycopg.connect(other.uri(), autocommit=True) as conn, \
                pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
            conn.execute(sql)
        assert "certificate files" in str(info.value)
    assert not [b for b in other.query("branch_list") if b["name"] == "stolen"]
    # The repository's owner adding it as an origin is what allows it.
    other.cli("origin", "add", "cloud", stolen, check=True)
    other.cli("pull", "secret", "cloud", check=True)
    assert other.digest("secret") == cloud.digest("secret")


def test_a_flood_on_another_listener_leaves_the_admin_slots(pageserver_factory) -> None:
    ps = pageserver_factory("--tls", start=False)
    with ps.config.updating() as doc:
        doc["max_connections"] = 12
        doc["reserved_connections"] = 3
    port = add_listener(ps, "cert")
    ps.start()
    held = []
    try:
        for _ in range(20):  # anonymous TCP connections that never send a startup packet
            held.append(socket.create_connection(("127.0.0.1", port)))
        time.sleep(0.5)
        out = ps.cli("status")
        assert out.returncode == 0, out.stderr
        assert "you are admin" in out.stdout
    finally:
        for sock in held:
            sock.close()


def test_listen_problems_are_clear_errors(pageserver_factory) -> None:
    ps = pageserver_factory("--tls", start=False)
    config = ps.path / "config.toml"
    before = config.read_text()
    with open(config, "a", encoding="utf-8") as f:
        f.write(f'\n[[listeners]]\nlisten = "0.0.0.0:{ps.port}"\n')
    result = ps.cli("start")
    assert result.returncode != 0 and "overlap" in result.stderr
    assert "Traceback" not in result.stderr
    config.write_text(before)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        add_listener_port = busy.getsockname()[1]
        with open(config, "a", encoding="utf-8") as f:
            f.write(f'\n[[listeners]]\nlisten = "127.0.0.1:{add_listener_port}"\n')
        result = ps.cli("start")
        config.write_text(before)
    assert result.returncode != 0
    assert f"cannot listen on 127.0.0.1:{add_listener_port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_cert_cli_without_a_ca_refuses_to_connect(pageserver_factory) -> None:
    ps = pageserver_factory("--tls", "--auth-method", "cert")
    assert "you are admin" in ps.cli("status", check=True).stdout  # by its certificate
    with ps.config.updating() as doc:
        del doc["cli"]["sslrootcert"]
    result = ps.cli("status")
    assert result.returncode != 0 and "sslrootcert" in result.stderr
    with ps.config.updating() as doc:
        doc["cli"]["sslrootcert"] = "tls/ca.crt"
