"""Build-context stores: where a packed context travels between hosts.

The backend of a URL comes from ``BACKENDS``, by the kind ``config.names`` gives the
URL, and its module is imported on first use: each SDK costs a process that never
touches that cloud several tenths of a second, and may not even be installed.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from config.errors import ConfigError
from config.names import StoreKind, classify_store_url
from workers.stores.base import ContextStore, split_store_url

if TYPE_CHECKING:
    from config.settings import Settings

__all__ = ["BACKENDS", "ContextStore", "backend", "split_store_url", "store_for_url"]

#: The class serving each kind of store URL, as ``"module:Class"``.
BACKENDS: dict[StoreKind, str] = {
    "file": "workers.stores.file:FileStore",
    "s3": "workers.stores.s3:S3Store",
    "gs": "workers.stores.gcs:GCSStore",
    "azure": "workers.stores.azure:AzureBlobStore",
}

#: A backend class: made from the store URL and the caller's settings.
StoreFactory = Callable[[str, "Settings"], ContextStore]

_loaded: dict[StoreKind, StoreFactory] = {}


def backend(kind: StoreKind) -> StoreFactory:
    """The backend class for ``kind``, importing its module the first time."""
    factory = _loaded.get(kind)
    if factory is None:
        module, _, name = BACKENDS[kind].partition(":")
        factory = _loaded[kind] = getattr(importlib.import_module(module), name)
    return factory


def store_for_url(url: str, settings: Settings | None = None) -> ContextStore:
    """The backend for a store URL.

    ``settings`` carries endpoint overrides and the Azure key; without it they are read
    from the environment by ``Settings.from_env`` (the one place that reads it).
    """
    kind, _problem = classify_store_url(url)
    if kind is None:
        raise ConfigError(
            f"context store {url!r} has a scheme buildq cannot write to ({urlsplit(url).scheme or 'none'}).",
            "Use file:///path for one host, s3://bucket/prefix, gs://bucket/prefix or"
            " https://<account>.blob.core.windows.net/<container>/prefix.",
        )
    # A malformed URL of a known kind reaches its backend, which says what it expected.
    if settings is None:
        from config.settings import Settings

        settings = Settings.from_env()
    return backend(kind)(url, settings)
