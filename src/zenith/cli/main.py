"""``zenith``: the command line. Every verb but ``init``, ``pageserver``, ``start`` and ``stop``
asks the local pageserver over the wire protocol, so the CLI holds no storage logic.

Errors from anywhere arrive as :class:`ZenithError` and are printed as ``error: ...`` (with
the server's hint), exit status 1; a usage error is click's, exit status 2.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import click

from zenith import __version__
from zenith.cli.branch import branch, timeline
from zenith.cli.context import Repo, ZenithGroup, pass_repo
from zenith.cli.export import export
from zenith.cli.remote import origin, pull, push
from zenith.cli.source import detach, import_, wait
from zenith.cli.tls import tls
from zenith.cli.user import user
from zenith.errors import InvalidArgument, ZenithError
from zenith.pageserver.config import (
    AUTH_METHODS,
    DEFAULT_LISTEN,
    RepoConfig,
    private_opener,
    resolve_repo_dir,
    secure_repository,
)
from zenith.pageserver.pidfile import process_alive, running_pid


@click.group(cls=ZenithGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-D",
    "--repo-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="ZENITH_REPO_DIR",
    help="Repository directory (default: ./.zenith, or $ZENITH_REPO_DIR).",
)
@click.version_option(__version__, prog_name="zenith")
@click.pass_context
def main(ctx: click.Context, repo_dir: Path | None) -> None:
    """zenith: a PostgreSQL pageserver with git-like push and pull of branches."""
    ctx.obj = Repo(resolve_repo_dir(repo_dir))


# -- repository and daemon --------------------------------------------------------------------


@main.command()
@click.option("--listen", default=DEFAULT_LISTEN, show_default=True, help="HOST:PORT to listen on.")
@click.option(
    "--auth-method",
    type=click.Choice(AUTH_METHODS),
    default="scram-sha-256",
    show_default=True,
    help="How clients authenticate (trust: no password, only for trusted networks; cert: a "
         "client certificate whose CN is the user name; scram+cert: both; these two need "
         "--tls).",
)
@click.option("--tls", is_flag=True,
              help="Create a CA, a server certificate it signs and a client certificate for "
                   "the local CLI in DIR/tls, and turn TLS on.")
@click.option("--tls-host", "tls_hosts", multiple=True, metavar="NAME",
              help="A host name or IP address the server certificate is also for "
                   "(repeatable), besides localhost, 127.0.0.1, ::1, this machine's name and "
                   "the listen host.")
@pass_repo
def init(repo: Repo, listen: str, auth_method: str, tls: bool,
         tls_hosts: tuple[str, ...]) -> None:
    """Create a repository with an admin user for the local CLI."""
    from zenith.pageserver.config import CONFIG_FILE, parse_listen
    from zenith.pageserver.users import Role, UserStore
    from zenith.pgwire.auth import StoredUser
    from zenith.storage import open_repository

    os.umask(0o077)  # every file of the repository is private
    if tls_hosts and not tls:
        raise click.UsageError("--tls-host needs --tls")
    if (repo.path / CONFIG_FILE).exists():
        raise InvalidArgument(f"{repo.path} already holds a zenith repository")
    tls_dir = None
    if tls:
        from zenith.pageserver import tls as tls_files

        # The loopback names always: the local CLI checks the certificate against them.
        hosts = list(dict.fromkeys([*tls_files.default_hosts(parse_listen(listen)[0]),
                                    *tls_hosts]))
        for host in hosts:
            tls_files.parse_san(host)  # a bad name is refused before anything is written
        tls_dir = tls_files.TLS_DIR
        repo.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        ca, _server = tls_files.create_ca_and_server(repo.path / tls_dir, hosts,
                                                     label=repo.path.resolve().name)
        tls_files.issue_client_cert(ca, "admin", tls_files.TlsFiles(
            repo.path / tls_dir / "admin.crt", repo.path / tls_dir / "admin.key"))
    config, password = RepoConfig.create(repo.path, listen=listen, auth_method=auth_method,
                                         tls_dir=tls_dir)
    open_repository(config.db_path).close()
    admin = StoredUser.from_password(config.cli_credentials[0], password, str(Role.ADMIN),
                                     md5=auth_method == "md5")
    UserStore(config.users_path).add(admin.name, Role.ADMIN, admin.scram_verifier or "",
                                     admin.md5_hash)
    click.echo(f"Initialized zenith repository in {repo.path}")
    click.echo(f"  listen address: {config.listen} (auth {auth_method}"
               f"{', TLS' if tls else ''})")
    click.echo(f"  admin user \"{admin.name}\": password kept in {config.path / 'config.toml'} "
               "(mode 0600) for the local CLI")
    if tls:
        click.echo(f"  TLS: CA {repo.path / 'tls' / 'ca.crt'} (give it to clients as "
                   f"sslrootcert), server certificate for {', '.join(hosts)}")


@main.command()
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
@pass_repo
def pageserver(repo: Repo, verbose: bool) -> None:
    """Run the pageserver in the foreground (logs to stderr; stop with Ctrl-C or SIGTERM)."""
    from zenith.pageserver.daemon import run_pageserver

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    run_pageserver(repo.config)


@main.command()
@click.option("--timeout", default=15.0, show_default=True, help="Seconds to wait for it to serve.")
@pass_repo
def start(repo: Repo, timeout: float) -> None:
    """Start the pageserver in the background (log: pageserver.log in the repository)."""
    config = repo.config
    pid = running_pid(config.pid_path)
    if pid is not None:
        raise InvalidArgument(f"the pageserver is already running (pid {pid})")
    for warning in secure_repository(config.path):
        click.echo(f"warning: {warning}", err=True)
    with open(config.log_path, "ab", opener=private_opener) as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "zenith.cli", "-D", str(config.path), "pageserver"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            close_fds=True,
        )
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            tail = config.log_path.read_text(errors="replace").splitlines()[-5:]
            raise InvalidArgument(
                f"the pageserver exited with status {proc.returncode} while starting",
                detail="\n".join(tail),
            )
        try:
            repo.query("status", timeout=2.0)
            break
        except ZenithError:
            if time.monotonic() > deadline:
                proc.terminate()
                raise
            time.sleep(0.1)
    click.echo(f"pageserver started (pid {proc.pid}), listening on {config.listen}")


@main.command()
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait for it to stop.")
@pass_repo
def stop(repo: Repo, timeout: float) -> None:
    """Stop the background pageserver and wait until it has shut down cleanly."""
    import signal

    config = repo.config
    pid = running_pid(config.pid_path)
    if pid is None:
        raise InvalidArgument("the pageserver is not running")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while running_pid(config.pid_path) is not None or process_alive(pid):
        if time.monotonic() > deadline:
            raise InvalidArgument(f"the pageserver (pid {pid}) did not stop in {timeout:.0f} s")
        time.sleep(0.05)
    click.echo(f"pageserver stopped (pid {pid})")


@main.command()
@pass_repo
def status(repo: Repo) -> None:
    """Show whether the pageserver runs and what it serves."""
    answer = repo.query("status").dicts()[0]
    click.echo(f"pageserver {answer['server_version']} on {answer['listen_address']}")
    click.echo(f"  repository {answer['repository_id']} at {repo.path}")
    click.echo(f"  up {answer['uptime_seconds']} s; you are {answer['user']} ({answer['role']})")
    space = repo.query("branch_space").dicts()
    if space:
        kept = sum(int(r["stored_bytes"] or 0) for r in space)
        windows = sorted({str(r["window"]) for r in space})
        click.echo(f"  history: {len(space)} branches, {kept / 1048576:.1f} MiB of page "
                   f"versions, window {', '.join(windows)} (zenith branch list --verbose)")
    for s in repo.query("source_list").dicts():
        lag = f"{s['lag_bytes']} bytes behind" if s["lag_bytes"] is not None else "lag unknown"
        click.echo(f"  {s['name']} follows PostgreSQL: at {s['last_record_lsn']}, {lag}, "
                   f"{s['state']}")


# -- history ----------------------------------------------------------------------------------


@main.command()
@click.argument("branch")
@click.option("--pages", type=click.IntRange(1, 1 << 24), required=True, help="Pages per round.")
@click.option("--rounds", type=click.IntRange(1, 1 << 20), default=1, show_default=True,
              help="Rounds; each rewrites every page at growing LSNs.")
@click.option("--seed", type=click.IntRange(0, 1 << 62), default=0, show_default=True)
@click.option("--page-size", type=click.IntRange(16, 1 << 20), default=8192, show_default=True)
@click.option("--one-lsn", is_flag=True,
              help="Write each round's pages at one LSN, as a base-backup import does.")
@pass_repo
def generate(repo: Repo, branch: str, pages: int, rounds: int, seed: int, page_size: int,
             one_lsn: bool) -> None:
    """Write deterministic synthetic page history into BRANCH (created if missing). A
    branch received from another pageserver first gets a timeline of its own."""
    answer = repo.query(
        "generate", branch, str(pages), str(rounds), str(seed), str(page_size),
        *(["one_lsn"] if one_lsn else []),
        on_notice=lambda m: click.echo(f"  {m}", err=True),
        timeout=3600.0,
    ).dicts()[0]
    click.echo(
        f"{branch}: {answer['records']} records, "
        f"{answer['start_lsn']}..{answer['last_record_lsn']}"
    )


@main.command()
@click.argument("target", metavar="BRANCH[@LSN]")
@pass_repo
def digest(repo: Repo, target: str) -> None:
    """Print a hash of BRANCH's whole state at LSN (default: its last record LSN)."""
    answer = repo.query("digest", target, timeout=3600.0).dicts()[0]
    click.echo(f"{answer['digest']}  {answer['name']}@{answer['lsn']}")


