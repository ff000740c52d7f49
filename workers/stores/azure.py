"""An Azure Blob Storage context store: ``https://<account>.blob.core.windows.net/<container>/prefix``.

Credentials: the storage account key from ``Settings.azure_storage_key`` when set (the
same key kaniko gets as AZURE_STORAGE_ACCESS_KEY), else ``DefaultAzureCredential()``
(workload identity, managed identity, az login). ``Settings.azure_blob_endpoint``
replaces the account's URL (Azurite in tests) while the store URL keeps its real form,
which is what kaniko is given.

Writes stage blocks from worker threads while the caller compresses, then commit the
block list: the blob appears whole or not at all, and memory holds a few blocks. A write
that fails discards the blocks it staged.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import threading
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, BinaryIO, cast
from urllib.parse import urlsplit

from config.errors import ConfigError, ContextStoreError
from config.names import classify_store_url
from workers.sdk_errors import AZURE, Fault
from workers.stores.base import ContextStore
from workers.stores.errors import StoreErrors, Wording
from workers.stores.streaming import MappedReader, PartPipeline, buffered

if TYPE_CHECKING:
    from config.settings import Settings

#: Size of a staged block (Azure allows 50,000 per blob: 200 GiB at this size).
BLOCK_SIZE = 4 << 20
#: Retries of a failed request inside the SDK (its default waits 15 s, then 18, 24 ...:
#: too long before the chain's own retry of a transient error takes over).
RETRY_TOTAL = 3
RETRY_BACKOFF = 1
#: Seconds to connect; a stopped endpoint should fail fast, not hang a worker.
CONNECT_TIMEOUT = 10

ROLE = "Storage Blob Data Contributor"

log = logging.getLogger("buildq")


class AzureBlobStore(ContextStore):
    def __init__(self, url: str, settings: Settings, credential: Any = None) -> None:
        """``credential`` overrides the account key / DefaultAzureCredential choice (any
        azure-core TokenCredential)."""
        super().__init__(url)
        parts = urlsplit(self.url)
        host = parts.hostname or ""
        segments = parts.path.strip("/").split("/", 1)
        kind, _ = classify_store_url(self.url)
        if kind != "azure" or not segments[0]:
            raise ConfigError(f"{url!r} is not an Azure Blob store URL.",
                              "Write it as https://<account>.blob.core.windows.net/<container>/prefix.")
        # The first label, in every Azure cloud (classify_store_url checked the suffix).
        self.account = host.split(".", 1)[0]
        self.container = segments[0]
        self.prefix = segments[1].strip("/") if len(segments) > 1 else ""
        self.account_url = (settings.azure_blob_endpoint or f"https://{host}").rstrip("/")
        self._account_key = settings.azure_storage_key
        self._credential = credential
        self._client: Any = None
        self._client_lock = threading.Lock()
        how = ("the storage account key (BUILDQ_AZURE_STORAGE_KEY)" if self._account_key
               else "the worker's Azure identity (DefaultAzureCredential)")
        self._errors = StoreErrors(self, AZURE, Wording(
            service="Azure Blob Storage", endpoint=self.account_url,
            container=f"the container {self.container!r}",
            rejected=lambda _code: how,
            rejected_hint=f"Check it; an identity also needs the {ROLE} role on the account or container.",
            denied_hint=lambda _action: f"Grant the worker's identity the {ROLE} role on the storage account "
                                        "or container.",
        ))

    def __repr__(self) -> str:
        # Never the key: only where the store is.
        return f"AzureBlobStore({self.url!r})"

    @property
    def container_client(self) -> Any:
        with self._client_lock:
            if self._client is None:
                from azure.storage.blob import BlobServiceClient, ExponentialRetry

                credential = self._credential
                if credential is None and self._account_key:
                    credential = {"account_name": self.account, "account_key": self._account_key}
                elif credential is None:
                    from azure.identity import DefaultAzureCredential

                    credential = DefaultAzureCredential()
                service = BlobServiceClient(
                    self.account_url, credential=credential,
                    retry_policy=ExponentialRetry(initial_backoff=RETRY_BACKOFF, increment_base=2,
                                                  retry_total=RETRY_TOTAL, random_jitter_range=1),
                    connection_timeout=CONNECT_TIMEOUT,
                    # Downloads fetch this much per request (the SDK's first GET defaults
                    # to 32 MiB held in memory).
                    max_single_get_size=BLOCK_SIZE, max_chunk_get_size=BLOCK_SIZE,
                )
                self._client = service.get_container_client(self.container)
            return self._client

    def _blob(self, key: str) -> Any:
        if not key or key.startswith("/"):
            raise ContextStoreError(f"invalid object key {key!r} for {self.url}.")
        return self.container_client.get_blob_client(f"{self.prefix}/{key}" if self.prefix else key)

    @contextlib.contextmanager
    def writer(self, key: str) -> Iterator[BinaryIO]:
        from azure.storage.blob import BlobBlock, ContentSettings

        blob = self._blob(key)
        # Block ids must all have the same length; the random part keeps two writers of
        # the same key from mixing their uncommitted blocks.
        token = uuid.uuid4().hex[:16]
        ids: dict[int, str] = {}

        def send(number: int, block: bytes) -> None:
            block_id = base64.b64encode(f"{token}-{number:08d}".encode()).decode()
            with self._errors.mapped("write", key):
                blob.stage_block(block_id, block, length=len(block))
            ids[number] = block_id

        content = ContentSettings(content_type="application/gzip")
        pipeline: PartPipeline[None] = PartPipeline(send, lambda _n: BLOCK_SIZE)
        try:
            yield cast(BinaryIO, pipeline)
            _, whole = pipeline.finish()
            with self._errors.mapped("write", key):
                if whole is not None:
                    blob.upload_blob(whole, overwrite=True, content_settings=content)
                else:
                    blocks = [BlobBlock(block_id=ids[n]) for n in sorted(ids)]
                    blob.commit_block_list(blocks, content_settings=content)
        except BaseException:
            pipeline.abort()
            if pipeline.started:
                self._discard_staged(blob, key)
            raise

    def _discard_staged(self, blob: Any, key: str) -> None:
        """Drop the blocks a failed write staged, best effort.

        Uncommitted blocks never form a blob, but Azure keeps them for a week, listed with
        the container's uncommitted blobs. No call deletes a staged block; a Put Block List
        discards every block it does not name. So an empty list is committed, only where no
        blob exists (If-None-Match: *, so a blob another writer committed is never emptied),
        and the empty blob that makes is deleted by its ETag (so nothing written after it is).
        Where a blob does exist, its next commit discards these blocks.
        """
        from azure.core import MatchConditions
        from azure.core.exceptions import AzureError, ResourceExistsError, ResourceModifiedError

        try:
            empty = blob.commit_block_list([], match_condition=MatchConditions.IfMissing)
            blob.delete_blob(etag=empty["etag"], match_condition=MatchConditions.IfNotModified)
        except (ResourceExistsError, ResourceModifiedError):
            return
        except AzureError as exc:
            # The store may be unreachable (why the write failed): the next write of this
            # key discards the blocks, or Azure does after a week.
            log.warning("could not discard the staged blocks of %s: %s", self.uri(key),
                        self._errors.error(exc, "write", key).message)

    @contextlib.contextmanager
    def reader(self, key: str) -> Iterator[BinaryIO]:
        with self._errors.mapped("read", key):
            download = self._blob(key).download_blob(max_concurrency=1)
        raw = MappedReader(download.read, self._errors.mapper("read", key))
        with buffered(raw) as out:
            yield out

    def exists(self, key: str) -> bool:
        from azure.core.exceptions import ResourceNotFoundError

        with self._errors.mapped("exists", key):
            try:
                self._blob(key).get_blob_properties()
            except ResourceNotFoundError as exc:
                if self._errors.fault(exc) is Fault.NO_CONTAINER:
                    raise
                return False
        return True

    def delete(self, key: str) -> None:
        from azure.core.exceptions import ResourceNotFoundError

        with self._errors.mapped("delete", key):
            try:
                self._blob(key).delete_blob(delete_snapshots="include")
            except ResourceNotFoundError as exc:
                if self._errors.fault(exc) is Fault.NO_CONTAINER:
                    raise
