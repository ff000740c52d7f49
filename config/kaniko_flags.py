"""Kaniko's command-line flags as buildq reads them: one table for the config check and
the Job renderer alike."""

from __future__ import annotations

from config.errors import ConfigError

#: Kaniko's boolean flags: written bare they mean "=true"; every other flag needs a value.
BOOLEAN_FLAGS = frozenset({
    "--cache", "--cache-copy-layers", "--cache-run-layers", "--cleanup", "--compressed-caching",
    "--force", "--ignore-var-run", "--insecure", "--insecure-pull", "--log-timestamp",
    "--no-push", "--no-push-cache", "--push-ignore-immutable-tag-errors", "--reproducible",
    "--single-snapshot", "--skip-default-registry-fallback", "--skip-push-permission-check",
    "--skip-tls-verify", "--skip-tls-verify-pull", "--skip-unused-stages", "--use-new-run",
    "--preserve-context",
})
#: Kaniko flags that may be given many times; every value is kept.
REPEATABLE_FLAGS = frozenset({
    "--build-arg", "--destination", "--label", "--annotation", "--registry-mirror",
    "--insecure-registry", "--skip-tls-verify-registry", "--ignore-path",
    "--registry-certificate", "--registry-client-cert", "--registry-map",
})
#: Flags buildq sets per build: the build would read another context, lose its digest,
#: or push under a tag that is not its source hash.
RESERVED_FLAGS = ("--destination", "--context", "--digest-file")
#: How to write an item that is not a flag; the config check and the renderer say the same.
NOT_A_FLAG_HINT = 'Quote each flag, e.g. "--cache=false".'


def needs_value_hint(key: str) -> str:
    """How to write a bare non-boolean flag, for both the config check and the renderer."""
    return f'Write it as "{key}=<value>" in one list item.'


def split_arg(arg: object) -> tuple[str, str | None] | None:
    """``--key=value`` → (``--key``, ``value``), a bare boolean flag → (``--key``, ``true``);
    a bare flag that needs a value → (``--key``, None); None when ``arg`` is no flag."""
    if not isinstance(arg, str) or not arg.startswith("--"):
        return None
    key, sep, value = arg.partition("=")
    if sep:
        return key, value
    # "--verbosity", "debug" as two items would pass "debug" as a positional argument.
    return key, "true" if key in BOOLEAN_FLAGS else None


def parse_arg(arg: object, where: str = "kaniko-config") -> tuple[str, str]:
    """``--key=value`` → (``--key``, ``value``); a bare boolean flag means ``true``."""
    split = split_arg(arg)
    if split is None:
        raise ConfigError(f"{where}: container arg {arg!r} is not a flag written --key=value.",
                          NOT_A_FLAG_HINT)
    key, value = split
    if value is None:
        raise ConfigError(f"{where}: container arg {arg!r} needs a value.",
                          needs_value_hint(key))
    return key, value
