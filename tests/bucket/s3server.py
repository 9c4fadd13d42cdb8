"""A real S3 API server on loopback for the bucket tests: moto's server mode (its own
process, speaking HTTP as S3 does, with conditional writes), started once per session;
each test gets a bucket of its own."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fixtures import free_port

#: What the pageservers' AWS chain finds: the environment, and no file or instance role.
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "zenith-test",
    "AWS_SECRET_ACCESS_KEY": "zenith-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": "/nonexistent/zenith-test-aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/zenith-test-aws-credentials",
    "AWS_EC2_METADATA_DISABLED": "true",
}
_names = itertools.count()


@dataclass
class S3Server:
    endpoint: str
    proc: subprocess.Popen[bytes]

    def client(self):  # type: ignore[no-untyped-def]
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"])

    def new_bucket(self) -> str:
        name = f"zenith-test-{os.getpid()}-{next(_names)}"
        self.client().create_bucket(Bucket=name)
        return name

    def uri(self, bucket: str, prefix: str = "team") -> str:
        return f"s3://{bucket}/{prefix}?endpoint={self.endpoint}&addressing=path"


def _start(log: Path) -> S3Server:
    port = free_port()
    out = open(log, "wb")  # noqa: SIM115 (the server's lifetime)
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                             "-p", str(port)], stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1).close()
            return S3Server(endpoint, proc)
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto server did not start: {log.read_text()[-2000:]}"
                                   ) from None
            time.sleep(0.1)


@pytest.fixture(scope="session")
def s3server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = _start(tmp_path_factory.mktemp("moto") / "moto.log")
    try:
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.proc.pid, signal.SIGTERM)
        try:
            server.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait()


#: Installed by ``make install`` (npm): an S3 look-alike that ignores conditional writes.
S3RVER = Path(__file__).resolve().parents[2] / ".venv" / "node" / "node_modules" / ".bin" / "s3rver"


@pytest.fixture
def s3rver(tmp_path: Path) -> Iterator[str]:
    """s3rver on a free loopback port (its data in ``tmp_path``); its endpoint."""
    assert S3RVER.exists(), f"{S3RVER} missing: run make install"
    port = free_port()
    (tmp_path / "s3rver").mkdir()
    log = open(tmp_path / "s3rver.log", "wb")  # noqa: SIM115 (the server's lifetime)
    proc = subprocess.Popen([str(S3RVER), "-d", str(tmp_path / "s3rver"), "-a", "127.0.0.1",
                             "-p", str(port), "--silent"], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, \
                    (tmp_path / "s3rver.log").read_text()[-2000:]
                time.sleep(0.1)
        yield endpoint
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
        log.close()


#: The profile of the shared credentials file that s3rver's fixed keys are under.
S3RVER_PROFILE = "lookalike"


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The environment the CLI, and the pageservers it starts, run with: keys in the
    environment, and a shared credentials file with the profile ``lookalike``."""
    for k, v in AWS_ENV.items():
        monkeypatch.setenv(k, v)
    credentials = tmp_path / "aws-credentials"
    credentials.write_text(f"[{S3RVER_PROFILE}]\naws_access_key_id = S3RVER\n"
                           "aws_secret_access_key = S3RVER\n")
    credentials.chmod(0o600)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
