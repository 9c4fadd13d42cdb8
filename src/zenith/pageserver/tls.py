"""Certificates for a quick start with TLS: ``zenith init --tls`` and ``zenith tls``.

``init --tls`` makes, in the repository's ``tls/`` directory, a certificate authority of
its own (``ca.crt``, ``ca.key``), a server certificate it signs for the names and
addresses the pageserver is reached by (``server.crt``, ``server.key``), and a client
certificate for the local CLI's admin user (``admin.crt``, ``admin.key``). ``zenith tls
client-cert NAME`` signs more client certificates with that CA: the certificate's common
name (CN) is the user name, as PostgreSQL's ``cert`` authentication takes it.

Keys are ECDSA P-256 (as fast to verify as RSA-3072 is strong, and small); every key file
is written 0600. This is for a quick start and small teams: a CA of the organisation, or
one made with ``openssl``, works the same (config.toml names the files).
"""

from __future__ import annotations

import datetime
import ipaddress
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from zenith.errors import AlreadyExists, InvalidArgument, NotFound
from zenith.pageserver.config import write_private

TLS_DIR: Final = "tls"
CA_DAYS: Final = 3650
CERT_DAYS: Final = 825  # what browsers and most TLS stacks accept for a leaf certificate
_DNS_NAME: Final = re.compile(
    r"(?=.{1,253}\Z)(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?)+")
_CN: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,62}")  # a zenith user name


@dataclass(frozen=True)
class TlsFiles:
    """Paths of one certificate and its key."""

    cert: Path
    key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def _pem_cert(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _builder(subject: str, issuer: x509.Name | None, public: ec.EllipticCurvePublicKey,
             days: int) -> x509.CertificateBuilder:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    start = _now() - datetime.timedelta(minutes=5)  # a peer's clock a little behind
    return (x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer or name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + datetime.timedelta(days=days))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False))


def parse_san(name: str) -> x509.GeneralName:
    """A host name or IP address for the server certificate's subjectAltName."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name.strip("[]")))
    except ValueError:
        pass
    if _DNS_NAME.fullmatch(name) is None:
        raise InvalidArgument(f"invalid host name {name!r} for the server certificate",
                              hint="a DNS name (letters, digits, '-', '.') or an IP address")
    return x509.DNSName(name.rstrip(".").lower())


def default_hosts(listen_host: str) -> list[str]:
    """Names a local pageserver is reached by: localhost, the loopback addresses, this
    machine's host name and the listen address (unless it is a wildcard)."""
    hosts = ["localhost", "127.0.0.1", "::1"]
    with_host = socket.gethostname()
    if with_host and _DNS_NAME.fullmatch(with_host):
        hosts.append(with_host)
    if listen_host not in ("0.0.0.0", "::", "", "*"):
        hosts.append(listen_host)
    return list(dict.fromkeys(hosts))


def create_ca_and_server(directory: Path, hosts: list[str], *, label: str) -> tuple[
        TlsFiles, TlsFiles]:
    """Create ``ca.crt``/``ca.key`` and ``server.crt``/``server.key`` in ``directory``
    (0700, created): a self-signed CA named after ``label`` and a server certificate for
    ``hosts`` signed by it. Returns (ca, server)."""
    sans = [parse_san(h) for h in hosts]
    if not sans:
        raise InvalidArgument("the server certificate needs at least one host name")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca = TlsFiles(directory / "ca.crt", directory / "ca.key")
    server = TlsFiles(directory / "server.crt", directory / "server.key")
    for path in (ca.cert, ca.key, server.cert, server.key):
        if path.exists():
            raise AlreadyExists(f"{path} already exists")
    ca_key = _key()
    ca_cert = (_builder(f"zenith CA {label}", None, ca_key.public_key(), CA_DAYS)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(
                   digital_signature=True, content_commitment=False, key_encipherment=False,
                   data_encipherment=False, key_agreement=False, key_cert_sign=True,
                   crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA256()))
    server_key = _key()
    server_cert = (_builder(str(hosts[0]), ca_cert.subject, server_key.public_key(), CERT_DAYS)
                   .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                                  critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                                  critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       ca_key.public_key()), critical=False)
                   .sign(ca_key, hashes.SHA256()))
    write_private(ca.key, _pem_key(ca_key))
    write_private(ca.cert, _pem_cert(ca_cert))
    write_private(server.key, _pem_key(server_key))
    write_private(server.cert, _pem_cert(server_cert))
    return ca, server


def issue_client_cert(ca: TlsFiles, user: str, out: TlsFiles) -> None:
    """Sign a client certificate whose CN is ``user`` with the CA ``ca``; written to
    ``out`` (key 0600). The CA's key must be readable here."""
    if _CN.fullmatch(user) is None:
        raise InvalidArgument(f"invalid user name {user!r}",
                              hint="letters, digits, '_', '.', '-'; at most 63")
    try:
        ca_key = serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    except FileNotFoundError as exc:
        raise NotFound(f"no certificate authority: {exc.filename} does not exist",
                       hint="`zenith init --tls` creates one in the repository's tls/ "
                            "directory") from None
    except ValueError as exc:
        raise InvalidArgument(f"cannot load the certificate authority from {ca.cert.parent}: "
                              f"{exc}") from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise InvalidArgument(f"{ca.key} is not an ECDSA key made by `zenith init --tls`",
                              hint="sign client certificates with the tool that made the CA")
    key = _key()
    cert = (_builder(user, ca_cert.subject, key.public_key(), CERT_DAYS)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    for path in (out.key, out.cert):
        if path.exists():
            raise AlreadyExists(f"{path} already exists", hint="remove it first, or choose "
                                "another --out directory")
    out.cert.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_private(out.key, _pem_key(key))
    write_private(out.cert, _pem_cert(cert))
