"""Verifiers and the server side of SCRAM-SHA-256 / MD5, checked against independent
client implementations (scramp's, and a minimal one that sends libpq's empty user name)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

import pytest
import scramp

from zenith.errors import ProtocolViolation
from zenith.pgwire.auth import (
    ScramServerExchange,
    ScramVerifier,
    StoredUser,
    check_md5_response,
    check_password,
    make_md5_hash,
    make_scram_verifier,
    md5_client_response,
)


def test_scram_verifier_has_postgresql_text_format() -> None:
    text = make_scram_verifier("pencil")
    assert re.fullmatch(r"SCRAM-SHA-256\$4096:[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+:[A-Za-z0-9+/=]+",
                        text)
    verifier = ScramVerifier.parse(text)
    assert verifier.iterations == 4096 and len(verifier.salt) == 16
    assert str(verifier) == text
    assert make_scram_verifier("pencil") != text  # salted


def test_scram_verifier_matches_postgresql_derivation() -> None:
    verifier = ScramVerifier.parse(make_scram_verifier("pencil"))
    salted = hashlib.pbkdf2_hmac("sha256", b"pencil", verifier.salt, verifier.iterations)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    assert hashlib.sha256(client_key).digest() == verifier.stored_key
    assert hmac.digest(salted, b"Server Key", "sha256") == verifier.server_key


@pytest.mark.parametrize("text", ["", "md5abc", "SCRAM-SHA-256$x:YQ==$YQ==:YQ==",
                                  "SCRAM-SHA-256$4096:YQ==$YQ==:YQ==", "SCRAM-SHA-1$1:a$b:c"])
def test_invalid_verifiers(text: str) -> None:
    with pytest.raises(ValueError):
        ScramVerifier.parse(text)


def test_md5_hash_as_postgresql_stores_it() -> None:
    # SELECT 'md5' || md5('secret' || 'alice')
    assert make_md5_hash("alice", "secret") == "md5" + hashlib.md5(b"secretalice").hexdigest()
    stored = make_md5_hash("alice", "secret")
    salt = b"\x01\x02\x03\x04"
    response = md5_client_response("alice", "secret", salt)
    assert check_md5_response(stored, salt, response)
    assert not check_md5_response(stored, salt, md5_client_response("alice", "wrong", salt))
    assert not check_md5_response(stored, b"\0\0\0\0", response)
    assert not check_md5_response(None, salt, response)


def test_check_password_against_either_verifier() -> None:
    user = StoredUser.from_password("alice", "secret", "admin")
    assert check_password("secret", scram_verifier=user.scram_verifier, md5_hash=None,
                          user="alice")
    assert not check_password("Secret", scram_verifier=user.scram_verifier, md5_hash=None,
                              user="alice")
    assert check_password("secret", scram_verifier=None, md5_hash=user.md5_hash, user="alice")
    assert not check_password("secret", scram_verifier=None, md5_hash=None, user="alice")
    assert "secret" not in repr(user) and "SCRAM" not in repr(user)


def scramp_exchange(server: ScramServerExchange, user: str, password: str) -> bool:
    client = scramp.ScramClient(["SCRAM-SHA-256"], user, password)
    server_first = server.client_first(client.get_client_first().encode())
    client.set_server_first(server_first.decode())
    server_final = server.client_final(client.get_client_final().encode())
    if server_final is None:
        return False
    client.set_server_final(server_final.decode())  # verifies the server's signature
    return True


def libpq_style_exchange(server: ScramServerExchange, password: str,
                         gs2: str = "n,,") -> bool:
    """What libpq sends: an EMPTY user name in client-first."""
    nonce = base64.b64encode(b"libpq-client-nonce").decode()
    bare = f"n=,r={nonce}"
    server_first = server.client_first((gs2 + bare).encode()).decode()
    attrs = dict(part.split("=", 1) for part in server_first.split(","))
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(attrs["s"]),
                                 int(attrs["i"]))
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    without_proof = f"c={base64.b64encode(gs2.encode()).decode()},r={attrs['r']}"
    auth_message = f"{bare},{server_first},{without_proof}".encode()
    signature = hmac.digest(hashlib.sha256(client_key).digest(), auth_message, "sha256")
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    final = server.client_final(f"{without_proof},p={base64.b64encode(proof).decode()}"
                                .encode())
    if final is None:
        return False
    server_key = hmac.digest(salted, b"Server Key", "sha256")
    expected = base64.b64encode(hmac.digest(server_key, auth_message, "sha256")).decode()
    assert final.decode() == f"v={expected}"
    return True


def verifier(password: str) -> ScramVerifier:
    return ScramVerifier.parse(make_scram_verifier(password))


def test_scram_with_scramp_client() -> None:
    assert scramp_exchange(ScramServerExchange(verifier("pw"), "alice"), "alice", "pw")
    assert not scramp_exchange(ScramServerExchange(verifier("pw"), "alice"), "alice", "nope")


def test_scram_with_libpq_empty_user_name() -> None:
    assert libpq_style_exchange(ScramServerExchange(verifier("pw"), "alice"), "pw")
    assert libpq_style_exchange(ScramServerExchange(verifier("pw"), "alice"), "pw", gs2="y,,")
    assert not libpq_style_exchange(ScramServerExchange(verifier("pw"), "alice"), "nope")


def test_mock_exchange_for_unknown_user_always_fails_and_looks_real() -> None:
    first = ScramServerExchange(None, "mallory").client_first(b"n,,n=,r=abc").decode()
    again = ScramServerExchange(None, "mallory").client_first(b"n,,n=,r=abc").decode()
    other = ScramServerExchange(None, "eve").client_first(b"n,,n=,r=abc").decode()
    salt = dict(p.split("=", 1) for p in first.split(","))["s"]
    assert salt == dict(p.split("=", 1) for p in again.split(","))["s"]  # stable per user
    assert salt != dict(p.split("=", 1) for p in other.split(","))["s"]
    assert len(base64.b64decode(salt)) == 16 and ",i=4096" in first
    assert not libpq_style_exchange(ScramServerExchange(None, "mallory"), "anything")


@pytest.mark.parametrize("client_first", [
    b"", b"n", b"x,,n=,r=abc", b"p=tls-server-end-point,,n=,r=abc", b"n,a=bob,n=,r=abc",
    b"n,,r=abc", b"n,,n=,r=", b"n,,n=,r=a\x01b", b"n,,n=,r=abc,m=ext", b"\xff", b"n,,junk",
])
def test_malformed_client_first(client_first: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        ScramServerExchange(verifier("pw"), "alice").client_first(client_first)


@pytest.mark.parametrize("client_final", [
    b"", b"c=biws,r=abc", b"c=biws,r=WRONG,p=" + base64.b64encode(bytes(32)),
    b"c=eSws,r=NONCE,p=" + base64.b64encode(bytes(32)),  # wrong channel-binding flag
    b"c=biws,r=NONCE,p=" + base64.b64encode(bytes(5)), b"c=biws,r=NONCE,p=!!!",
])
def test_malformed_client_final(client_final: bytes) -> None:
    exchange = ScramServerExchange(verifier("pw"), "alice")
    first = exchange.client_first(b"n,,n=,r=abc").decode()
    nonce = dict(p.split("=", 1) for p in first.split(","))["r"]
    with pytest.raises(ProtocolViolation):
        exchange.client_final(client_final.replace(b"NONCE", nonce.encode()))


def test_client_final_before_client_first() -> None:
    with pytest.raises(ProtocolViolation):
        ScramServerExchange(verifier("pw"), "alice").client_final(b"c=biws,r=a,p=b")
