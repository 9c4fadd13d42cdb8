"""Talking to the local pageserver: one simple query over pgwire with the CLI's credentials."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from zenith.errors import ConnectionFailed
from zenith.pageserver.config import RepoConfig
from zenith.pgwire.client import QueryResult, connect, parse_local_uri

NoticeFn = Callable[[str], None]


@dataclass
class Answer:
    columns: list[str]
    rows: list[list[str | None]]
    tag: str

    def dicts(self) -> list[dict[str, str | None]]:
        return [dict(zip(self.columns, row, strict=True)) for row in self.rows]


async def _run(config: RepoConfig, sql: str, on_notice: NoticeFn | None, timeout: float) -> Answer:
    try:
        # Only the method the pageserver was configured with (never cleartext), so that
        # an impostor bound on its port cannot collect the admin password.
        info = parse_local_uri(config.local_uri(), auth_method=config.auth_method)
        conn = await connect(info, timeout=timeout)
    except ConnectionFailed as exc:
        raise ConnectionFailed(
            f"cannot reach the pageserver at {config.listen}: {exc.message}",
            hint="start it with `zenith start` (or `zenith pageserver` in the foreground)",
        ) from exc
    async with conn:
        if on_notice is not None:
            notify = on_notice
            conn.on_notice = lambda notice: notify(notice.message)
        result: QueryResult = await conn.simple_query(sql)
    return Answer(list(result.columns), [list(r) for r in result.rows], result.command_tag or "")


def query(
    config: RepoConfig, sql: str, *, on_notice: NoticeFn | None = None, timeout: float = 10.0
) -> Answer:
    """Run ``sql`` on the local pageserver; a ZenithError carries the server's error."""
    return asyncio.run(_run(config, sql, on_notice, timeout))
