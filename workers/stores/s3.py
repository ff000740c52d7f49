"""An S3 (or S3-compatible) context store: ``s3://bucket/prefix``.

Credentials come from boto3's default chain (env, profile, IRSA, instance role);
``Settings.s3_endpoint_url`` points it at MinIO, moto or another S3-compatible server.

The context is streamed into a multipart upload whose parts are sent from worker
threads while the caller keeps compressing, so memory holds a few parts at most and
nothing touches the disk. The two stream helpers here (``PartPipeline`` and
``MappedReader``) are generic and also used by the GCS and Azure stores.
"""

from __future__ import annotations

import contextlib
import io
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, BinaryIO, Generic, TypeVar, cast
from urllib.parse import urlsplit

from config.errors import ConfigError, ContextStoreError, TransientContextStoreError
from workers.stores.base import ContextStore

if TYPE_CHECKING:
    from config.settings import Settings

T = TypeVar("T")

#: Size of a multipart part. S3 allows at most 10,000 parts, so parts grow past
#: ``PART_GROWTH`` parts (see ``s3_part_size``); 8 MiB keeps memory small for the
#: common case while a request per part is still cheap.
PART_SIZE = 8 << 20
#: Every this many parts, the part size grows by another PART_SIZE: 10,000 parts
#: then reach several hundred GB, far past any build context.
PART_GROWTH = 1000
#: Parts uploading or queued at once: bounds memory to about (IN_FLIGHT + 1) parts.
IN_FLIGHT = 4
#: Threads sending parts. Two overlap network latency with the caller's compression
#: without competing with it for the CPU on small hosts.
UPLOAD_THREADS = 2
#: Attempts per S3 request (botocore "standard" retries: 5xx, throttling, resets).
MAX_ATTEMPTS = 3


# --- generic stream helpers ------------------------------------------------------------


class PartPipeline(io.RawIOBase, Generic[T]):
    """A writable stream cut into parts, each handed to ``send`` on a worker thread.

    ``write`` accepts any number of calls of any size. A full part is queued for
    sending; when ``in_flight`` parts are already queued or sending, ``write`` blocks,
    which is what bounds memory. A failed send is re-raised by the next ``write`` or by
    ``finish``. ``start`` runs once, before the first part is sent (e.g. to create the
    multipart upload), so an object that fits in one part never starts one: ``finish``
    hands that single part back instead.
    """

    def __init__(self, send: Callable[[int, bytes], T], part_size: Callable[[int], int],
                 start: Callable[[], None] | None = None, threads: int = UPLOAD_THREADS,
                 in_flight: int = IN_FLIGHT) -> None:
        super().__init__()
        self._send = send
        self._part_size = part_size
        self._start = start
        self._threads = threads
        self._slots = threading.BoundedSemaphore(in_flight)
        self._pool: ThreadPoolExecutor | None = None
        self._futures: list[Future[T]] = []
        self._buffer = bytearray()
        self._failure: BaseException | None = None
        self.size = 0

    @property
    def started(self) -> bool:
        return self._pool is not None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._raise_failure()
        view = memoryview(data).cast("B")
        self._buffer += view
        self.size += len(view)
        while len(self._buffer) >= self._part_size(len(self._futures)):
            size = self._part_size(len(self._futures))
            with memoryview(self._buffer) as whole:
                part = bytes(whole[:size])  # one copy (a bytearray slice would make two)
            del self._buffer[:size]
            self._submit(part)
        return len(view)

    def _submit(self, part: bytes) -> None:
        if self._pool is None:
            if self._start is not None:
                self._start()
            self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="store-part")
        self._slots.acquire()
        if self._failure is not None:
            self._slots.release()
            raise self._failure
        number = len(self._futures) + 1
        try:
            future = self._pool.submit(self._send, number, part)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(self._done)
        self._futures.append(future)

    def _done(self, future: Future[T]) -> None:
        if not future.cancelled() and future.exception() is not None and self._failure is None:
            self._failure = future.exception()
        self._slots.release()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    def finish(self) -> tuple[list[T], bytes | None]:
        """Send what is left and wait: (results of every part in order, None); or, when
        no part was ever started, ([], the whole object) for a single-request upload."""
        self._raise_failure()
        if self._pool is None:
            data = bytes(self._buffer)
            self._buffer.clear()
            return [], data
        if self._buffer:
            part = bytes(self._buffer)
            self._buffer.clear()
            self._submit(part)
        try:
            results = [f.result() for f in self._futures]
        finally:
            self._pool.shutdown(wait=True)
        return results, None

    def abort(self) -> None:
        """Drop queued parts and wait for the ones being sent, so none lands afterwards."""
        self._buffer.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


