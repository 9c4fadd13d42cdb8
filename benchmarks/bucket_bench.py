"""Issue 13's benchmark: push and pull of a synthetic branch through an S3-compatible bucket
(moto's server on loopback), against uploading and downloading the same number of bytes as
one object with the same client library (boto3: one PUT streamed from a file, one GET) to
the same server: the endpoint's own limit."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from tests.bucket.s3server import AWS_ENV, _start
from tests.fixtures import make_pageserver

from benchmarks.common import MiB, Section, timed
from benchmarks.transfer_bench import _peak_rss, _restart, _timed_cli
from zenith.bucket.layout import parse_s3_uri
from zenith.bucket.store import Bucket

PAGE = 8192


def _bucket_bytes(server_client, bucket: str) -> int:  # type: ignore[no-untyped-def]
    total = 0
    for page in server_client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        total += sum(o["Size"] for o in page.get("Contents", []) if o["Key"].endswith(".zseg"))
    return total


def run(total_bytes: int = 1 << 30) -> Section:
    pages = total_bytes // PAGE
    changed = max(1, pages // 100)
    section = Section(
        "Push and pull through a bucket (issue 13)",
        f"A synthetic branch of {pages:,} pages of 8 KiB ({pages * PAGE / MiB:.0f} MiB, random "
        "contents) pushed with `zenith push` to a bucket origin on moto's S3 server (its own "
        "process, loopback), 1% of its pages rewritten and pushed again, then pulled into "
        "another pageserver. Anchor: the same number of bytes uploaded and downloaded as one "
        "object with the same client library to the same server (boto3: one PUT streamed "
        "from a file; zenith's `Bucket.download`), in the same run. Ratios are "
        "rates: anchor seconds / transfer seconds (the transfer's own duration, as the "
        "pageserver reports it). Peak RSS is the pageserver's VmHWM, restarted just before.",
    )
    os.environ.update(AWS_ENV)
    with tempfile.TemporaryDirectory(prefix="zenith-bench-") as d:
        s3 = _start(Path(d) / "moto.log")
        laptop = make_pageserver(Path(d) / "laptop")
        third = make_pageserver(Path(d) / "third")
        try:
            bucket = s3.new_bucket()
            uri = s3.uri(bucket)
            for ps in (laptop, third):
                ps.start()
                ps.cli("origin", "add", "backup", uri, check=True)
            laptop.cli("generate", "main", "--pages", str(pages), check=True, timeout=3600)
            _restart(laptop)
            _, push = _timed_cli(laptop, "push", "main", "backup")
            rss_push = _peak_rss(laptop)
            stored = _bucket_bytes(s3.client(), bucket)
            laptop.cli("generate", "main", "--pages", str(changed), "--seed", "5", check=True)
            _, inc_push = _timed_cli(laptop, "push", "main", "backup")
            _restart(third)
            _, pull = _timed_cli(third, "pull", "main", "backup")
            rss_pull = _peak_rss(third)
            assert third.digest("main") == laptop.digest("main")
            index = s3.client().get_object(
                Bucket=bucket, Key=f"team/timelines/{laptop.branch('main')['timeline_id']}"
                                   "/index.json")
            segments = len(json.loads(index["Body"].read())["segments"])

            # the anchor: as many bytes, one object, the same library and server
            blob = Path(d) / "blob"
            with open(blob, "wb") as f:
                for _ in range(0, stored, 1 << 24):
                    f.write(os.urandom(min(1 << 24, stored - f.tell())))
            one = Bucket(parse_s3_uri(s3.uri(bucket, "anchor")))

            def upload() -> None:
                with open(blob, "rb") as f:  # one PUT, streamed from the file
                    one.client.put_object(Bucket=bucket, Key="anchor/blob", Body=f)

            _, up = timed(upload)
            with open(Path(d) / "back", "wb") as f:
                _, down = timed(lambda: one.download("blob", f, stored))
        finally:
            for ps in (laptop, third):
                ps.stop()
            s3.proc.kill()
            s3.proc.wait()
    mib = stored / MiB
    section.add(f"upload of {mib:.0f} MiB as one object (anchor)",
                f"{up:.2f} s ({mib / up:.0f} MiB/s)", "1.00")
    section.add(f"full push, {pages * PAGE / MiB:.0f} MiB of pages as {mib:.0f} MiB in "
                f"{segments} segments", f"{push:.2f} s ({mib / push:.0f} MiB/s)",
                f"{up / push:.2f}", ">= 0.8")
    section.add("incremental push, 1% of pages", f"{inc_push:.2f} s",
                f"{inc_push / push:.3f} of full push", "<= 0.05")
    section.add("peak RSS of the pushing pageserver", f"{rss_push:.0f} MiB", "", "< 200 MiB")
    section.add(f"download of {mib:.0f} MiB as one object (anchor)",
                f"{down:.2f} s ({mib / down:.0f} MiB/s)", "1.00")
    section.add("full pull into a new pageserver", f"{pull:.2f} s ({mib / pull:.0f} MiB/s)",
                f"{down / pull:.2f}", ">= 0.8")
    section.add("peak RSS of the pulling pageserver", f"{rss_pull:.0f} MiB", "", "< 200 MiB")
    return section


if __name__ == "__main__":
    import sys

    run(int(sys.argv[1]) if len(sys.argv) > 1 else 1 << 30)
