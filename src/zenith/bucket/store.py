"""The S3 calls a bucket origin needs, on boto3 (blocking: callers run them in a thread).

boto3 was chosen by measurement against obstore (docs/s3.md, "Client"): both move data at
the loopback server's speed, but only boto3's low-level API resumes a multipart upload
(``ListMultipartUploads``/``ListParts``), and botocore resolves credentials the way every
AWS tool does (environment, shared config and credentials files, profiles, SSO, instance
roles), so zenith stores none. Conditional writes (``If-None-Match: *``, ``If-Match``)
make a ref or an index move only from the state its writer read.

Every failure becomes a :class:`ZenithError` naming the bucket, never a botocore traceback.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, Final

import google_crc32c

from zenith.errors import (
    AuthenticationFailed,
    ConnectionFailed,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    TransferAborted,
    ZenithError,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from zenith.bucket.layout import S3Location

#: Objects up to this size go up in one PUT (streamed from their file); larger ones (a
#: segment of one huge LSN, such as a base-backup import) as a multipart upload of
#: PART_SIZE parts, which a new push resumes (the parts already uploaded are kept).
SINGLE_PUT_MAX: Final = 64 << 20
PART_SIZE: Final = 16 << 20
CHUNK: Final = 1 << 20
CONNECT_TIMEOUT: Final = 10.0
READ_TIMEOUT: Final = 60.0
ATTEMPTS: Final = 3


class Conflict(ZenithError):
    """A conditional write found the object changed (or present) since it was read."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    mtime: float  # seconds since the epoch


