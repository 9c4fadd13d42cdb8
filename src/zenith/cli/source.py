"""``zenith import``, ``zenith wait`` and ``zenith detach``: branches that follow a real
PostgreSQL 15 cluster (the pageserver does the work; see docs/ingest.md)."""

from __future__ import annotations

from pathlib import Path

import click

from zenith.cli.context import Repo, pass_repo, read_password_stdin
from zenith.errors import InvalidArgument
from zenith.pgwire.conninfo import add_password, map_file_parameters, mask_uri


@click.command("import")
@click.argument("branch")
@click.argument("uri")
@click.option("--timeout", type=click.FloatRange(0, 86400, min_open=True), default=600.0,
              show_default=True,
              help="Seconds to wait for the branch to become readable once the base backup "
                   "is in; past them the command fails, but the branch stays and keeps "
                   "following (`zenith wait` it).")
@click.option("--password-stdin", is_flag=True,
              help="Read the source's password from standard input (keeps it off the "
                   "command line).")
@pass_repo
def import_(repo: Repo, branch: str, uri: str, timeout: float, password_stdin: bool) -> None:
    """Create BRANCH from the PostgreSQL cluster at URI and keep following its WAL.

    URI is postgresql://user:password@host:port; the user needs the REPLICATION
    attribute, and the source wal_level=replica and wal_consistency_checking=all.

    Returns once BRANCH is readable (its WAL ingested up to the base backup's end LSN),
    printing progress on stderr meanwhile: `zenith export BRANCH DIR` works right away.
    With --password-stdin the password is read from standard input instead of the URI.
    """
    if password_stdin:
        uri = add_password(uri, read_password_stdin())
    uri = _copy_certificate_files(repo, branch, uri)
    row = repo.query("import", branch, uri, str(timeout),
                     on_notice=lambda m: click.echo(m, err=True), timeout=30.0).dicts()[0]
    click.echo(f"imported {branch} from {mask_uri(uri)}: base backup {row['start_lsn']}.."
               f"{row['end_lsn']} ({row['records']} records), readable from {row['end_lsn']}; "
               f"following the source through slot {row['slot']}")


@click.command()
@click.argument("branch")
@click.argument("lsn")
@click.option("--timeout", type=float, default=60.0, show_default=True,
              help="Seconds to wait before giving up.")
@pass_repo
def wait(repo: Repo, branch: str, lsn: str, timeout: float) -> None:
    """Return once BRANCH has ingested WAL up to LSN."""
    row = repo.query("wait", branch, lsn, str(timeout)).dicts()[0]
    click.echo(f"{branch} is at {row['last_record_lsn']}")


@click.command()
@click.argument("branch")
@pass_repo
def detach(repo: Repo, branch: str) -> None:
    """Stop following BRANCH's source and drop its replication slot; the data stays."""
    row = repo.query("detach", branch).dicts()[0]
    click.echo(f"detached {branch} ({row['outcome']})")


def _copy_certificate_files(repo: Repo, branch: str, uri: str) -> str:
    """The pageserver opens a source's certificate files itself, and only from its
    repository's ``certs/`` directory (a URI from the wire may not name any file the
    process can read): copy them to ``certs/BRANCH/`` (0600) and name the copies."""
    from zenith.pageserver.config import write_private
    from zenith.storage import validate_branch_name

    validate_branch_name(branch)
    target = repo.config.certs_dir / branch

    def copy(name: str, path: str) -> str:
        try:
            text = Path(path).expanduser().read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or "not a PEM file"
            raise InvalidArgument(f"cannot read the {name} file {path}: {reason}") from None
        target.mkdir(mode=0o700, parents=True, exist_ok=True)
        copied = target / f"{name}.pem"
        write_private(copied, text)
        return str(copied.resolve())

    return map_file_parameters(uri, copy)
