"""Shared helpers of the benchmarks: timing, machine description, results table."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")
MiB = 1024 * 1024


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, "
        f"Linux {platform.release()}, Python {platform.python_version()}"
    )


@dataclass
class Section:
    title: str
    method: str
    # (what, value, ratio to anchor, target)
    rows: list[tuple[str, str, str, str]] = field(default_factory=list)

    def add(self, what: str, value: str, ratio: str = "", target: str = "") -> None:
        self.rows.append((what, value, ratio, target))
        print(f"  {what}: {value} {ratio} {target}".rstrip(), flush=True)

    def markdown(self) -> str:
        lines = [f"## {self.title}", "", self.method, ""]
        lines += ["| measurement | value | ratio to anchor | target |", "|---|---|---|---|"]
        lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in self.rows]
        return "\n".join(lines) + "\n"
