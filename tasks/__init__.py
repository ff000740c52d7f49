"""What a build is: the Celery app, the stage tasks, the lock and the record.

``from tasks import build_image`` gives the entry task; ``.delay(...).get()`` is the record,
or raises :class:`BuildFailed` (``.record``) for a failed or cancelled build;
``outcome(result)`` is the record whatever the status; ``cancel(request_id)`` stops a request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # What the lazy attributes below return, for mypy and IDEs.
    from tasks.app import app as app
    from tasks.cancelling import cancel as cancel
    from tasks.failures import BuildFailed as BuildFailed
    from tasks.failures import outcome as outcome
    from tasks.stages import build_image as build_image

__all__ = ["BuildFailed", "app", "build_image", "cancel", "outcome"]


def __getattr__(name: str) -> Any:
    # Imported on first use so `buildq --help` and config checks stay fast.
    if name == "build_image":
        from tasks.stages import build_image

        return build_image
    if name in ("BuildFailed", "outcome"):
        from tasks import failures

        return getattr(failures, name)
    if name == "cancel":
        from tasks.cancelling import cancel

        return cancel
    if name == "app":
        from tasks.app import app

        return app
    raise AttributeError(name)
