"""What every ``zenith`` command shares: the repository it works on, and error reporting."""

from __future__ import annotations

import getpass
import sys
from pathlib import Path
from typing import Any

import click

from zenith.cli import local
from zenith.errors import ZenithError
from zenith.pageserver.config import RepoConfig
from zenith.pageserver.quoting import command_text
from zenith.pgwire.conninfo import mask_text


class ZenithGroup(click.Group):
    """Turns zenith's errors into one line on stderr and a non-zero exit status."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ZenithError as exc:
            # Masked whatever raised it: no password on a terminal or in a CI log.
            click.secho(f"error: {mask_text(exc.message)}", fg="red", err=True)
            if exc.detail:
                click.echo(f"detail: {mask_text(exc.detail)}", err=True)
            if exc.hint:
                click.echo(f"hint: {mask_text(exc.hint)}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


class Repo:
    """The repository directory the command works on (``-D``, ``ZENITH_REPO_DIR``, ./.zenith)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._config: RepoConfig | None = None

    @property
    def config(self) -> RepoConfig:
        if self._config is None:
            self._config = RepoConfig.load(self.path)
        return self._config

    def query(self, *words: str, **kw: Any) -> local.Answer:
        """Run a command whose words are quoted so that no argument can split or inject."""
        return local.query(self.config, command_text(*words), **kw)


pass_repo = click.make_pass_decorator(Repo)


def read_password_stdin() -> str:
    """The first line of standard input, without its line end (``--password-stdin``: a
    secret never on a command line, where every user of the machine can read it). From a
    terminal it is read without echo, as a password prompt does."""
    if sys.stdin.isatty():
        return getpass.getpass("password: ")
    return sys.stdin.readline().rstrip("\r\n")
