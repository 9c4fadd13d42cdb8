"""``zenith origin``, ``zenith push`` and ``zenith pull``: git's remotes, for branches of
page history. The CLI asks the local pageserver to act; that pageserver connects out."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from zenith.bucket.layout import is_s3_uri
from zenith.cli.context import Repo, pass_repo, read_password_stdin
from zenith.pgwire.conninfo import (
    absolute_file_parameters,
    add_password,
    allowed_auth,
    mask_uri,
    parse_origin_uri,
)
from zenith.transfer.messages import Progress, Status, TransferArgs, TransferResult


@click.group()
def origin() -> None:
    """Manage origins: other pageservers and S3-compatible buckets to push to and pull
    from."""


@origin.command()
@click.argument("name")
@click.argument("uri")
@click.option("--password-stdin", is_flag=True,
              help="Read the origin's password from standard input (keeps it off the "
                   "command line).")
@pass_repo
def add(repo: Repo, name: str, uri: str, password_stdin: bool) -> None:
    """Add origin NAME at URI: another pageserver (postgresql://user@host:port, with the
    password from --password-stdin, or postgresql://user:password@host:port), or an
    S3-compatible bucket (s3://BUCKET/PREFIX, with ?endpoint=URL, ?region=NAME,
    ?addressing=path|virtual, ?profile=NAME; credentials come from the pageserver's AWS
    environment or shared credentials file, never from zenith)."""
    if is_s3_uri(uri):
        if password_stdin:
            raise click.UsageError("an s3:// origin takes no password: the pageserver "
                                   "uses its AWS credentials")
        repo.config.add_origin(name, uri)
        click.echo(f"added origin {name}: {uri}")
        return
    if password_stdin:
        uri = add_password(uri, read_password_stdin())
    # The pageserver opens the certificate files: from its own working directory.
    uri = absolute_file_parameters(uri, Path.cwd())
    repo.config.add_origin(name, uri)
    click.echo(f"added origin {name}: {mask_uri(uri)}")
    _warn_without_tls(name, uri)


def _warn_without_tls(name: str, uri: str) -> None:
    """On stderr: the origin's URI carries a password but may connect without TLS, or
    without checking the server's certificate."""
    info = parse_origin_uri(uri)
    if info.password is None:
        return
    clear = allowed_auth(info, tls=False) & {"password", "md5"}
    how = (("it may be sent in clear" if "password" in clear else "it may be sent as MD5")
           + " (require_auth allows it)" if clear else
           "it is used by SCRAM only: cleartext and MD5 requests are refused without a "
           "verified certificate, TLS or not")
    if info.sslmode in ("disable", "allow", "prefer"):
        click.echo(f"warning: origin {name}: with sslmode={info.sslmode} the password may "
                   f"be used without TLS and no certificate authenticates the server ({how}); "
                   "remove sslmode to get verify-full", err=True)
    elif info.sslmode == "require" and info.sslrootcert is None:
        click.echo(f"warning: origin {name}: sslmode=require does not check the server's "
                   f"certificate, so an impostor may answer ({how}); use sslmode=verify-full "
                   "with sslrootcert", err=True)


@origin.command("list")
@pass_repo
def list_(repo: Repo) -> None:
    """List origins (passwords masked)."""
    for name, uri in repo.config.origins().items():
        click.echo(f"{name}\t{mask_uri(uri)}")


@origin.command()
@click.argument("name")
@pass_repo
def remove(repo: Repo, name: str) -> None:
    """Remove origin NAME."""
    repo.config.remove_origin(name)
    click.echo(f"removed origin {name}")


@origin.command("gc")
@click.argument("name")
@click.option("--prune", default="1d", show_default=True, metavar="AGE|now",
              help="Remove unreachable objects older than this (30m, 12h, 7d); 'now' removes "
                   "them all (as git gc --prune=now).")
@click.option("--dry-run", is_flag=True, help="Count what would be removed; remove nothing.")
@pass_repo
def gc(repo: Repo, name: str, prune: str, dry_run: bool) -> None:
    """Remove what no branch of bucket origin NAME reaches: segments and indexes a killed
    or rejected push left, timelines no ref names any more. Everything a ref reaches
    (its timeline, its ancestors, all of their segments) is kept, and so is anything
    younger than --prune. gc does not run beside a push to the bucket, nor a push commit
    beside gc (docs/s3.md, "Garbage")."""
    from zenith.bucket.gc import MIN_GRACE
    from zenith.pageserver.retention import Window

    if prune == "now":
        grace = 0.0
    else:
        window = Window.parse(prune)
        if window.seconds is None:
            raise click.BadParameter(f"expected an age (30m, 12h, 7d) or now, got {prune!r}",
                                     param_hint="--prune")
        grace = window.seconds
    if grace < MIN_GRACE:
        click.echo(f"warning: --prune {prune} may remove small segments a pull from {name} "
                   "running now still reads (it would fail, and work when run again); an "
                   "hour or more does not", err=True)
    uri = repo.config.origin(name)
    words = ["origin_gc", uri, repr(grace)] + (["dry_run"] if dry_run else [])
    row = repo.query(*words, timeout=30.0).dicts()[0]
    size = int(row["bytes_removed"] or 0) / 1048576
    verb = "would remove" if dry_run else "removed"
    click.echo(f"{name}: {verb} {row['removed']} objects ({size:.1f} MiB), kept "
               f"{row['reachable']} reachable and {row['kept_young']} younger than {prune}"
               + (f"; {'would abort' if dry_run else 'aborted'} {row['uploads_aborted']} "
                  "unfinished uploads" if int(row["uploads_aborted"] or 0) else ""))


def _split_target(target: str, default: str) -> tuple[str, str]:
    name, _, branch = target.partition(":")
    if not name:
        raise click.BadParameter(f"expected ORIGIN[:BRANCH], got {target!r}")
    return name, branch or default


def _mib(n: int) -> str:
    return f"{n / 1048576:.1f} MiB"


class ProgressView:
    """Progress of a transfer: a bar on a terminal, plain lines (every 2 s) otherwise."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.tty = sys.stderr.isatty()
        self.last_line = 0.0
        self.bar = None
        self.task = None
        if self.tty:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self.bar = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
                TextColumn("{task.fields[records]} records"), TransferSpeedColumn(),
                TimeRemainingColumn(), transient=True,
            )
            self.task = self.bar.add_task(title, total=None, records="0")
            self.bar.start()

    def notice(self, message: str) -> None:
        p = Progress.from_notice(message)
        if p is None:
            click.echo(message, err=True)
            return
        done, total, rec, rec_total = p.bytes_done, p.bytes_total, p.records_done, \
            p.records_total
        if self.bar is not None and self.task is not None:
            self.bar.update(self.task, completed=done, total=total or None,
                            records=f"{rec}/{rec_total}")
        elif time.monotonic() - self.last_line >= 2.0 or done == total:
            self.last_line = time.monotonic()
            click.echo(f"{self.title}: {_mib(done)} of {_mib(total)}, "
                       f"{rec} of {rec_total} records", err=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _summary(r: TransferResult, arrow: str) -> str:
    if r.status is Status.UP_TO_DATE:
        return r.message
    span = f"{r.old_lsn or '0/0'}..{r.new_lsn}"
    size = f"{r.records} records, {_mib(r.bytes)}"
    prefix = {Status.NEW: "* [new branch] ", Status.FORCED: "+ "}.get(r.status, "")
    suffix = " (forced update)" if r.status is Status.FORCED else ""
    shallow = r.message.find(" (shallow: ")
    if shallow >= 0:  # a new copy from an LSN on: say from where, and why
        suffix += r.message[shallow:]
    if r.dry_run:
        return f"(dry run) {prefix}{arrow} {span}{suffix}: would send {size}"
    took = f"{r.seconds:.1f}" if r.seconds >= 1 else f"{r.seconds:.2f}"
    return f"{prefix}{arrow} {span}{suffix}, {size} in {took} s"


_SINCE_HELP = ("For a branch new on the destination: send its history from this LSN "
               "(0/16B3748), from this long ago (2h, 7d) or this much WAL before its head "
               "(1GiB), as a shallow copy; 'all' sends everything the source holds. "
               "Default: the destination's history window.")


def _transfer(repo: Repo, verb: str, branch: str, target: str, force: bool,
              dry_run: bool, since: str | None = None) -> None:
    """Ask the local pageserver to push or pull, show progress, then the summary line."""
    name, remote_branch = _split_target(target, branch)
    args = TransferArgs(branch, repo.config.origin(name), remote_branch, force, dry_run,
                        since)
    remote = f"{name}:{remote_branch}"
    arrow = f"{branch} -> {remote}" if verb == "push" else f"{remote} -> {branch}"
    view = ProgressView(f"{verb} {arrow}")
    try:
        answer = repo.query(*args.perform_words(verb), on_notice=view.notice, timeout=30.0)
    finally:
        view.close()
    click.echo(_summary(TransferResult.from_row(answer.dicts()[0]), arrow))


@click.command()
@click.argument("branch")
@click.argument("target", metavar="ORIGIN[:REMOTE_BRANCH]")
@click.option("--force", is_flag=True,
              help="Repoint the remote name even if histories diverged (no data is deleted).")
@click.option("--dry-run", is_flag=True, help="Report what would be sent; change nothing.")
@click.option("--since", metavar="LSN|WINDOW|all", help=_SINCE_HELP)
@pass_repo
def push(repo: Repo, branch: str, target: str, force: bool, dry_run: bool,
         since: str | None) -> None:
    """Push BRANCH to ORIGIN (as REMOTE_BRANCH, by default the same name).

    A branch new on ORIGIN gets the history its window there needs (pitr, default 7d),
    as a shallow copy when that is less than all: the state at the oldest LSN it needs,
    then the history after it."""
    _transfer(repo, "push", branch, target, force, dry_run, since)


@click.command()
@click.argument("branch")
@click.argument("target", metavar="ORIGIN[:REMOTE_BRANCH]")
@click.option("--force", is_flag=True,
              help="Repoint the local name even if histories diverged (no data is deleted).")
@click.option("--dry-run", is_flag=True, help="Report what would be received; change nothing.")
@click.option("--since", metavar="LSN|WINDOW|all", help=_SINCE_HELP)
@pass_repo
def pull(repo: Repo, branch: str, target: str, force: bool, dry_run: bool,
         since: str | None) -> None:
    """Pull REMOTE_BRANCH (by default the same name) of ORIGIN into local BRANCH.

    A branch new here gets the history its local window needs (pitr, default 7d), as a
    shallow copy when that is less than all."""
    _transfer(repo, "pull", branch, target, force, dry_run, since)
