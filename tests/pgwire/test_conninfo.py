"""URIs as libpq parses them, password masking, PGPASSWORD and ~/.pgpass."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zenith.errors import InvalidArgument
from zenith.pgwire.conninfo import (
    MASK_LIMIT,
    ConnInfo,
    PgpassEntry,
    _mask_params,
    lookup_password,
    mask_text,
    mask_uri,
    parse_pgpass,
    parse_uri,
    read_pgpass,
)

D = ConnInfo()


@pytest.mark.parametrize(("uri", "expected"), [
    ("postgresql://", D),
    ("postgres://", D),
    ("postgresql://localhost", D),
    ("postgresql://host", ConnInfo(host="host")),
    ("postgresql://host:6543", ConnInfo(host="host", port=6543)),
    ("postgresql://host:", ConnInfo(host="host")),
    ("postgresql://host/db", ConnInfo(host="host", dbname="db")),
    ("postgresql://host/", ConnInfo(host="host")),
    ("postgresql://u@host", ConnInfo(host="host", user="u")),
    ("postgresql://u:p@host:5433/db", ConnInfo(host="host", port=5433, user="u", password="p",
                                               dbname="db")),
    ("postgresql://u:@host", ConnInfo(host="host", user="u", password="")),
    ("postgresql://:p@host", ConnInfo(host="host", password="p")),
    ("postgresql://u:p:q@host", ConnInfo(host="host", user="u", password="p:q")),
    ("postgresql://u:p?x@host", ConnInfo(host="host", user="u", password="p?x")),
    ("postgresql://u%40x:p%40ss%2F%3A@host", ConnInfo(host="host", user="u@x", password="p@ss/:")),
    ("postgresql://us%C3%A9r:p+w@host", ConnInfo(host="host", user="usér", password="p+w")),
    ("postgresql://host/my%20db", ConnInfo(host="host", dbname="my db")),
    ("postgresql://[::1]", ConnInfo(host="::1")),
    ("postgresql://[::1]:5433/db", ConnInfo(host="::1", port=5433, dbname="db")),
    ("postgresql://u:p@[2001:db8::7]/db", ConnInfo(host="2001:db8::7", user="u", password="p",
                                                   dbname="db")),
    ("postgresql://[fe80::1%25eth0]", ConnInfo(host="fe80::1%eth0")),
    ("postgresql://%2Fvar%2Frun%2Fpostgresql/db", ConnInfo(host="/var/run/postgresql",
                                                           dbname="db")),
    ("postgresql:///db", ConnInfo(dbname="db")),
    ("postgresql://host?sslmode=require", ConnInfo(host="host", sslmode="require")),
    ("postgresql://host/db?sslmode=verify-full&sslrootcert=/ca.pem",
     ConnInfo(host="host", dbname="db", sslmode="verify-full", sslrootcert="/ca.pem")),
    ("postgresql://host?ssl=true", ConnInfo(host="host", sslmode="require")),
    ("postgresql://host?connect_timeout=10&application_name=zen%20ith",
     ConnInfo(host="host", connect_timeout=10.0, application_name="zen ith")),
    ("postgresql://host?connect_timeout=1", ConnInfo(host="host", connect_timeout=2.0)),
    ("postgresql://host?connect_timeout=0", ConnInfo(host="host")),
    ("postgresql://host?fallback_application_name=x", ConnInfo(host="host",
                                                               application_name="x")),
    ("postgresql://u@host/db?user=v&password=w&dbname=e&host=h2&port=7",
     ConnInfo(host="h2", port=7, user="v", password="w", dbname="e")),
    ("postgresql://host?keepalives=1&target_session_attrs=any&", ConnInfo(host="host")),
    ("postgresql://host?options=-c%20x%3Dy", ConnInfo(host="host", options="-c x=y")),
    ("postgresql://host?hostaddr=10.0.0.1", ConnInfo(host="host", hostaddr="10.0.0.1")),
])
def test_parse_uri(uri: str, expected: ConnInfo) -> None:
    assert parse_uri(uri) == expected


@pytest.mark.parametrize(("uri", "match"), [
    ("http://host/db", "must start with postgresql://"),
    ("postgresql:/host", "must start with postgresql://"),
    ("POSTGRESQL://host", "must start with postgresql://"),
    ("host=localhost dbname=x", "must start with postgresql://"),
    ("", "must start with postgresql://"),
    ("postgresql://host:port", r"invalid port number \(percent-encode"),
    ("postgresql://host:99999", "invalid port number"),
    ("postgresql://host:0", "invalid port number"),
    ("postgresql://host:-1", "invalid port number"),
    ("postgresql://[::1", 'missing "]"'),
    ("postgresql://[]/db", "may not be empty"),
    ("postgresql://[::1]x", "unexpected character"),
    ("postgresql://h1,h2/db", "multiple hosts"),
    ("postgresql://h1:5432,h2/db", "multiple hosts"),
    ("postgresql://host?sslmode=bogus", "invalid sslmode"),
    ("postgresql://host?sslmode", "missing key/value separator"),
    ("postgresql://host?a=b=c", "extra key/value separator"),
    ("postgresql://host?&&", "missing key/value separator"),
    ("postgresql://host?bogus=1", 'invalid URI query parameter: "bogus"'),
    ("postgresql://host?connect_timeout=soon", "invalid integer value"),
    ("postgresql://host?ssl=false", "ssl"),
    ("postgresql://host/d%zzb", "invalid percent-encoded token"),
    ("postgresql://host/db%", "invalid percent-encoded token"),
    ("postgresql://host/d%00b", "forbidden value %00"),
    ("postgresql://host/d%ffb", "not UTF-8"),
])
def test_parse_uri_rejects(uri: str, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        parse_uri(uri)


@pytest.mark.parametrize("uri", [
    "postgresql://u:top%zzsecret@host/db", "postgresql://u:topsecret@host:nope/db",
    "postgresql://u:topsecret@host?bogus=1", "https://u:topsecret@host",
    "postgresql://host?password=topsecret&sslmode=nope",
])
def test_errors_never_show_the_password(uri: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_uri(uri)
    assert "topsecret" not in str(info.value) and "topsecret" not in (info.value.hint or "")


def test_parse_uri_rejects_non_strings() -> None:
    with pytest.raises(InvalidArgument):
        parse_uri(b"postgresql://host")  # type: ignore[arg-type]


@pytest.mark.parametrize(("uri", "masked"), [
    ("postgresql://u:secret@host:5432/db", "postgresql://u:***@host:5432/db"),
    ("postgresql://u@host/db", "postgresql://u@host/db"),
    ("postgresql://u:p%40ss@[::1]/db?sslmode=require",
     "postgresql://u:***@[::1]/db?sslmode=require"),
    ("postgresql://host/db?user=u&password=secret&x=1",
     "postgresql://host/db?user=u&password=***&x=1"),
    ("postgresql://host?password=secret", "postgresql://host?password=***"),
    ("postgres://u:se:cret@h", "postgres://u:***@h"),
    ("nonsense", "nonsense"),
    # '@' in the query and no path: the user info ends at the '@' before the host
    ("postgresql://alice@cloud.example:64000?application_name=me@laptop&password=secret",
     "postgresql://alice@cloud.example:64000?application_name=me@laptop&password=***"),
    ("postgresql://alice@cloud.example:64000?password=hunter2@corp",
     "postgresql://alice@cloud.example:64000?password=***"),
    ("postgresql://cloud.example:64000?password=hunter2@corp",  # libpq: user info
     "postgresql://cloud.example:***@corp"),
    ("postgresql://host:5432/db?application_name=me@laptop",
     "postgresql://host:5432/db?application_name=me@laptop"),
    # unencoded '@', '/', '?' in the password
    ("postgresql://u:p@ss@h/db?x=1", "postgresql://u:***@h/db?x=1"),
    ("postgresql://u:pa/ss@h/db", "postgresql://u:***@h/db"),
    ("postgresql://u:pa?ss@h/db", "postgresql://u:***@h/db"),
    # "user:password" without '@': not a port
    ("postgresql://alice:s3cret", "postgresql://alice:***"),
    ("postgresql://alice:s3cret/db?x=1", "postgresql://alice:***/db?x=1"),
    ("postgresql://host:5432", "postgresql://host:5432"),
])
def test_mask_uri(uri: str, masked: str) -> None:
    assert mask_uri(uri) == masked
    assert mask_text(f"error: {uri} failed") == f"error: {masked} failed"


@pytest.mark.parametrize("uri", [
    "postgresql://u:my secret@h/db", "postgresql://h/db?password=my secret",
    "postgresql://u:ab'secret@h/db", 'postgresql://u:ab"secret@h/db',
    "postgresql://u:ab<secret@h/db", "postgresql://u:pa\tsecret@h/db",
    "postgresql://u:pa\nsecret@h/db", "postgresql://u:pa\x01secret@h/db",
    "postgresql://h/db?password='quoted secret'",
])
def test_unencoded_unsafe_characters_are_refused(uri: str) -> None:
    with pytest.raises(InvalidArgument, match="unencoded") as info:
        parse_uri(uri)
    assert "secret" not in str(info.value) and "postgresql://" in str(info.value)


@pytest.mark.parametrize("uri", [
    "postgresql://alice:ab/cd@db/postgres", "postgresql://alice:s3cret",
    "postgresql://alice:123456", "postgresql://alice:s%zzcret",
])
def test_port_errors_never_echo_the_port(uri: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_uri(uri)
    text = str(info.value)
    assert not any(secret in text for secret in ("ab", "s3cret", "123456", "zzcret")), text


ADVERSARIAL = {
    "a": "a" * 2**20, "=": "=" * 2**20, "'": "'" * 2**20, "a=": "a=" * 2**19,
    "a ": "a " * 2**19, "a='": "a='" * 350_000, "pw": "password=" * 120_000,
    "spaces": "a" + " " * 2**20 + "=", "a\\": "a='\\" * 260_000, "&": "a&" * 2**19,
    "uri": "postgresql://" * 80_000, "uri@": "postgresql://u:p@" * 60_000,
}


@pytest.mark.parametrize("name", ADVERSARIAL)
def test_masking_is_linear(name: str) -> None:
    """1 MiB of hostile text is masked fast (it is what a client sends before it has
    authenticated), by the capped entry points and by the parameter pattern itself."""
    text = ADVERSARIAL[name]
    start = time.perf_counter()
    _mask_params(text)
    mask_text(text)
    mask_uri(text)
    assert time.perf_counter() - start < 1.0


def test_masking_is_capped() -> None:
    text = "password=secret " + "x" * (2 * MASK_LIMIT)
    masked = mask_text(text)
    assert masked.startswith("password=*** x") and "secret" not in masked
    assert len(masked) < MASK_LIMIT + 100 and masked.endswith(f"[{len(text) - MASK_LIMIT} "
                                                                "characters cut]")
    assert mask_uri("postgresql://h/?x=" + "y" * 2 * MASK_LIMIT).endswith("characters cut]")
    assert mask_text("short") == "short"


def test_conninfo_masks_and_round_trips() -> None:
    info = parse_uri("postgresql://us%40er:p%3Ass@[::1]:6000/d%2Fb?sslmode=require"
                     "&connect_timeout=5&application_name=a%26b")
    assert "p:ss" not in repr(info) and "***" in repr(info)
    assert info.masked() == ("postgresql://us%40er:***@[::1]:6000/d%2Fb?sslmode=require"
                             "&connect_timeout=5&application_name=a%26b")
    assert parse_uri(info.to_uri()) == info
    assert info.address == "[::1]:6000"


safe_text = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)),
                    max_size=20)


@given(safe_text.filter(bool), safe_text, safe_text.filter(bool),
       st.text("abcdefghijklmnopqrstuvwxyz0123456789.-", min_size=1, max_size=20),
       st.integers(1, 65535), st.sampled_from(["disable", "prefer", "require"]))
def test_to_uri_round_trips(user: str, password: str, dbname: str, host: str, port: int,
                            sslmode: str) -> None:
    info = ConnInfo(host=host, port=port, user=user, password=password, dbname=dbname,
                    sslmode=sslmode)
    assert parse_uri(info.to_uri()) == info
    if password:
        assert mask_uri(info.to_uri()) == info.masked()


# -- passwords from the environment -----------------------------------------------------

PGPASS = r"""# comment
db.example.com:5432:prod:alice:prodpass
*:*:staging:*:stagingpass
localhost:5432:*:bob:bob\:with\\colon
host\:x:5432:*:*:escaped-host
weird:*:*:*:pass:with:colons
short:line
\*:*:*:*:literal-star
*:*:*:*:fallback
"""


def test_parse_pgpass() -> None:
    entries = parse_pgpass(PGPASS)
    assert entries[0] == PgpassEntry("db.example.com", "5432", "prod", "alice", "prodpass")
    assert entries[1] == PgpassEntry(None, None, "staging", None, "stagingpass")
    assert entries[2].password == "bob:with\\colon"
    assert entries[3].host == "host:x"
    assert entries[4].password == "pass"  # a field ends at an unescaped ':'
    assert entries[5].host == "*" and entries[6].host is None  # \* is a literal star
    assert len(entries) == 7  # the short line is skipped


@pytest.mark.parametrize(("host", "port", "db", "user", "expected"), [
    ("db.example.com", "5432", "prod", "alice", "prodpass"),
    ("db.example.com", "5433", "prod", "alice", "fallback"),
    ("anything", "1", "staging", "carol", "stagingpass"),
    ("localhost", "5432", "x", "bob", "bob:with\\colon"),
    ("host:x", "5432", "d", "u", "escaped-host"),
    ("*", "1", "d", "u", "literal-star"),
])
def test_pgpass_first_match_wins(host: str, port: str, db: str, user: str,
                                 expected: str) -> None:
    entry = next(e for e in parse_pgpass(PGPASS) if e.matches(host, port, db, user))
    assert entry.password == expected


def write_pgpass(path: Path, text: str, mode: int) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_pgpass_ignored_unless_private(tmp_path: Path) -> None:
    private = write_pgpass(tmp_path / "private", PGPASS, 0o600)
    readonly = write_pgpass(tmp_path / "readonly", PGPASS, 0o400)
    shared = write_pgpass(tmp_path / "shared", PGPASS, 0o644)
    assert read_pgpass(private) and read_pgpass(readonly)
    assert read_pgpass(shared) == []
    assert read_pgpass(tmp_path / "missing") == []
    assert read_pgpass(tmp_path) == []  # a directory


def test_lookup_password_order(tmp_path: Path) -> None:
    pgpass = write_pgpass(tmp_path / "pgpass", "h:5432:db:u:from-file\n", 0o600)
    env = {"PGPASSFILE": str(pgpass)}
    info = parse_uri("postgresql://u@h/db")
    assert lookup_password(info, "u", "db", env) == "from-file"
    assert lookup_password(info, "u", "other", env) is None
    assert lookup_password(info, "u", "db", {**env, "PGPASSWORD": "from-env"}) == "from-env"
    with_password = parse_uri("postgresql://u:from-uri@h/db")
    assert lookup_password(with_password, "u", "db", {**env, "PGPASSWORD": "x"}) == "from-uri"
    socket_info = parse_uri("postgresql://%2Ftmp/db")
    write_pgpass(pgpass, "localhost:5432:db:u:socket\n", 0o600)
    assert lookup_password(socket_info, "u", "db", env) == "socket"


def test_default_pgpass_is_in_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    write_pgpass(tmp_path / ".pgpass", "*:*:*:*:home-file\n", 0o600)
    assert lookup_password(parse_uri("postgresql://h"), "u", "d", {}) == "home-file"


def test_relative_certificate_files_become_absolute(tmp_path) -> None:
    from zenith.pgwire.conninfo import absolute_file_parameters, parse_uri

    uri = ("postgresql://u:p%26w@h:5/db?sslrootcert=ca.crt&sslcert=c%20d/me.crt"
           "&sslkey=/abs/me.key&sslmode=verify-full&application_name=ca.crt")
    out = parse_uri(absolute_file_parameters(uri, tmp_path))
    assert out.sslrootcert == str(tmp_path / "ca.crt")
    assert out.sslcert == str(tmp_path / "c d" / "me.crt")
    assert out.sslkey == "/abs/me.key"
    assert out.application_name == "ca.crt" and out.password == "p&w"
    system = "postgresql://h/db?sslrootcert=system"
    assert absolute_file_parameters(system, tmp_path) == system
    assert absolute_file_parameters("postgresql://h/db", tmp_path) == "postgresql://h/db"
