"""Kaniko's command-line flags as buildq reads them: one table for the config check and
the Job renderer alike."""

from __future__ import annotations

from config.errors import ConfigError

#: Kaniko's boolean flags (pflag ``Bool``): written bare they mean "=true"; every other
#: flag needs a value. Read from the executor's flag set: upstream's (which the
#: chainguard-dev fork built by the tests keeps) plus what the default image's fork,
#: osscontainertools v1.28.2, adds (``--dryrun``, ``--pre-cleanup``, ``--materialize``,
#: ``--preserve-context``). tests/kube/test_kaniko_executor.py checks a built executor's
#: ``--help`` against both tables.
BOOLEAN_FLAGS = frozenset({
    "--cache", "--cache-copy-layers", "--cache-run-layers", "--cleanup", "--compressed-caching",
    "--dryrun", "--force", "--force-build-metadata", "--ignore-var-run", "--insecure",
    "--insecure-pull", "--log-timestamp", "--materialize", "--no-push", "--no-push-cache",
    "--pre-cleanup", "--preserve-context", "--push-ignore-immutable-tag-errors",
    "--reproducible", "--single-snapshot", "--skip-default-registry-fallback",
    "--skip-push-permission-check", "--skip-tls-verify", "--skip-tls-verify-pull",
    "--skip-unused-stages", "--use-new-run", "--whitelist-var-run",
})
#: Kaniko flags that may be given many times, every value kept: the multi-value and
#: key=value types of its flag set. ``--git`` sets one clone option per use
#: (``branch=…``, ``depth=1``); ``--credential-helpers``, ``--secret`` and a repeatable
#: ``--target`` are the osscontainertools fork's.
REPEATABLE_FLAGS = frozenset({
    "--annotation", "--build-arg", "--credential-helpers", "--destination", "--git",
    "--ignore-path", "--insecure-registry", "--label", "--registry-certificate",
    "--registry-client-cert", "--registry-map", "--registry-mirror", "--secret",
    "--skip-tls-verify-registry", "--target",
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
