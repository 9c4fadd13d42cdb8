"""``make demo``: a guided run of zenith on embedded defaults, in a temporary directory.

It drives the real ``zenith`` command against a real pageserver process on a free loopback
port, prints each step and its output, and stops everything it started, even on failure.
"""

from __future__ import annotations

import shlex
import socket
import subprocess
import sys
import tempfile
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Demo:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.repo = base / "laptop"

    def step(self, title: str) -> None:
        print(f"\n== {title}", flush=True)

    def zenith(self, *args: str, input: str | None = None) -> str:
        shown = "zenith " + " ".join(shlex.quote(a) for a in args)
        print(f"$ {shown}", flush=True)
        proc = subprocess.run(
            [sys.executable, "-m", "zenith.cli", "-D", str(self.repo), *args],
            input=input, capture_output=True, text=True, timeout=600,
        )
        for line in (proc.stdout + proc.stderr).splitlines():
            print(f"  {line}")
        if proc.returncode != 0:
            raise SystemExit(f"demo failed: `{shown}` exited with {proc.returncode}")
        return proc.stdout

    def run(self) -> None:
        port = _free_port()
        self.step(f"A repository and its pageserver on 127.0.0.1:{port}")
        self.zenith("init", "--listen", f"127.0.0.1:{port}")
        self.zenith("start")
        try:
            self.step("Synthetic page history: 2,000 pages of 8 KiB, rewritten in 3 rounds")
            self.zenith("generate", "main", "--pages", "2000", "--rounds", "3", "--seed", "42")
            out = self.zenith("branch", "list")
            main_lsn = out.splitlines()[1].split()[-1]
            mid = self.zenith("digest", "main").split()[0]

            self.step("A branch of main as of now; main and the branch then move on apart")
            self.zenith("branch", "create", "dev", "--from", f"main@{main_lsn}")
            self.zenith("generate", "dev", "--pages", "100", "--seed", "7")
            self.zenith("generate", "main", "--pages", "50", "--seed", "8")
            self.zenith("branch", "list")

            self.step("Digests: dev at its branch point equals main at that point")
            at_branch = self.zenith("digest", f"dev@{main_lsn}").split()[0]
            now = self.zenith("digest", "dev").split()[0]
            print(f"  main@{main_lsn} == dev@{main_lsn}: {at_branch == mid}")
            print(f"  dev has moved on since: {now != mid}")
            if at_branch != mid or now == mid:
                raise SystemExit("demo failed: digests do not tell the histories apart")

            self.step("Users: a read-only user (it may read and pull, not write)")
            self.zenith("user", "add", "reader", "--role", "read", "--password-stdin",
                        input="reader-password\n")
            self.zenith("user", "list")
            self.zenith("status")
        finally:
            self.step("Stopping what the demo started")
            self.zenith("stop")
        print("\ndemo finished: every step above ran against a real pageserver process.")


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="zenith-demo-") as d:
        Demo(Path(d)).run()


if __name__ == "__main__":
    main()
