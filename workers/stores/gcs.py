"""A Google Cloud Storage context store: ``gs://bucket/prefix``.

Credentials come from ``google.auth.default()`` (workload identity, a key file in
GOOGLE_APPLICATION_CREDENTIALS, gcloud's user login). ``Settings.gcs_endpoint_url``
(BUILDQ_GCS_ENDPOINT_URL, or the STORAGE_EMULATOR_HOST Google's clients honour) points
the client at an emulator, which it then talks to anonymously.

Writes go through a resumable upload, one chunk at a time, fed from a worker thread so
compression and upload overlap; memory holds a few chunks at most. A write that fails is
never finalized into an object, and cancels its session.
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
from workers.sdk_errors import GOOGLE, Fault
from workers.stores.base import ContextStore
from workers.stores.errors import StoreErrors, Wording
from workers.stores.streaming import MappedReader, PartPipeline, buffered

if TYPE_CHECKING:
    from config.settings import Settings

#: Resumable-upload chunk; GCS wants a multiple of 256 KiB.
CHUNK_SIZE = 8 << 20
#: Chunks queued for the upload thread (plus one being sent, one being filled).
IN_FLIGHT = 2
#: Seconds the client library keeps retrying a failed request (5xx, 429, resets)
#: before the error surfaces; the chain retries transient errors again with backoff.
RETRY_TIMEOUT = 20.0
#: Seconds to wait for the cancellation of a failed upload's session.
CANCEL_TIMEOUT = 10.0
#: Project the emulator is addressed with (it ignores it, the client needs one).
EMULATOR_PROJECT = "buildq-emulator"

#: IAM permission each operation needs, named in 403 errors.
_PERMISSION = {
    "write": "storage.objects.create",
    "read": "storage.objects.get",
    "exists": "storage.objects.get",
    "delete": "storage.objects.delete",
    "open": "storage.buckets.get",
}

log = logging.getLogger("buildq")


class GCSStore(ContextStore):
    def __init__(self, url: str, settings: Settings) -> None:
        super().__init__(url)
        parts = urlsplit(self.url)
        kind, _ = classify_store_url(self.url)
        if kind != "gs" or not parts.netloc:
            raise ConfigError(f"{url!r} is not a GCS store URL.", "Write it as gs://bucket/prefix.")
        self.bucket_name = parts.netloc
        self.prefix = parts.path.strip("/")
        self._settings = settings
        self._client: Any = None
        self._client_lock = threading.Lock()
        self._errors = StoreErrors(self, GOOGLE, Wording(
            service="Cloud Storage", endpoint="Cloud Storage", container=f"the bucket {self.bucket_name!r}",
            credentials="Google",
            credentials_hint="Give the worker workload identity or set GOOGLE_APPLICATION_CREDENTIALS "
                             "to a key file.",
            denied_hint=self._denied_hint,
        ))

    def _denied_hint(self, action: str) -> str:
        return (f"The worker's service account needs {_PERMISSION[action]} (and storage.buckets.get) "
                f"on gs://{self.bucket_name}, e.g. roles/storage.objectAdmin.")

    @property
    def client(self) -> Any:
        with self._client_lock:
            if self._client is None:
                from google.cloud import storage

                with self._errors.mapped("open", ""):
                    endpoint = self._settings.gcs_endpoint_url
                    if endpoint:
                        from google.auth.credentials import AnonymousCredentials

                        self._client = storage.Client(
                            project=EMULATOR_PROJECT, credentials=AnonymousCredentials(),
                            client_options={"api_endpoint": endpoint.rstrip("/")})
                    else:
                        import google.auth

                        credentials, project = google.auth.default(
                            scopes=["https://www.googleapis.com/auth/devstorage.read_write"])
                        self._client = storage.Client(project=project, credentials=credentials)
            return self._client

    @property
    def _retry(self) -> Any:
        from google.cloud.storage.retry import DEFAULT_RETRY

        return DEFAULT_RETRY.with_timeout(RETRY_TIMEOUT)

    def _blob(self, key: str) -> Any:
        if not key or key.startswith("/"):
            raise ContextStoreError(f"invalid object key {key!r} for {self.url}.")
        name = f"{self.prefix}/{key}" if self.prefix else key
        return self.client.bucket(self.bucket_name).blob(name, chunk_size=CHUNK_SIZE)

    @contextlib.contextmanager
    def writer(self, key: str) -> Iterator[BinaryIO]:
        from google.cloud.storage.fileio import BlobWriter

        class AbortableWriter(BlobWriter):
            """BlobWriter finalizes the upload on close(), which io also calls on garbage
            collection: after an error it must not, or half a context becomes an object."""

            aborted = False

            def close(self) -> None:
                if not self.aborted:
                    super().close()

            def cancel(self) -> None:
                """End the resumable session, as GCS documents (DELETE on the session URI,
                answered 499): it holds what was sent for a week otherwise. BlobWriter's own
                terminate() sends that DELETE to the URL that created the session instead."""
                self.aborted = True
                started = self._upload_and_transport
                session = started[0].resumable_url if started else None
                if session:
                    started[1].request("DELETE", session, timeout=CANCEL_TIMEOUT)

        blob = self._blob(key)
        upload = AbortableWriter(blob, chunk_size=CHUNK_SIZE, ignore_flush=True, retry=self._retry)

        def send(_number: int, chunk: bytes) -> None:
            # One thread, so chunks reach the resumable upload in order.
            with self._errors.mapped("write", key):
                upload.write(chunk)

        pipeline: PartPipeline[None] = PartPipeline(send, lambda _n: CHUNK_SIZE, threads=1,
                                                    in_flight=IN_FLIGHT)
        try:
            yield cast(BinaryIO, pipeline)
            _, whole = pipeline.finish()
            with self._errors.mapped("write", key):
                if whole is not None:
                    # Fits in one chunk: a single-request upload, no resumable session.
                    upload.aborted = True
                    blob.upload_from_string(whole, content_type="application/gzip", retry=self._retry)
                else:
                    upload.close()
        except BaseException:
            pipeline.abort()
            # An unfinished session creates no object; ending it is hygiene, best effort (the
            # store may be unreachable, which is why the write failed).
            try:
                upload.cancel()
            except Exception as exc:
                log.warning("could not cancel the upload session of %s: %s", self.uri(key),
                            type(exc).__name__)
            raise

    @contextlib.contextmanager
    def reader(self, key: str) -> Iterator[BinaryIO]:
        blob = self._blob(key)
        with self._errors.mapped("read", key):
            # Fetches metadata first, so a missing object fails here and not mid-stream.
            blob.reload(retry=self._retry)
            if blob.size == 0:
                # Nothing to fetch; a ranged GET of an empty object is a 416 on some servers.
                with buffered(MappedReader(lambda _n: b"", Exception)) as empty:
                    yield empty
                return
            stream = blob.open("rb", chunk_size=CHUNK_SIZE, retry=self._retry)
        raw = MappedReader(stream.read, self._errors.mapper("read", key), stream.close)
        with buffered(raw) as out:
            yield out

    def exists(self, key: str) -> bool:
        with self._errors.mapped("exists", key):
            return bool(self._blob(key).exists(retry=self._retry))

    def delete(self, key: str) -> None:
        from google.api_core.exceptions import NotFound

        with self._errors.mapped("delete", key):
            try:
                self._blob(key).delete(retry=self._retry)
            except NotFound as exc:
                # A missing object is fine; a missing bucket is a misconfigured store.
                if self._errors.fault(exc) is Fault.NO_CONTAINER:
                    raise
