"""``zenith user``: users of the pageserver. The CLI sends verifiers, never passwords."""

from __future__ import annotations

import sys

import click

from zenith.cli.context import Repo, pass_repo
from zenith.errors import InvalidArgument
from zenith.pgwire.auth import make_md5_hash, make_scram_verifier


@click.group()
def user() -> None:
    """Add, list and remove users."""


@user.command()
@click.argument("name")
@click.option("--role", type=click.Choice(["admin", "push", "read"]), default="read",
              show_default=True, help="read: read and pull; push: also push; admin: all.")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
@click.option("--no-password", is_flag=True,
              help="No password: the user signs in with a client certificate whose CN is "
                   "NAME (auth_method cert; see `zenith tls client-cert`).")
@pass_repo
def add(repo: Repo, name: str, role: str, password_stdin: bool, no_password: bool) -> None:
    """Add user NAME (password from a prompt, or --password-stdin, or --no-password)."""
    if no_password:
        if password_stdin:
            raise click.UsageError("--no-password and --password-stdin exclude each other")
        repo.query("user_add", name, role, "-")
        click.echo(f"added user {name} ({role}, no password: client certificate only)")
        return
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    if not password:
        raise InvalidArgument("the password is empty")
    repo.query("user_add", name, role, make_scram_verifier(password),
               make_md5_hash(name, password))
    click.echo(f"added user {name} ({role})")


@user.command("list")
@pass_repo
def list_(repo: Repo) -> None:
    """List users and their roles."""
    for name, role in repo.query("user_list").rows:
        click.echo(f"{name}\t{role}")


@user.command()
@click.argument("name")
@pass_repo
def remove(repo: Repo, name: str) -> None:
    """Remove user NAME."""
    repo.query("user_remove", name)
    click.echo(f"removed user {name}")
