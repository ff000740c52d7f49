"""How a failed or cancelled request ends its Celery task: an exception carrying the record.

A failed build ends its last task in Celery's ``FAILURE`` state, so Flower's *Failed*
filter, its counts and every consumer of ``task-failed`` events see it. The exception's
type names the error kind (``FailedBuild``, ``FailedRegistry``, ``BuildCancelled``, …, all
:class:`BuildFailed`), and its one argument is the record, so it survives the json result
serializer (Celery stores ``exc_type``, ``exc_module`` and ``exc_message`` = the args) and
``.get()`` raises it with ``.record`` set. :func:`outcome` gives a script the record
whatever the status.
"""

from __future__ import annotations

from typing import Any


class BuildFailed(Exception):
    """A request ended without an image; ``.record`` is its record (``status`` failed or
    cancelled, ``error``, ``error_kind``)."""

    #: The ``error_kind`` this class stands for ("" for any kind without a class of its own).
    kind = ""

    def __init__(self, record: dict[str, Any] | str | None = None) -> None:
        super().__init__(record)
        self.record: dict[str, Any] = record if isinstance(record, dict) else {
            "status": "failed", "error": str(record or ""), "error_kind": self.kind or None}

    def __str__(self) -> str:
        return f"{self.record.get('error_kind') or 'failed'}: {self.record.get('error') or ''}"

    def __repr__(self) -> str:
        # What Flower shows in its exception column: the kind and the message, not the record.
        return f"{type(self).__name__}({str(self)!r})"


class FailedInput(BuildFailed):
    kind = "input"


class FailedConfig(BuildFailed):
    kind = "config"


class FailedSource(BuildFailed):
    kind = "source"


class FailedSecret(BuildFailed):
    kind = "secret"


class FailedBuild(BuildFailed):
    kind = "build"


class FailedRegistry(BuildFailed):
    kind = "registry"


class FailedContextStore(BuildFailed):
    kind = "context-store"


class FailedService(BuildFailed):
    kind = "service"


class FailedTimeout(BuildFailed):
    kind = "timeout"


class FailedInternal(BuildFailed):
    kind = "internal"


class BuildCancelled(BuildFailed):
    kind = "cancelled"


_BY_KIND: dict[str, type[BuildFailed]] = {
    cls.kind: cls for cls in (FailedInput, FailedConfig, FailedSource, FailedSecret, FailedBuild,
                              FailedRegistry, FailedContextStore, FailedService, FailedTimeout,
                              FailedInternal, BuildCancelled)}

#: Record statuses that end a request's task in ``FAILURE``.
FAILED_STATUSES = ("failed", "cancelled")


def failure_for(record: dict[str, Any]) -> BuildFailed | None:
    """The exception a request with ``record`` ends with, or None when it has an image."""
    if record.get("status") not in FAILED_STATUSES:
        return None
    return _BY_KIND.get(str(record.get("error_kind") or ""), BuildFailed)(record)


def record_of(value: Any) -> dict[str, Any]:
    """The record in what ``.get(propagate=False)`` returned: the record itself, or the
    exception of a failed request. An exception rebuilt where this module was never imported
    (Celery then makes a stand-in class of the same name) still has the record as its
    one argument."""
    if isinstance(value, dict):
        return value
    if isinstance(value, BuildFailed):
        return value.record
    args: tuple[Any, ...] = getattr(value, "args", ())
    if isinstance(value, BaseException) and len(args) == 1 and isinstance(args[0], dict):
        return dict(args[0])
    raise TypeError(f"not a buildq answer: {value!r}")


def outcome(result: Any, timeout: float | None = None) -> dict[str, Any]:
    """The record of ``result`` (an ``AsyncResult`` of ``build_image``), whatever its status.

    Waits like ``.get(timeout=...)``; raises only when there is no record (a timeout, a
    broker that cannot be reached).
    """
    return record_of(result.get(timeout=timeout, propagate=False))
