"""The context-store interface.

A store holds objects under keys below its prefix. The chain writes each build
context once, as ``<prefix>/<source-hash>.tar.gz``, and deletes it when the build
ends. Backends supply four primitives; streaming and naming live here. Which backend
serves a URL is decided in ``workers.stores``, so this module imports none of them.
"""

from __future__ import annotations

import shutil
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from typing import BinaryIO

from config.errors import ConfigError
from workers.stores.streaming import COPY_CHUNK


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
