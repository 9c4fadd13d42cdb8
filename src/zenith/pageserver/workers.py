"""Worker threads: the pageserver's blocking work off the event loop, in bounded pools by
kind of work, so that no client delays the others.

``asyncio.to_thread`` would put everything in the loop's one default executor (6 threads
on 2 cores): six ``digest`` commands of one reader would fill it and every other client's
``get_page`` would queue behind them for minutes. Instead:

* the **short** pool (SHORT_THREADS) runs quick steps: ``get_page``, branch lookups and
  changes, the user store, splitting a long command;
* the **long** pool (LONG_THREADS) runs whole-state work: ``digest``, ``fullbackup``'s tar,
  the steps of a push or pull, ``generate``. A non-admin user holds at most LONG_PER_USER
  long jobs at once; its further ones wait for its own to end (first come, first served),
  never for other users'. A job holds its slot across all its steps;
* the **wal** pool (WAL_THREADS) runs the followers' WAL ingest and base-backup imports,
  which no reader can starve.

A long job carries a cancellation event (:attr:`LongJob.cancel`): when its command ends
early (client gone, CancelRequest, statement timeout) the event is set and work that looks
at it (``Repository.digest``/``materialize``) raises :class:`zenith.errors.Cancelled`
within a few hundred keys; a step that does not look at it ends at its next boundary (a
chunk, a frame). The user's slot is freed only when the thread has stopped, so a user
cannot pile up abandoned threads by disconnecting.

The sizes are module constants today; ``workers`` (admin) lists the pools and the users
holding or waiting for long slots.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import threading
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import Any, Final, ParamSpec, TypeVar

from zenith.pageserver.users import Role
from zenith.pgwire.server import StoredUser

P = ParamSpec("P")
T = TypeVar("T")

#: Threads for quick steps (a page, a branch lookup, a user-store write).
SHORT_THREADS: Final = 8
#: Threads for whole-state work (digest, export, push/pull steps, generate).
LONG_THREADS: Final = 4
#: Threads for WAL ingest of followed branches and base-backup imports.
WAL_THREADS: Final = 4
#: Long jobs one non-admin user may run at once.
LONG_PER_USER: Final = 2


class Pool(concurrent.futures.Executor):
    """A fixed-size ThreadPoolExecutor that counts its busy threads and queued calls (an
    Executor itself, for code below the pageserver that takes one)."""

    def __init__(self, name: str, threads: int) -> None:
        self.name = name
        self.threads = threads
        self.executor = concurrent.futures.ThreadPoolExecutor(
            threads, thread_name_prefix=f"zenith-{name}")
        self._lock = threading.Lock()
        self.submitted = 0  # not yet finished
        self.busy = 0

    @property
    def queued(self) -> int:
        with self._lock:
            return self.submitted - self.busy

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
               ) -> concurrent.futures.Future[T]:
        ctx = contextvars.copy_context()

        def call() -> T:
            with self._lock:
                self.busy += 1
            try:
                return ctx.run(fn, *args, **kwargs)
            finally:
                with self._lock:
                    self.busy -= 1
                    self.submitted -= 1

        with self._lock:
            self.submitted += 1
        try:
            future = self.executor.submit(call)
        except BaseException:
            with self._lock:
                self.submitted -= 1
            raise

        def forget_unstarted(f: concurrent.futures.Future[T]) -> None:
            if f.cancelled():  # cancelled before a thread took it: call() never runs
                with self._lock:
                    self.submitted -= 1

        future.add_done_callback(forget_unstarted)
        return future

    async def run(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(*args, **kwargs)`` in this pool; what it returns or raises."""
        return await asyncio.wrap_future(self.submit(fn, *args, **kwargs))

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self.executor.shutdown(wait, cancel_futures=cancel_futures)


class _UserSlots:
    """Per-user long-job slots: a FIFO semaphore and the numbers ``workers`` shows."""

    def __init__(self, size: int) -> None:
        self.semaphore = asyncio.Semaphore(size)
        self.holding = 0
        self.waiting = 0


