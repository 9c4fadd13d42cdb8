"""``zenith tls``: client certificates signed by the CA ``zenith init --tls`` made."""

from __future__ import annotations

from pathlib import Path

import click

from zenith.cli.context import Repo, pass_repo
from zenith.pageserver.tls import TLS_DIR, TlsFiles, issue_client_cert


@click.group()
def tls() -> None:
    """Certificates of the repository's own CA (made by `zenith init --tls`)."""


@tls.command("client-cert")
@click.argument("user")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("."), show_default=True,
              help="Directory for USER.crt and USER.key (key mode 0600).")
@pass_repo
def client_cert(repo: Repo, user: str, out_dir: Path) -> None:
    """Sign a client certificate for USER (its CN) with the repository's CA.

    A pageserver whose auth_method is cert (or scram+cert) signs USER in with it: give the
    other side USER.crt, USER.key and ca.crt, and name them in its origin URI
    (sslcert=, sslkey=, sslrootcert=). The user must exist here (`zenith user add USER
    --no-password`)."""
    ca_dir = repo.path / TLS_DIR
    out = TlsFiles(out_dir / f"{user}.crt", out_dir / f"{user}.key")
    issue_client_cert(TlsFiles(ca_dir / "ca.crt", ca_dir / "ca.key"), user, out)
    click.echo(f"wrote {out.cert} and {out.key} (CN={user}, signed by {ca_dir / 'ca.crt'})")
