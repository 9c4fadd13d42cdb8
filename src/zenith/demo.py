"""``make demo``: a guided run of zenith on embedded defaults, in a temporary directory.

Three real pageserver processes on free loopback ports (a laptop, a cloud, a colleague),
driven by the real ``zenith`` command as a user would: the cloud speaks TLS with its own
CA (``init --tls``) and signs the others in by client certificate (mutual TLS, no
password); generate history, push it, push
more, branch and push the branch, pull into a third repository, write a received branch
(it forks a timeline of its own), see a diverged push refused and forced, and compare
digests on both sides. Every step and its output is printed; every
process the demo started is stopped, even on failure.
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


class DemoFailed(SystemExit):
    pass


class Node:
    """One repository and its pageserver, named as in the story."""

    def __init__(self, base: Path, name: str) -> None:
        self.name = name
        self.repo = base / name
        self.port = _free_port()
        self.started = False

    def zenith(self, *args: str, input: str | None = None, expect_fail: bool = False) -> str:
        shown = "zenith " + " ".join(shlex.quote(a) for a in args)
        print(f"[{self.name}]$ {shown}", flush=True)
        proc = subprocess.run(
            [sys.executable, "-m", "zenith.cli", "-D", str(self.repo), *args],
            input=input, capture_output=True, text=True, timeout=600,
        )
        for line in (proc.stdout + proc.stderr).splitlines():
            print(f"    {line}")
        if (proc.returncode != 0) != expect_fail:
            raise DemoFailed(f"demo failed: `{shown}` exited with {proc.returncode}")
        return proc.stdout

    def up(self, *, cert_port: int | None = None) -> None:
        """``init`` and ``start``; with ``cert_port``, TLS (``init --tls``) and a second
        address where users sign in with client certificates (``auth_method = cert``)."""
        if cert_port is None:
            self.zenith("init", "--listen", f"127.0.0.1:{self.port}")
        else:
            self.zenith("init", "--listen", f"127.0.0.1:{self.port}", "--tls")
            listener = (f'\n[[listeners]]\nlisten = "127.0.0.1:{cert_port}"\n'
                        'auth_method = "cert"\n')
            print(f"[{self.name}]$ cat >> config.toml{listener}".replace("\n", "\n    "))
            with open(self.repo / "config.toml", "a", encoding="utf-8") as f:
                f.write(listener)
        self.zenith("start")
        self.started = True

    def cert_uri(self, cert_port: int, user: str, certs: Path) -> str:
        """An origin URI for ``user`` with the client certificate ``zenith tls client-cert``
        made: verify-full against this node's CA, no password."""
        return (f"postgresql://{user}@127.0.0.1:{cert_port}/zenith?sslrootcert="
                f"{self.repo / 'tls' / 'ca.crt'}&sslcert={certs / (user + '.crt')}"
                f"&sslkey={certs / (user + '.key')}")

    def digest(self, target: str) -> str:
        return self.zenith("digest", target).split()[0]


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def same(what: str, a: str, b: str) -> None:
    print(f"    {what}: {'equal' if a == b else 'DIFFERENT'} ({a[:16]}...)")
    if a != b:
        raise DemoFailed(f"demo failed: {what} differ")


def run(base: Path) -> None:
    laptop, cloud, colleague = Node(base, "laptop"), Node(base, "cloud"), Node(base, "colleague")
    nodes = (laptop, cloud, colleague)
    try:
        step("Three pageservers, each with its own repository, on free loopback ports; "
             "the cloud speaks TLS and signs users in by client certificate")
        cert_port = _free_port()
        laptop.up()
        colleague.up()
        cloud.up(cert_port=cert_port)
        certs = base / "certs"
        for user in ("laptop", "colleague"):
            cloud.zenith("user", "add", user, "--role", "push", "--no-password")
            cloud.zenith("tls", "client-cert", user, "--out", str(certs))

        step("Origins over mutual TLS: each side checks the other's certificate; "
             "no password anywhere")
        laptop.zenith("origin", "add", "cloud", cloud.cert_uri(cert_port, "laptop", certs))
        colleague.zenith("origin", "add", "cloud",
                         cloud.cert_uri(cert_port, "colleague", certs))
        laptop.zenith("origin", "list")

        step("History on the laptop: 2,000 pages of 8 KiB, rewritten in 2 rounds")
        laptop.zenith("generate", "main", "--pages", "2000", "--rounds", "2", "--seed", "42")

        step("Push it: the cloud gets the same timeline (same id), every record")
        laptop.zenith("push", "main", "cloud")
        same("digest of main, laptop vs cloud", laptop.digest("main"), cloud.digest("main"))

        step("More history, pushed incrementally: only the new records travel")
        laptop.zenith("generate", "main", "--pages", "100", "--seed", "43")
        laptop.zenith("push", "main", "cloud")
        laptop.zenith("push", "main", "cloud")
        same("digest of main, laptop vs cloud", laptop.digest("main"), cloud.digest("main"))

        step("A branch of main, pushed: only the branch's own records travel")
        laptop.zenith("branch", "create", "dev", "--from", "main")
        laptop.zenith("generate", "dev", "--pages", "25", "--seed", "44")
        laptop.zenith("push", "dev", "cloud")
        cloud.zenith("branch", "list")

        step("A colleague pulls dev from the cloud into a third repository")
        colleague.zenith("pull", "dev", "cloud")
        colleague.zenith("branch", "list")
        same("digest of dev, laptop vs colleague", laptop.digest("dev"), colleague.digest("dev"))

        step("The colleague moves main on the cloud; the laptop's push is rejected")
        colleague.zenith("pull", "main", "cloud")
        # main came from the cloud: the colleague's history goes on a timeline of its own.
        colleague.zenith("generate", "main", "--pages", "10", "--seed", "45")
        colleague.zenith("branch", "list")
        colleague.zenith("push", "main", "cloud")
        laptop.zenith("push", "main", "cloud", expect_fail=True)
        laptop.zenith("pull", "main", "cloud")
        same("digest of main, laptop vs cloud", laptop.digest("main"), cloud.digest("main"))

        step("Both write main (each on a timeline of its own): the second push is refused "
             "as diverged, nothing is grafted; it goes to a branch of its own")
        laptop.zenith("generate", "main", "--pages", "8", "--seed", "47")
        colleague.zenith("generate", "main", "--pages", "8", "--seed", "48")
        colleague.zenith("push", "main", "cloud")
        laptop.zenith("push", "main", "cloud", expect_fail=True)
        laptop.zenith("push", "main", "cloud:laptop-main")
        same("digest of cloud:main vs colleague main", colleague.digest("main"),
             cloud.digest("main"))
        same("digest of cloud:laptop-main vs laptop main", laptop.digest("main"),
             cloud.digest("laptop-main"))

        step("Diverged histories: rejected, then --force repoints the name (data kept)")
        laptop.zenith("generate", "scratch", "--pages", "5", "--seed", "46")
        laptop.zenith("push", "scratch", "cloud:dev", expect_fail=True)
        laptop.zenith("push", "scratch", "cloud:dev", "--force")
        same("digest of cloud:dev vs laptop scratch", laptop.digest("scratch"),
             cloud.digest("dev"))
        cloud.zenith("branch", "list")
    finally:
        step("Stopping what the demo started")
        for node in nodes:
            if node.started:
                node.zenith("stop")
    print("\ndemo finished: every step above ran against real pageserver processes.")


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="zenith-demo-") as d:
        run(Path(d))


if __name__ == "__main__":
    main()