class LongJob:
    """One command's long work: ``await job.run(fn, ...)`` runs steps in the long pool,
    ``job.cancel`` is set when the job ends (normally or not). Use as ``async with
    workers.long_job(user) as job``."""

    def __init__(self, workers: Workers, user: str, capped: bool) -> None:
        self.cancel = threading.Event()
        self._workers = workers
        self._user = user
        self._capped = capped
        self._slots: _UserSlots | None = None
        self._inflight: set[concurrent.futures.Future[Any]] = set()

    async def __aenter__(self) -> LongJob:
        if self._capped:
            slots = self._workers._user_slots(self._user)
            slots.waiting += 1
            try:
                await slots.semaphore.acquire()
            except BaseException:
                slots.waiting -= 1
                self._workers._forget_idle(self._user)
                raise
            slots.waiting -= 1
            slots.holding += 1
            self._slots = slots
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.cancel.set()
        pending = [f for f in self._inflight if not f.done()]
        if not pending:
            self._release()
            return
        # A step still running (its command was cancelled): free the slot when it stops.
        loop = asyncio.get_running_loop()
        left = len(pending)

        def one_done() -> None:
            nonlocal left
            left -= 1
            if not left:
                self._release()

        def on_done(_: concurrent.futures.Future[Any]) -> None:
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits
                loop.call_soon_threadsafe(one_done)

        for f in pending:
            f.add_done_callback(on_done)

    def _release(self) -> None:
        if self._slots is not None:
            self._slots.holding -= 1
            self._slots.semaphore.release()
            self._slots = None
            self._workers._forget_idle(self._user)

    async def run(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(*args, **kwargs)`` in the long pool. Cancelling the await sets
        :attr:`cancel` (the step, if it looks, stops soon)."""
        future = self._workers.long.submit(fn, *args, **kwargs)
        self._inflight.add(future)
        try:
            result = await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            self.cancel.set()
            future.cancel()
            raise
        self._inflight.discard(future)
        return result


class Workers:
    """The pageserver's three pools and the per-user caps of the long one."""

    def __init__(self, *, short_threads: int = SHORT_THREADS, long_threads: int = LONG_THREADS,
                 wal_threads: int = WAL_THREADS, long_per_user: int = LONG_PER_USER) -> None:
        self.short = Pool("short", short_threads)
        self.long = Pool("long", long_threads)
        self.wal = Pool("wal", wal_threads)
        self.long_per_user = long_per_user
        self._users: dict[str, _UserSlots] = {}

    def long_job(self, user: str, *, capped: bool = True) -> LongJob:
        """A long job of ``user``; ``capped`` (non-admins): at most ``long_per_user`` of
        this user's jobs hold a slot at once, the others wait in ``__aenter__``."""
        return LongJob(self, user, capped)

    def _user_slots(self, user: str) -> _UserSlots:
        slots = self._users.get(user)
        if slots is None:
            slots = self._users[user] = _UserSlots(self.long_per_user)
        return slots

    def _forget_idle(self, user: str) -> None:
        slots = self._users.get(user)
        if slots is not None and not slots.holding and not slots.waiting:
            del self._users[user]

    def rows(self) -> list[list[str | None]]:
        """What ``workers`` shows: per pool (kind ``pool``) its threads, busy threads and
        queued calls; per user with long jobs (kind ``user``) its cap, jobs holding a slot
        and jobs waiting for one."""
        rows: list[list[str | None]] = [
            ["pool", p.name, str(p.threads), str(p.busy), str(p.queued)]
            for p in (self.short, self.long, self.wal)
        ]
        rows += [["user", name, str(self.long_per_user), str(s.holding), str(s.waiting)]
                 for name, s in sorted(self._users.items())]
        return rows

    async def idle(self, pool: Pool, timeout: float) -> bool:
        """Wait until ``pool`` runs and queues nothing (at most ``timeout`` seconds): what
        a stopping server does before it closes the repository under its threads."""
        deadline = asyncio.get_running_loop().time() + timeout
        while pool.submitted:
            if asyncio.get_running_loop().time() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    def shutdown(self, *, wait: bool = False) -> None:
        """Drop queued calls; ``wait``: and wait for the running ones to end (cancelled
        jobs end promptly), as a server does before it closes its repository."""
        for pool in (self.short, self.long, self.wal):
            pool.shutdown(wait=False, cancel_futures=True)
        if wait:
            for pool in (self.short, self.long, self.wal):
                pool.shutdown(wait=True)


WORKER_COLUMNS: Final = ["kind", "name", "size", "running", "waiting"]

_BY_SERVER: weakref.WeakKeyDictionary[object, Workers] = weakref.WeakKeyDictionary()


def workers_of(server: object) -> Workers:
    """The server's workers: its ``workers`` attribute if it has one, else one set made on
    first use and kept as long as the server object lives."""
    own = getattr(server, "workers", None)
    if isinstance(own, Workers):
        return own
    found = _BY_SERVER.get(server)
    if found is None:
        found = _BY_SERVER[server] = Workers()
    return found


def job_of(server: object, user: StoredUser) -> LongJob:
    """A long job of ``user`` on ``server``, capped unless the user is an admin."""
    return workers_of(server).long_job(user.name, capped=Role.parse(user.role) < Role.ADMIN)


def short(server: object) -> Pool:
    """The short pool of ``server``: ``await short(server).run(fn, ...)``."""
    return workers_of(server).short