@main.command()
@click.argument("branch", required=False)
@pass_repo
def gc(repo: Repo, branch: str | None) -> None:
    """Remove page versions outside the history windows and compact the rest now (every
    branch, or BRANCH's timelines). The windows are `pitr` and [pitr_branches] in
    config.toml; compaction stores old page images compressed, as the same records. The
    pageserver also does both every gc_period seconds."""
    answer = repo.query("gc", *([branch] if branch else []), timeout=3600.0,
                        on_notice=lambda m: click.echo(m, err=True))
    total = 0
    for row in answer.dicts():
        removed, size = int(row["records_removed"] or 0), int(row["bytes_removed"] or 0)
        total += int(row["bytes_reclaimed"] or 0)
        names = row["branches"] or "(no name)"
        kept = f", keeps {row['kept_points']}" if row["kept_points"] else ""
        packed = int(row["images_packed"] or 0)
        compacted = (f"; packed {packed} page images ({row['packed_bytes_before']} -> "
                     f"{row['packed_bytes_after']} bytes)") if packed else ""
        click.echo(f"{names} [{row['timeline_id']}]: readable from {row['horizon']}{kept}; "
                   f"removed {removed} page versions ({size} bytes){compacted}")
    click.echo(f"gc: {total} bytes given back to the file system ({len(answer.rows)} "
               "timelines)")


main.add_command(branch)
main.add_command(timeline)
main.add_command(user)
main.add_command(tls)
main.add_command(origin)
main.add_command(push)
main.add_command(pull)
main.add_command(import_)
main.add_command(wait)
main.add_command(detach)
main.add_command(export)

if __name__ == "__main__":
    main()
