"""An S3 (or S3-compatible) context store: ``s3://bucket/prefix``.

Credentials come from boto3's default chain (env, profile, IRSA, instance role);
``Settings.s3_endpoint_url`` points it at MinIO, moto or another S3-compatible server.

The context is streamed into a multipart upload whose parts are sent from worker
threads while the caller keeps compressing, so memory holds a few parts at most and
nothing touches the disk.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, BinaryIO, cast
from urllib.parse import urlsplit

from config.errors import ConfigError, ContextStoreError
from config.names import classify_store_url
from workers.sdk_errors import BOTOCORE, Fault
from workers.stores.base import ContextStore
from workers.stores.errors import StoreErrors, Wording
from workers.stores.streaming import UPLOAD_THREADS, MappedReader, PartPipeline, buffered

if TYPE_CHECKING:
    from config.settings import Settings

log = logging.getLogger("buildq")

#: Size of a multipart part. S3 allows at most 10,000 parts, so parts grow past
#: ``PART_GROWTH`` parts (see ``s3_part_size``). S3's smallest: each part in flight is
#: held about twice (ours, and the request botocore builds from it), so memory stays
#: under a worker's 100 MB for any context; a request per 5 MiB is still cheap.
PART_SIZE = 5 << 20
#: Every this many parts, the part size grows by another PART_SIZE: 10,000 parts
#: then reach several hundred GB, far past any build context.
PART_GROWTH = 1000
#: Attempts per S3 request (botocore "standard" retries: 5xx, throttling, resets).
MAX_ATTEMPTS = 3


def s3_part_size(parts_sent: int) -> int:
    return PART_SIZE * (1 + parts_sent // PART_GROWTH)


#: IAM action each operation needs, named in AccessDenied errors.
_PERMISSION = {
    "write": "s3:PutObject",
    "read": "s3:GetObject",
    "exists": "s3:GetObject (and s3:ListBucket, without which a missing key reads as 403)",
    "delete": "s3:DeleteObject",
    "abort": "s3:ListBucketMultipartUploads and s3:AbortMultipartUpload",
}


class S3Store(ContextStore):
    def __init__(self, url: str, settings: Settings) -> None:
        super().__init__(url)
        parts = urlsplit(self.url)
        kind, _ = classify_store_url(self.url)
        if kind != "s3" or not parts.netloc:
            raise ConfigError(f"{url!r} is not an S3 store URL.", "Write it as s3://bucket/prefix.")
        self.bucket = parts.netloc
        self.prefix = parts.path.strip("/")
        self.endpoint_url = settings.s3_endpoint_url
        self._client: Any = None
        self._client_lock = threading.Lock()
        self._errors = StoreErrors(self, BOTOCORE, Wording(
            service="S3", endpoint=self.endpoint_url or "S3", container=f"the bucket {self.bucket!r}",
            credentials="AWS",
            credentials_hint="Give the worker credentials through boto3's default chain (environment, "
                             "profile, IRSA service account or instance role).",
            rejected=lambda code: f"the worker's AWS credentials ({code})",
            rejected_hint="Check the access key, session token and clock of the worker.",
            denied_hint=self._denied_hint,
        ))

    def _denied_hint(self, action: str) -> str:
        return (f"The worker's AWS identity needs {_PERMISSION[action]} on arn:aws:s3:::{self.bucket}/* "
                f"(and s3:ListBucket on arn:aws:s3:::{self.bucket}).")

    @property
    def client(self) -> Any:
        # Made on first use: importing boto3 and resolving credentials costs ~0.3 s,
        # which a process that only names the store should not pay.
        with self._client_lock:
            if self._client is None:
                import boto3
                from botocore.config import Config

                config = Config(
                    retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
                    connect_timeout=10, read_timeout=60,
                    max_pool_connections=max(10, UPLOAD_THREADS * 2),
                    # Custom endpoints (MinIO, moto) rarely have per-bucket DNS names.
                    s3={"addressing_style": "path"} if self.endpoint_url else None,
                )
                self._client = boto3.session.Session().client(
                    "s3", endpoint_url=self.endpoint_url, config=config)
            return self._client

    def _key(self, key: str) -> str:
        if not key or key.startswith("/"):
            raise ContextStoreError(f"invalid object key {key!r} for {self.url}.")
        return f"{self.prefix}/{key}" if self.prefix else key

    @contextlib.contextmanager
    def writer(self, key: str) -> Iterator[BinaryIO]:
        name = self._key(key)
        client = self.client
        upload_id: list[str] = []

        def start() -> None:
            with self._errors.mapped("write", key):
                upload_id.append(client.create_multipart_upload(Bucket=self.bucket, Key=name)["UploadId"])

        def send(number: int, part: bytes) -> dict[str, Any]:
            with self._errors.mapped("write", key):
                answer = client.upload_part(Bucket=self.bucket, Key=name, UploadId=upload_id[0],
                                            PartNumber=number, Body=part)
            return {"PartNumber": number, "ETag": answer["ETag"]}

        pipeline: PartPipeline[dict[str, Any]] = PartPipeline(send, s3_part_size, start)
        try:
            yield cast(BinaryIO, pipeline)
            parts, whole = pipeline.finish()
            with self._errors.mapped("write", key):
                if whole is not None:
                    # Small contexts (most of them) cost one request instead of three.
                    client.put_object(Bucket=self.bucket, Key=name, Body=whole)
                else:
                    client.complete_multipart_upload(Bucket=self.bucket, Key=name, UploadId=upload_id[0],
                                                     MultipartUpload={"Parts": parts})
        except BaseException:
            pipeline.abort()
            if upload_id:
                # Parts of an unfinished upload are stored (and billed) until aborted.
                with contextlib.suppress(Exception), self._errors.mapped("abort", key):
                    client.abort_multipart_upload(Bucket=self.bucket, Key=name, UploadId=upload_id[0])
            raise

    @contextlib.contextmanager
    def reader(self, key: str) -> Iterator[BinaryIO]:
        with self._errors.mapped("read", key):
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        raw = MappedReader(body.read, self._errors.mapper("read", key), body.close)
        with buffered(raw) as stream:
            yield stream

    def exists(self, key: str) -> bool:
        try:
            with self._errors.mapped("exists", key):
                self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ContextStoreError as exc:
            cause = exc.__cause__
            # HEAD answers carry no body, so a missing bucket is a bare 404 as well:
            # NoSuchBucket only shows up on the next write, with its own clear error.
            if isinstance(cause, Exception) and self._errors.fault(cause) is Fault.MISSING:
                return False
            raise
        return True

    def delete(self, key: str) -> None:
        """Remove the object and any unfinished multipart upload of its key.

        A writer aborts its own upload when it fails, but not when the store was unreachable
        at that moment (the link died mid-upload) or the writer was killed; the parts of such
        an upload are stored, and billed, until someone aborts it. The key's owner deletes it
        once done with it, which is when no upload of that key can still be running.
        """
        name = self._key(key)
        # DeleteObject of a missing key succeeds (204), which makes this idempotent.
        with self._errors.mapped("delete", key):
            self.client.delete_object(Bucket=self.bucket, Key=name)
        try:
            with self._errors.mapped("abort", key):
                listed = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=name)
                for upload in listed.get("Uploads") or []:
                    if upload.get("Key") == name:
                        self.client.abort_multipart_upload(Bucket=self.bucket, Key=name,
                                                           UploadId=upload["UploadId"])
        except ContextStoreError as exc:
            # The object is gone, which is what the caller asked; a bucket lifecycle rule
            # (AbortIncompleteMultipartUpload) still catches what this could not abort.
            log.warning("could not abort unfinished uploads of %s: %s %s", self.uri(key), exc.message,
                        exc.hint or "")
