"""SDK failures as buildq's context-store errors.

Each SDK family's exceptions are read into a ``Fault`` by ``workers.sdk_errors``. A store
then says it in its own terms through a ``Wording`` (its service name, its container, the
permission or role it needs), so every backend gives the same kind of message for the
same kind of fault, and a transient fault is always a ``TransientContextStoreError`` the
chain retries.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from config.errors import ContextStoreError, TransientContextStoreError
from workers.sdk_errors import Fault, SdkFamily

if TYPE_CHECKING:
    from workers.stores.base import ContextStore


def _any_credentials(code: str) -> str:
    return f"the worker's credentials ({code})"


def _no_permission(_action: str) -> str:
    return "Grant the worker's identity access to the store."


@dataclass(frozen=True)
class Wording:
    """How one store names itself and its fixes in errors."""

    #: What answered: "S3", "Cloud Storage".
    service: str
    #: What could not be reached: the service, or the endpoint it was pointed at.
    endpoint: str
    #: The store's container as a sentence names it: "the bucket 'ctx'".
    container: str
    #: Whose credentials are missing: "AWS" in "no AWS credentials".
    credentials: str = "usable"
    credentials_hint: str | None = None
    #: What the service rejected, given the service's code.
    rejected: Callable[[str], str] = _any_credentials
    rejected_hint: str | None = None
    #: How to grant what ``action`` needs.
    denied_hint: Callable[[str], str] = _no_permission


#: The hint of a store whose bucket or container is missing.
NO_CONTAINER_HINT = "Create it, or fix build-context-store in the launch-config."


class StoreErrors:
    """Turns one SDK family's failures into one store's errors."""

    def __init__(self, store: ContextStore, family: SdkFamily, wording: Wording) -> None:
        self.store = store
        self.family = family
        self.wording = wording

    def fault(self, exc: Exception) -> Fault:
        return self.family.read(exc).fault

    def error(self, exc: Exception, action: str, key: str = "") -> ContextStoreError:
        """Our error for ``exc``, raised while doing ``action`` on ``key`` (none: the store)."""
        read = self.family.read(exc)
        words = self.wording
        store = self.store
        where = store.uri(key) if key else store.url
        doing = f"{action} {where}"
        fault = read.fault
        if fault is Fault.UNREACHABLE:
            return TransientContextStoreError(f"cannot reach {words.endpoint} to {doing}: {read.detail}.")
        if fault is Fault.BUSY:
            return TransientContextStoreError(f"{words.service} answered {read.code} to {doing}.")
        if fault is Fault.NO_CREDENTIALS:
            return ContextStoreError(f"no {words.credentials} credentials to {doing}.",
                                     words.credentials_hint)
        if fault is Fault.REJECTED:
            return ContextStoreError(f"{words.service} rejected {words.rejected(read.code)} to {doing}.",
                                     words.rejected_hint)
        if fault is Fault.DENIED:
            return ContextStoreError(f"access denied to {doing}.", words.denied_hint(action))
        if fault is Fault.NO_CONTAINER:
            return ContextStoreError(f"{words.container} of context store {store.url} does not exist.",
                                     NO_CONTAINER_HINT)
        if fault is Fault.MISSING:
            return ContextStoreError(f"{where} does not exist.")
        if fault is Fault.ANSWERED:
            return ContextStoreError(f"{words.service} answered {read.code} to {doing}: {read.detail}.")
        return ContextStoreError(f"cannot {doing}: {read.detail}.")

    @contextlib.contextmanager
    def mapped(self, action: str, key: str = "") -> Iterator[None]:
        """Raise the SDK's errors inside the block as ours; anything else passes through."""
        try:
            yield
        except ContextStoreError:
            raise
        except Exception as exc:
            if not self.family.owns(exc):
                raise
            raise self.error(exc, action, key) from exc

    def mapper(self, action: str, key: str) -> Callable[[Exception], Exception]:
        """What a stream reading ``key`` raises in place of any exception of its reads."""
        return lambda exc: self.error(exc, action, key)
