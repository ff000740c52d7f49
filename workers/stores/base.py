"""The context-store interface and the choice of backend by URL scheme.

A store holds objects under keys below its prefix. The chain writes each build
context once, as ``<prefix>/<source-hash>.tar.gz``, and deletes it when the build
ends. Backends supply four primitives; streaming and naming live here.
"""

from __future__ import annotations

import shutil
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, BinaryIO
from urllib.parse import urlsplit

from config.errors import ConfigError

if TYPE_CHECKING:
    from config.settings import Settings

#: Host suffix of Azure Blob Storage accounts (https://<account>.blob.core.windows.net).
AZURE_BLOB_SUFFIX = ".blob.core.windows.net"
#: Chunk size for copies between streams.
COPY_CHUNK = 1 << 20


class ContextStore(ABC):
    """A bucket-like place addressed by ``<scheme>://<location>/<prefix>``."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def uri(self, key: str) -> str:
        """The full URL of ``key`` (what kaniko's ``--context`` or a fetch stage reads)."""
        return f"{self.url}/{key}"

    @abstractmethod
    def writer(self, key: str) -> AbstractContextManager[BinaryIO]:
        """A writable stream; the object appears whole only when the block exits cleanly."""

    @abstractmethod
    def reader(self, key: str) -> AbstractContextManager[BinaryIO]:
        """A readable stream of the object."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; a missing object is not an error."""

    def upload(self, key: str, stream: BinaryIO) -> int:
        with self.writer(key) as out:
            size = 0
            while chunk := stream.read(COPY_CHUNK):
                out.write(chunk)
                size += len(chunk)
        return size

    def download(self, key: str, out: BinaryIO) -> None:
        with self.reader(key) as stream:
            shutil.copyfileobj(stream, out, COPY_CHUNK)


def split_store_url(url: str) -> tuple[str, str]:
    """Split an object URL into (store URL, key): ``s3://b/p/x.tar.gz`` → (``s3://b/p``, ``x.tar.gz``)."""
    base, _, key = url.rstrip("/").rpartition("/")
    if not key or base.endswith(":/"):
        raise ConfigError(f"{url!r} names no object inside a store.",
                          "Give the full object URL, e.g. s3://bucket/path/context.tar.gz.")
    return base, key


def store_for_url(url: str, settings: Settings | None = None) -> ContextStore:
    """The backend for a store URL; each module is imported only when used.

    ``settings`` carries endpoint overrides and the Azure key; without it they are read
    from the environment by ``Settings.from_env`` (the one place that reads it).
    """
    parts = urlsplit(url)
    scheme = parts.scheme
    if scheme == "file":
        from workers.stores.file import FileStore

        return FileStore(url)
    if scheme in ("s3", "gs") or (scheme == "https" and (parts.hostname or "").endswith(AZURE_BLOB_SUFFIX)):
        if settings is None:
            from config.settings import Settings

            settings = Settings.from_env()
        if scheme == "s3":
            from workers.stores.s3 import S3Store

            return S3Store(url, settings)
        if scheme == "gs":
            from workers.stores.gcs import GCSStore

            return GCSStore(url, settings)
        from workers.stores.azure import AzureBlobStore

        return AzureBlobStore(url, settings)
    raise ConfigError(
        f"context store {url!r} has a scheme buildq cannot write to ({scheme or 'none'}).",
        "Use file:///path for one host, s3://bucket/prefix, gs://bucket/prefix or"
        " https://<account>.blob.core.windows.net/<container>/prefix.",
    )
