"""The problems found in a launch-config, collected so the user sees all of them at once.

Each problem is one line naming the file, the key, what was found, what was expected
and how to fix it. Translating and checking both report here; the loader raises the
lot as one :class:`ConfigError` once every rule has run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from config.errors import ConfigError

#: Longest written value quoted in a message; a whole pasted document would drown the line.
_MAX_SHOWN = 80


def show(value: Any) -> str:
    """Describe a value the user wrote, short enough for one line."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = value if len(value) <= _MAX_SHOWN else value[: _MAX_SHOWN - 3] + "..."
        return repr(text) if text else "an empty string"
    if isinstance(value, int | float):
        return f"the number {value}"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return f"a {type(value).__name__}"


@dataclass(frozen=True)
class Problem:
    #: The key as the user writes it: ``builder.kaniko-config.spec``, ``registry.uri``.
    path: str
    found: str
    expected: str
    hint: str

    def statement(self, origin: str) -> str:
        """What is wrong, without the hint."""
        return f"{origin}: {self.path}: found {self.found}, expected {self.expected}."

    def line(self, origin: str) -> str:
        return f"{self.statement(origin)} {self.hint}"


class Problems:
    """Every problem of one config, at most one per key."""

    def __init__(self) -> None:
        self.items: list[Problem] = []
        #: Keys already explained by another problem (a misspelling of them).
        self.claimed: set[str] = set()

    def add(self, path: str, found: str, expected: str, hint: str) -> None:
        # A key that failed its type check is then also "missing" to later rules;
        # the first report is the useful one.
        if path in self.claimed or any(p.path == path for p in self.items):
            return
        self.items.append(Problem(path, found, expected, hint))

    def add_error(self, err: ConfigError) -> None:
        # Reference errors already say "<key>: found ..., expected ..."; keep them whole.
        path, _, rest = err.message.partition(": ")
        found, _, expected = rest.removeprefix("found ").partition(", expected ")
        self.add(path, found, expected.rstrip("."), err.hint or "")

    def raise_if_any(self, origin: str) -> None:
        if not self.items:
            return
        if len(self.items) == 1:
            only = self.items[0]
            raise ConfigError(only.statement(origin), only.hint)
        lines = "\n".join(p.line(origin) for p in self.items)
        raise ConfigError(
            f"{origin} has {len(self.items)} problems in its launch config:\n{lines}",
            None,
        )
