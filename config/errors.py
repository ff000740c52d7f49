"""One exception tree for everything buildq tells a user.

Every error carries a message (what is wrong) and a hint (how to fix it). The CLI
maps them to exit codes in one place; records carry ``message`` and ``kind``.
"""

from __future__ import annotations


class BuildqError(Exception):
    """Base of every error buildq raises on purpose."""

    #: Exit code of the CLI for this kind of error.
    exit_code = 1
    #: Short name stored in records (``error_kind``).
    kind = "error"
    #: A transient fault is retried with backoff before it becomes a failure.
    transient = False

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} {self.hint}" if self.hint else self.message


class InputError(BuildqError):
    """The user's input is wrong; nothing was attempted."""

    exit_code = 2
    kind = "input"


class ConfigError(InputError):
    """The launch-config (or an option standing for a config key) is invalid."""

    kind = "config"


class SourceError(InputError):
    """The source cannot be read safely: missing path, hostile archive or git ref."""

    kind = "source"


class ForbiddenError(InputError):
    """The request is well formed but outside what the operator allows: a source outside
    BUILDQ_SOURCE_ROOTS, a destination outside BUILDQ_ALLOWED_DESTINATIONS."""

    kind = "forbidden"


class BuildError(BuildqError):
    """The image build itself failed: a Dockerfile error, a failing RUN step, a timeout."""

    kind = "build"


class BuildCancelledError(BuildqError):
    """The build was stopped because its request was cancelled (buildq cancel)."""

    kind = "cancelled"


class RegistryError(BuildqError):
    """The registry refused or could not be reached."""

    kind = "registry"


class ContextStoreError(BuildqError):
    """The build-context store refused or could not be reached."""

    kind = "context-store"


class ServiceError(BuildqError):
    """A service buildq needs (Redis, the Docker Engine) does not answer."""

    kind = "service"


class TransientError(BuildqError):
    """A fault worth retrying: connection refused, 5xx, 429."""

    transient = True


class TransientRegistryError(TransientError, RegistryError):
    """The registry answered 5xx/429 or dropped the connection."""


class TransientContextStoreError(TransientError, ContextStoreError):
    """The context store answered 5xx or dropped the connection."""