class Bucket:
    """One origin's bucket and prefix. Keys given to its methods are relative to the
    prefix."""

    def __init__(self, loc: S3Location, *, timeout: float = READ_TIMEOUT) -> None:
        """``timeout``: seconds the server may stay silent (connecting, or mid-answer)
        before a call fails; a failed call is tried at most ATTEMPTS times."""
        import boto3
        import botocore.config
        import botocore.exceptions

        self.loc = loc
        self._exc = botocore.exceptions
        try:
            session = boto3.session.Session(profile_name=loc.profile)
        except botocore.exceptions.ProfileNotFound:
            raise InvalidArgument(f"no AWS profile {loc.profile!r:.60} in the shared config "
                                  "or credentials file") from None
        config = botocore.config.Config(
            s3={"addressing_style": loc.addressing},  # type: ignore[arg-type]
            connect_timeout=min(CONNECT_TIMEOUT, timeout), read_timeout=timeout,
            retries={"max_attempts": ATTEMPTS, "mode": "standard"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        region = loc.region or session.region_name or "us-east-1"
        self.client: S3Client = session.client(
            "s3", endpoint_url=loc.endpoint, region_name=region, config=config)
        self.where = f"s3://{loc.bucket}/{loc.prefix}"

    # -- errors ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _calling(self, what: str, *, conditional: bool = False) -> Iterator[None]:
        exc = self._exc
        try:
            yield
        except ZenithError:
            raise
        except (exc.NoCredentialsError, exc.PartialCredentialsError,
                exc.CredentialRetrievalError) as e:
            raise AuthenticationFailed(
                f"{self.where}: no usable AWS credentials ({e})",
                hint="set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the pageserver's "
                     "environment, or give it a shared credentials file (?profile=NAME)",
            ) from None
        except (exc.EndpointConnectionError, exc.ConnectTimeoutError,
                exc.ConnectionClosedError, exc.ReadTimeoutError) as e:
            raise ConnectionFailed(f"cannot reach {self.where}: {e}") from None
        except exc.ClientError as e:
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            message = str(err.get("Message", ""))[:200]
            if code in ("PreconditionFailed", "ConditionalRequestConflict") \
                    or status in (409, 412) or (conditional and code == "NoSuchKey"):
                raise Conflict(f"{self.where}: {what}: changed meanwhile") from None
            if code == "NoSuchBucket":
                raise NotFound(f"bucket {self.loc.bucket} does not exist",
                               hint="create it first (zenith does not create buckets)") \
                    from None
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise AuthenticationFailed(f"{self.where}: {what}: {code}: {message}") \
                    from None
            if code == "AccessDenied" or status == 403:
                raise PermissionDenied(f"{self.where}: {what}: access denied") from None
            raise ConnectionFailed(f"{self.where}: {what}: {code or status}: {message}") \
                from None
        except exc.BotoCoreError as e:
            raise ConnectionFailed(f"{self.where}: {what}: {e}") from None

    def _missing(self, e: Any) -> bool:
        err = e.response.get("Error", {})
        return str(err.get("Code")) in ("NoSuchKey", "404", "NotFound") \
            and str(err.get("Code")) != "NoSuchBucket"

    # -- small objects ----------------------------------------------------------------------

    def get(self, key: str, limit: int) -> tuple[bytes, str] | None:
        """The object and its ETag; None when absent. Larger than ``limit``: refused."""
        with self._calling(f"read {key}"):
            try:
                r = self.client.get_object(Bucket=self.loc.bucket, Key=self.loc.key(key))
            except self._exc.ClientError as e:
                if self._missing(e):
                    return None
                raise
            if r["ContentLength"] > limit:
                r["Body"].close()
                raise TransferAborted(f"{self.where}{key} is {r['ContentLength']} bytes; "
                                      f"at most {limit} expected")
            return r["Body"].read(), r["ETag"]

    def put(self, key: str, data: bytes, *, if_match: str | None = None,
            create: bool = False, metadata: dict[str, str] | None = None) -> str:
        """Write ``data``; ``create``: only if absent (``If-None-Match: *``); ``if_match``:
        only if the object's ETag is still this. Raises :class:`Conflict` otherwise."""
        extra: dict[str, Any] = {}
        if create:
            extra["IfNoneMatch"] = "*"
        if if_match is not None:
            extra["IfMatch"] = if_match
        if metadata:
            extra["Metadata"] = metadata
        with self._calling(f"write {key}", conditional=if_match is not None):
            r = self.client.put_object(Bucket=self.loc.bucket, Key=self.loc.key(key),
                                       Body=data, **extra)
            return r["ETag"]

    def head(self, key: str) -> tuple[int, dict[str, str]] | None:
        """Size and user metadata of an object; None when absent."""
        found = self.stat(key)
        return None if found is None else (found[0], found[1])

    def stat(self, key: str) -> tuple[int, dict[str, str], float] | None:
        """Size, user metadata and modification time of an object; None when absent."""
        with self._calling(f"look up {key}"):
            try:
                r = self.client.head_object(Bucket=self.loc.bucket, Key=self.loc.key(key))
            except self._exc.ClientError as e:
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if status == 404:
                    return None
                raise
            return (r["ContentLength"], dict(r.get("Metadata", {})),
                    r["LastModified"].timestamp())

    def unfinished_uploads(self, prefix: str) -> list[tuple[str, str, float]]:
        """Multipart uploads under ``prefix`` never completed: key, id, start time."""
        with self._calling(f"list uploads under {prefix}"):
            found = []
            pages = self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.loc.bucket, Prefix=self.loc.key(prefix))
            strip = len(self.loc.prefix)
            for page in pages:
                for u in page.get("Uploads", []):
                    found.append((u["Key"][strip:], u["UploadId"], u["Initiated"].timestamp()))
            return found

    def abort_upload(self, key: str, upload_id: str) -> None:
        with self._calling(f"abort the upload of {key}"):
            self.client.abort_multipart_upload(Bucket=self.loc.bucket, Key=self.loc.key(key),
                                               UploadId=upload_id)

    def list_objects(self, prefix: str) -> Iterator[ObjectInfo]:
        with self._calling(f"list {prefix}"):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.loc.bucket, Prefix=self.loc.key(prefix))
            strip = len(self.loc.prefix)
            for page in pages:
                for o in page.get("Contents", []):
                    yield ObjectInfo(o["Key"][strip:], o["Size"],
                                     o["LastModified"].timestamp())

    def delete(self, keys: list[str]) -> list[str]:
        """Delete ``keys``; those the server did not delete."""
        failed: list[str] = []
        strip = len(self.loc.prefix)
        with self._calling("delete objects"):
            for i in range(0, len(keys), 1000):
                r = self.client.delete_objects(Bucket=self.loc.bucket, Delete={
                    "Objects": [{"Key": self.loc.key(k)} for k in keys[i:i + 1000]],
                    "Quiet": True})
                failed += [e["Key"][strip:] for e in r.get("Errors", []) if "Key" in e]
        return failed

    # -- segments -------------------------------------------------------------------------

    def upload(self, key: str, path: str, metadata: dict[str, str],
               progress: Callable[[int], None] | None = None) -> int:
        """Upload the file at ``path`` as ``key`` unless it is there already with the same
        size and ``crc32c`` metadata (segments are immutable); large files as a multipart
        upload that a later call resumes. Returns the bytes sent."""
        size = os.path.getsize(path)
        with self._calling(f"upload {key}"):
            there = self.head(key)
            if there is not None and there[0] == size \
                    and there[1].get("crc32c") == metadata.get("crc32c"):
                return 0
            if size <= SINGLE_PUT_MAX:
                with open(path, "rb") as f:
                    self.client.put_object(Bucket=self.loc.bucket, Key=self.loc.key(key),
                                           Body=f, Metadata=metadata)
                if progress is not None:
                    progress(size)
                return size
            return self._multipart(key, path, size, metadata, progress)

    def _multipart(self, key: str, path: str, size: int, metadata: dict[str, str],
                   progress: Callable[[int], None] | None) -> int:
        full = self.loc.key(key)
        upload_id, done = self._resumable(full, metadata)
        parts = []
        sent = 0
        with open(path, "rb") as f:
            for number, offset in enumerate(range(0, size, PART_SIZE), start=1):
                length = min(PART_SIZE, size - offset)
                f.seek(offset)
                body = f.read(length)
                etag = done.get((number, length))
                # A part left by an earlier upload of this key is reused only if it holds
                # these very bytes (an unencrypted part's ETag is the MD5 of its bytes).
                if etag is None or etag.strip('"') != hashlib.md5(body).hexdigest():
                    etag = self.client.upload_part(
                        Bucket=self.loc.bucket, Key=full, UploadId=upload_id,
                        PartNumber=number, Body=body)["ETag"]
                    sent += length
                if progress is not None:
                    progress(length)
                parts.append({"PartNumber": number, "ETag": etag})
        self.client.complete_multipart_upload(
            Bucket=self.loc.bucket, Key=full, UploadId=upload_id,
            MultipartUpload={"Parts": parts})  # type: ignore[typeddict-item]
        return sent

    def _resumable(self, full: str, metadata: dict[str, str]
                   ) -> tuple[str, dict[tuple[int, int], str]]:
        """An unfinished multipart upload of ``full`` (a killed push's) and its parts, or a
        new one. Its parts are checked before reuse (:meth:`_multipart`)."""
        uploads = self.client.list_multipart_uploads(
            Bucket=self.loc.bucket, Prefix=full).get("Uploads", [])
        for u in sorted(uploads, key=lambda u: u["Initiated"], reverse=True):
            if u["Key"] != full:
                continue
            parts: dict[tuple[int, int], str] = {}
            pages = self.client.get_paginator("list_parts").paginate(
                Bucket=self.loc.bucket, Key=full, UploadId=u["UploadId"])
            for page in pages:
                for p in page.get("Parts", []):
                    parts[(p["PartNumber"], p["Size"])] = p["ETag"]
            return u["UploadId"], parts
        r = self.client.create_multipart_upload(Bucket=self.loc.bucket, Key=full,
                                                Metadata=metadata)
        return r["UploadId"], {}

    def download(self, key: str, out: BinaryIO, size: int) -> int:
        """Copy the object into ``out``, refusing one of another size than ``size`` (the
        index says); returns its CRC32C."""
        crc = 0
        with self._calling(f"read {key}"):
            try:
                r = self.client.get_object(Bucket=self.loc.bucket, Key=self.loc.key(key))
            except self._exc.ClientError as e:
                if self._missing(e):
                    raise TransferAborted(f"{self.where}{key} is missing") from None
                raise
            if r["ContentLength"] != size:
                r["Body"].close()
                raise TransferAborted(f"{self.where}{key} is {r['ContentLength']} bytes; "
                                      f"its index says {size}")
            body = r["Body"]
            got = 0
            while chunk := body.read(CHUNK):
                got += len(chunk)
                if got > size:
                    raise TransferAborted(f"{self.where}{key} is longer than its index says")
                crc = google_crc32c.extend(crc, chunk)
                out.write(chunk)
            if got != size:
                raise TransferAborted(f"{self.where}{key} ended after {got} of {size} bytes")
        return crc
