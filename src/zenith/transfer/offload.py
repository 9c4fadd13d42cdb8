"""How a transfer runs its blocking steps off the event loop: an :class:`Offload`.

The pageserver passes one that runs them in its bounded long-work pool and stops them when
the command is cancelled (``zenith.pageserver.workers``); without one a step runs in
asyncio's default executor, as :func:`asyncio.to_thread` does. The type lives here, below
the pageserver, so that the transfer layer needs nothing from above it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import ParamSpec, Protocol, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


class Offload(Protocol):
    """Run ``fn(*args, **kwargs)`` in a worker thread and return its result."""

    async def __call__(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T: ...


#: The default: asyncio's own executor.
to_thread: Offload = asyncio.to_thread
