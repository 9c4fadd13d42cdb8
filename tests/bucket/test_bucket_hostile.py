"""A bucket that lies, floods or stalls, against live pageservers: refused with a clear
error and nothing named, never a traceback or a hang, and other users are served
meanwhile (issue 13; DESIGN §12)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from tests.bucket.s3server import S3Server
from tests.fixtures import PageserverProc, free_port, started_pageservers


@pytest.fixture
def pushed(pageserver_factory, s3server: S3Server, aws_env: None  # type: ignore[no-untyped-def]
           ) -> tuple[PageserverProc, PageserverProc, str]:
    a, b = started_pageservers(pageserver_factory, "a", "b")
    bucket = s3server.new_bucket()
    for ps in (a, b):
        ps.cli("origin", "add", "backup", s3server.uri(bucket), check=True)
    a.cli("generate", "main", "--pages", "40", "--rounds", "2", check=True)
    a.cli("push", "main", "backup", check=True)
    a.cli("generate", "main", "--pages", "10", "--seed", "3", check=True)
    a.cli("push", "main", "backup", check=True)  # two segments
    return a, b, bucket


def _edit(s3server: S3Server, bucket: str, key: str, change: Callable[[dict], None]) -> None:  # type: ignore[type-arg]
    s3 = s3server.client()
    value = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    change(value)
    s3.put_object(Bucket=bucket, Key=key, Body=json.dumps(value).encode())


def _lie_hash(v: dict) -> None:  # type: ignore[type-arg]
    v["segments"][-1]["hash"] = "00" * 32


def _lie_count(v: dict) -> None:  # type: ignore[type-arg]
    v["segments"][-1]["records"] += 1


def _gap(v: dict) -> None:  # type: ignore[type-arg]
    del v["segments"][0]


def _ahead(v: dict) -> None:  # type: ignore[type-arg]
    v["lsn"] = "FF/0"


LIES = {
    "hash": ("index", _lie_hash, "history"),
    "count": ("index", _lie_count, "does not match what arrived"),
    "gap": ("index", _gap, "out of place"),
    "ref beyond the index": ("ref", _ahead, "outside what the index"),
}


def test_lying_bucket_refused(pushed: tuple[PageserverProc, PageserverProc, str],
                              s3server: S3Server) -> None:
    """Each lie in turn (the honest object put back after each): refused, nothing named."""
    a, b, bucket = pushed
    s3 = s3server.client()
    tid = a.branch("main")["timeline_id"]
    for lie, (what, change, says) in sorted(LIES.items()):
        key = f"team/timelines/{tid}/index.json" if what == "index" else "team/refs/main"
        honest = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        _edit(s3server, bucket, key, change)
        res = b.cli("pull", "main", "backup")
        assert res.returncode != 0 and says in res.stderr, (lie, res.stderr)
        assert "Traceback" not in res.stderr
        assert b.query("branch_list") == []
        s3.put_object(Bucket=bucket, Key=key, Body=honest)


def test_flooding_objects_refused_unread(pushed: tuple[PageserverProc, PageserverProc, str],
                                        s3server: S3Server) -> None:
    _, b, bucket = pushed
    s3 = s3server.client()
    s3.put_object(Bucket=bucket, Key="team/refs/huge", Body=b" " * (17 << 20))
    s3.put_object(Bucket=bucket, Key="team/refs/folder/", Body=b"")  # as S3 consoles make
    # that branch is refused unread; the others are usable; gc will not guess
    res = b.cli("pull", "huge", "backup")
    assert res.returncode != 0 and "at most" in res.stderr, res.stderr
    listed = b.cli("branch", "list", "--origin", "backup", check=True).stdout
    assert "main" in listed and "huge" not in listed
    res = b.cli("origin", "gc", "backup", "--prune", "now")
    assert res.returncode != 0 and "refs/huge is not a ref zenith reads" in res.stderr, \
        res.stderr
    s3.put_object(Bucket=bucket, Key="team/refs/huge", Body=b"{\"timeline\": [[[[")
    res = b.cli("pull", "huge", "backup")
    assert res.returncode != 0 and "not valid JSON" in res.stderr, res.stderr
    assert b.query("branch_list") == []
    b.cli("pull", "main", "backup", check=True)


@pytest.fixture
def stalling_endpoint() -> Iterator[str]:
    """An endpoint that accepts connections and never answers."""
    port = free_port()
    listener = socket.create_server(("127.0.0.1", port))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    listener.close()


def test_stalled_endpoint_bounded_and_others_served(
        pageserver_factory, aws_env: None, stalling_endpoint: str) -> None:  # type: ignore[no-untyped-def]
    ps = pageserver_factory(start=False)
    with ps.config.updating() as doc:
        doc["transfer_timeout"] = 1
    ps.start()
    ps.cli("origin", "add", "slow", f"s3://zenith-slow/p?endpoint={stalling_endpoint}",
           check=True)
    ps.cli("generate", "main", "--pages", "5", check=True)
    results: dict[str, object] = {}

    def push() -> None:
        started = time.monotonic()
        results["push"] = ps.cli("push", "main", "slow")
        results["seconds"] = time.monotonic() - started

    pusher = threading.Thread(target=push)
    pusher.start()
    time.sleep(0.5)
    quick = []
    while pusher.is_alive() and len(quick) < 5:  # meanwhile, others are answered at once
        t = time.monotonic()
        assert ps.query("branch_list")
        quick.append(time.monotonic() - t)
    pusher.join(60)
    res = results["push"]
    assert res.returncode != 0 and "cannot reach" in res.stderr, res.stderr  # type: ignore[attr-defined]
    assert "Traceback" not in res.stderr  # type: ignore[attr-defined]
    assert results["seconds"] < 20  # type: ignore[operator]
    assert quick and max(quick) < 1.0
