"""``zenith branch``: list branches as a tree, create and delete them; ``zenith timeline``:
every timeline, named or not, and deleting unnamed ones."""

from __future__ import annotations

import click

from zenith.cli.context import Repo, pass_repo
from zenith.cli.local import Answer


@click.group()
def branch() -> None:
    """List, create and delete branches."""


def render_tree(answer: Answer) -> list[str]:
    """Branches as a tree of timelines: a child under the branch its timeline descends from."""
    rows = answer.dicts()
    by_timeline: dict[str, list[dict[str, str | None]]] = {}
    for row in rows:
        by_timeline.setdefault(str(row["timeline_id"]), []).append(row)
    children: dict[str | None, list[dict[str, str | None]]] = {}
    for row in rows:
        parent = row["ancestor_timeline_id"]
        children.setdefault(parent if parent in by_timeline else None, []).append(row)

    def ancestor_text(row: dict[str, str | None]) -> str:
        parent = row["ancestor_timeline_id"]
        if parent is None:
            return "-"
        names = by_timeline.get(parent)
        who = names[0]["name"] if names else parent[:8]
        return f"{who}@{row['ancestor_lsn']}"

    table: list[tuple[str, str, str, str]] = []

    def walk(parent: str | None, prefix: str, depth: int) -> None:
        kids = sorted(children.get(parent, []), key=lambda r: str(r["name"]))
        for i, row in enumerate(kids):
            last = i == len(kids) - 1
            lead = "" if depth == 0 else prefix + ("└─ " if last else "├─ ")
            table.append((lead + str(row["name"]), str(row["timeline_id"]), ancestor_text(row),
                          str(row["last_record_lsn"])))
            tid = str(row["timeline_id"])
            if by_timeline[tid][0] is row:  # descend once per timeline
                walk(tid, "" if depth == 0 else prefix + ("   " if last else "│  "), depth + 1)

    walk(None, "", 0)
    header = ("NAME", "TIMELINE", "ANCESTOR@LSN", "LAST_RECORD_LSN")
    widths = [max(len(r[c]) for r in [header, *table]) for c in range(4)]
    return [
        "  ".join(cell.ljust(widths[c]) for c, cell in enumerate(r)).rstrip()
        for r in [header, *table]
    ]


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


@branch.command("list")
@click.option("-v", "--verbose", is_flag=True,
              help="Also each branch's history window, the oldest LSN it is readable at, "
                   "and the bytes its timeline stores (of them garbage GC left).")
@click.option("--origin", "origin_name", metavar="NAME",
              help="List the branches of origin NAME (a pageserver or a bucket) instead.")
@pass_repo
def list_(repo: Repo, verbose: bool, origin_name: str | None) -> None:
    """Show branches as a tree: name, timeline id, ancestor@LSN, last record LSN."""
    if origin_name is not None:
        if verbose:
            raise click.UsageError("--verbose shows local history only; drop it with --origin")
        answer = repo.query("perform_list", repo.config.origin(origin_name), timeout=30.0)
        if not answer.rows:
            click.echo(f"origin {origin_name} has no branches yet")
            return
        for line in render_tree(answer):
            click.echo(line)
        return
    answer = repo.query("branch_list")
    if not answer.rows:
        click.echo("no branches yet (create one with `zenith branch create NAME`)")
        return
    for line in render_tree(answer):
        click.echo(line)
    if verbose:
        click.echo("\nhistory:")
        for row in repo.query("branch_space").dicts():
            stored = int(row["stored_bytes"] or 0)
            unreclaimed = int(row["unreclaimed_bytes"] or 0)
            click.echo(f"  {row['name']}: window {row['window']}, readable from "
                       f"{row['readable_from']} to {row['last_record_lsn']}, "
                       f"{_size(stored)} of page versions"
                       + (f" (+{_size(unreclaimed)} removed, given back at the next GC)"
                          if unreclaimed else ""))
    sources = repo.query("source_list").dicts()
    if sources:
        click.echo("\nfollowing PostgreSQL:")
    for s in sources:
        lag = f"lag {s['lag_bytes']} bytes" if s["lag_bytes"] is not None else "lag unknown"
        source = s["source"] or "(source shown to admins only)"
        click.echo(f"  {s['name']} <- {source} (slot {s['slot']}): at "
                   f"{s['last_record_lsn']}, {lag}, {s['state']}")


@branch.command()
@click.argument("name")
@click.option("--from", "source", metavar="BRANCH[@LSN]",
              help="Branch (or timeline id) to start from, at LSN (default: its last record).")
@pass_repo
def create(repo: Repo, name: str, source: str | None) -> None:
    """Create branch NAME, empty or from another branch at an LSN."""
    words = ["branch_create", name] + ([source] if source else [])
    row = repo.query(*words).dicts()[0]
    where = f" from {source}" if source else ""
    click.echo(f"created branch {row['name']}{where}: timeline {row['timeline_id']} "
               f"at {row['last_record_lsn']}")


@branch.command()
@click.argument("name")
@pass_repo
def delete(repo: Repo, name: str) -> None:
    """Remove branch NAME (history other branches descend from is kept)."""
    repo.query("branch_delete", name)
    click.echo(f"deleted branch {name}")


@click.group()
def timeline() -> None:
    """List timelines (named or not) and delete unnamed ones."""


@timeline.command("list")
@pass_repo
def timeline_list(repo: Repo) -> None:
    """Every timeline: id, ancestor@LSN, last record LSN, names, received, pending records."""
    for t in repo.query("timeline_list").dicts():
        ancestor = f"{t['ancestor_timeline_id']}@{t['ancestor_lsn']}" \
            if t["ancestor_timeline_id"] else "-"
        names = t["branches"] or "(unnamed)"
        origin = "received" if t["received"] == "true" else "written here"
        pending = f", {t['pending_records']} records of {t['pending_lsn']} pending" \
            if t["pending_lsn"] else ""
        click.echo(f"{t['timeline_id']}  {names}  from {ancestor}  at {t['last_record_lsn']}"
                   f"  ({origin}{pending})")


@timeline.command("delete")
@click.argument("timeline_id")
@pass_repo
def timeline_delete(repo: Repo, timeline_id: str) -> None:
    """Delete unnamed timeline TIMELINE_ID (no branch names it, none descends from it) and
    its records: what a refused or interrupted transfer left, to receive it anew."""
    repo.query("timeline_delete", timeline_id)
    click.echo(f"deleted timeline {timeline_id}")
