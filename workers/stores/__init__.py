"""Build-context stores: where a packed context travels between hosts."""

from workers.stores.base import ContextStore, split_store_url, store_for_url

__all__ = ["ContextStore", "split_store_url", "store_for_url"]