class MappedReader(io.RawIOBase):
    """A readable stream over ``read(n)`` whose library errors are mapped to ours."""

    def __init__(self, read: Callable[[int], bytes], mapper: Callable[[Exception], Exception],
                 on_close: Callable[[], None] | None = None) -> None:
        super().__init__()
        self._read = read
        self._map = mapper
        self._on_close = on_close

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        try:
            data = self._read(len(view))
        except ContextStoreError:
            raise
        except Exception as exc:
            raise self._map(exc) from exc
        view[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed and self._on_close is not None:
            with contextlib.suppress(Exception):
                self._on_close()
        super().close()


def buffered(raw: io.RawIOBase) -> BinaryIO:
    return cast(BinaryIO, io.BufferedReader(raw, 1 << 20))


# --- S3 ------------------------------------------------------------------------------


def s3_part_size(parts_sent: int) -> int:
    return PART_SIZE * (1 + parts_sent // PART_GROWTH)


#: IAM action each operation needs, named in AccessDenied errors.
_PERMISSION = {
    "write": "s3:PutObject",
    "read": "s3:GetObject",
    "exists": "s3:GetObject (and s3:ListBucket, without which a missing key reads as 403)",
    "delete": "s3:DeleteObject",
    "abort": "s3:AbortMultipartUpload",
}
_TRANSIENT_CODES = {"SlowDown", "RequestTimeout", "RequestTimeTooSkewed", "InternalError",
                    "ServiceUnavailable", "Throttling", "ThrottlingException", "503", "500"}
_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                     "InvalidToken", "TokenRefreshRequired"}


class S3Store(ContextStore):
    def __init__(self, url: str, settings: Settings) -> None:
        super().__init__(url)
        parts = urlsplit(self.url)
        if parts.scheme != "s3" or not parts.netloc:
            raise ConfigError(f"{url!r} is not an S3 store URL.", "Write it as s3://bucket/prefix.")
        self.bucket = parts.netloc
        self.prefix = parts.path.strip("/")
        self.endpoint_url = settings.s3_endpoint_url
        self._client: Any = None
        self._client_lock = threading.Lock()

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

    def _error(self, exc: Exception, action: str, key: str) -> ContextStoreError:
        """Our error for a boto3 failure; never carries credentials (botocore's messages don't)."""
        from botocore.exceptions import (
            ClientError,
            ConnectionError,
            HTTPClientError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        where = self.uri(key)
        if isinstance(exc, ConnectionError | HTTPClientError):
            endpoint = self.endpoint_url or "S3"
            return TransientContextStoreError(f"cannot reach {endpoint} to {action} {where}: {exc}.")
        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            return ContextStoreError(
                f"no AWS credentials to {action} {where}.",
                "Give the worker credentials through boto3's default chain (environment, "
                "profile, IRSA service account or instance role).")
        if not isinstance(exc, ClientError):
            return ContextStoreError(f"cannot {action} {where}: {exc}.")
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if code in _TRANSIENT_CODES or status >= 500 or status == 429:
            return TransientContextStoreError(f"S3 answered {code or status} to {action} {where}.")
        if code == "NoSuchBucket":
            return ContextStoreError(f"the bucket {self.bucket!r} of context store {self.url} "
                                     "does not exist.",
                                     "Create it, or fix build-context-store in the launch-config.")
        if code in _CREDENTIAL_CODES:
            return ContextStoreError(f"S3 rejected the worker's AWS credentials ({code}) "
                                     f"to {action} {where}.",
                                     "Check the access key, session token and clock of the worker.")
        if code in ("AccessDenied", "403", "Forbidden") or status == 403:
            return ContextStoreError(
                f"access denied to {action} {where}.",
                f"The worker's AWS identity needs {_PERMISSION[action]} on "
                f"arn:aws:s3:::{self.bucket}/* (and s3:ListBucket on arn:aws:s3:::{self.bucket}).")
        if code in ("NoSuchKey", "404", "NotFound"):
            return ContextStoreError(f"{where} does not exist.")
        return ContextStoreError(f"S3 answered {code or status} to {action} {where}: "
                                 f"{error.get('Message') or exc}.")

    @contextlib.contextmanager
    def _mapped(self, action: str, key: str) -> Iterator[None]:
        try:
            yield
        except ContextStoreError:
            raise
        except Exception as exc:
            from botocore.exceptions import BotoCoreError, ClientError

            if isinstance(exc, BotoCoreError | ClientError):
                raise self._error(exc, action, key) from exc
            raise

    @contextlib.contextmanager
    def writer(self, key: str) -> Iterator[BinaryIO]:
        name = self._key(key)
        client = self.client
        upload_id: list[str] = []

        def start() -> None:
            with self._mapped("write", key):
                upload_id.append(client.create_multipart_upload(Bucket=self.bucket, Key=name)["UploadId"])

        def send(number: int, part: bytes) -> dict[str, Any]:
            with self._mapped("write", key):
                answer = client.upload_part(Bucket=self.bucket, Key=name, UploadId=upload_id[0],
                                            PartNumber=number, Body=part)
            return {"PartNumber": number, "ETag": answer["ETag"]}

        pipeline: PartPipeline[dict[str, Any]] = PartPipeline(send, s3_part_size, start)
        try:
            yield cast(BinaryIO, pipeline)
            parts, whole = pipeline.finish()
            with self._mapped("write", key):
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
                with contextlib.suppress(Exception), self._mapped("abort", key):
                    client.abort_multipart_upload(Bucket=self.bucket, Key=name, UploadId=upload_id[0])
            raise

    @contextlib.contextmanager
    def reader(self, key: str) -> Iterator[BinaryIO]:
        with self._mapped("read", key):
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        raw = MappedReader(body.read, lambda exc: self._error(exc, "read", key), body.close)
        with buffered(raw) as stream:
            yield stream

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            with self._mapped("exists", key):
                self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ContextStoreError as exc:
            cause = exc.__cause__
            # HEAD answers carry no body, so a missing bucket is a bare 404 as well:
            # NoSuchBucket only shows up on the next write, with its own clear error.
            if isinstance(cause, ClientError) and str(cause.response.get("Error", {}).get("Code")) in (
                    "404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def delete(self, key: str) -> None:
        # DeleteObject of a missing key succeeds (204), which makes this idempotent.
        with self._mapped("delete", key):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
