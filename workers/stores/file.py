"""A context store in a local (or shared) directory: ``file:///var/lib/buildq/contexts``."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO
from urllib.parse import unquote, urlsplit

from config.errors import ConfigError, ContextStoreError
from workers.stores.base import ContextStore

if TYPE_CHECKING:
    from config.settings import Settings


class FileStore(ContextStore):
    def __init__(self, url: str, settings: Settings | None = None) -> None:
        """``settings`` is accepted like every backend's; a local directory needs none of it."""
        super().__init__(url)
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise ConfigError(f"file store {url!r} names a host; file:// stores are local.",
                              "Write it as file:///absolute/path.")
        self.root = Path(unquote(parts.path))

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise ContextStoreError(f"key {key!r} leaves the store {self.url}.")
        return path

    @contextlib.contextmanager
    def writer(self, key: str) -> Iterator[BinaryIO]:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Written beside the target and renamed, so readers never see half an object.
            fd, tmp = tempfile.mkstemp(prefix=".upload-", dir=path.parent)
        except OSError as exc:
            raise ContextStoreError(f"cannot write to {self.url}: {exc.strerror}.") from exc
        try:
            with os.fdopen(fd, "wb") as out:
                yield out
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    @contextlib.contextmanager
    def reader(self, key: str) -> Iterator[BinaryIO]:
        try:
            stream = open(self._path(key), "rb")  # noqa: SIM115
        except FileNotFoundError:
            raise ContextStoreError(f"{self.uri(key)} does not exist.") from None
        with stream:
            yield stream

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()
