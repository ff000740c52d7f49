"""Reading the files a Dockerfile is inferred from: small, inside the project, parsed once."""

from __future__ import annotations

import json
import os
import re
import stat
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

from config.errors import SourceError

#: Files the project is inferred from are small; anything bigger is not what we think.
MAX_PROJECT_FILE = 4 << 20

_NAME_SEPARATORS = re.compile(r"[-_.]+")


def canonical(name: str) -> str:
    """A distribution name as PEP 503 compares them: ``Foo_Bar`` and ``foo-bar`` are one."""
    return _NAME_SEPARATORS.sub("-", name).lower()


def clean_relative(path: str, what: str) -> str:
    """A '/'-separated path inside the project, or a SourceError naming ``what``."""
    parts = [p for p in path.replace("\\", "/").split("/") if p not in ("", ".")]
    if path.startswith("/") or ".." in parts:
        raise SourceError(f"{what} {path!r} is not inside the project.",
                          "Give it relative to the project root.")
    return "/".join(parts)


class Project:
    """One project directory; each file is read (and parsed) at most once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._real = os.path.realpath(root)
        self._texts: dict[str, str | None] = {}
        self._tomls: dict[str, dict[str, Any] | None] = {}

    def _path(self, rel: str) -> str:
        # Never follow a symlink out of the project: on a build host the project came from
        # a git URL or an archive, and its files must not read the host's.
        path = os.path.realpath(os.path.join(self._real, rel))
        if path != self._real and not path.startswith(self._real + os.sep):
            raise SourceError(f"{rel!r} resolves outside the project.",
                              "Replace the symlink with the file itself.")
        return path

    def text(self, rel: str) -> str | None:
        """A small regular file's text, or None if there is none."""
        if rel in self._texts:
            return self._texts[rel]
        path = self._path(rel)
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            st = None
        text: str | None = None
        if st is not None and stat.S_ISREG(st.st_mode):
            if st.st_size > MAX_PROJECT_FILE:
                raise SourceError(f"{rel!r} is larger than {MAX_PROJECT_FILE} bytes.",
                                  "Is it really the file buildq expects there?")
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        self._texts[rel] = text
        return text

    def exists(self, rel: str) -> bool:
        return os.path.lexists(os.path.join(self.root, rel))

    def is_file(self, rel: str) -> bool:
        return os.path.isfile(self._path(rel))

    def is_dir(self, rel: str) -> bool:
        return os.path.isdir(self._path(rel))

    def listdir(self, rel: str = "") -> list[str]:
        """Sorted names in a directory of the project ([] if it is not one)."""
        try:
            return sorted(os.listdir(self._path(rel) if rel else self._real))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def toml(self, rel: str) -> dict[str, Any] | None:
        if rel not in self._tomls:
            text = self.text(rel)
            try:
                self._tomls[rel] = tomllib.loads(text) if text is not None else None
            except tomllib.TOMLDecodeError as exc:
                raise SourceError(f"{rel} is not valid TOML ({exc}).",
                                  "Fix it, or add a Dockerfile.") from None
        return self._tomls[rel]

    def json(self, rel: str) -> Any:
        text = self.text(rel)
        if text is None:
            return None
        try:
            return json.loads(text)
        except ValueError as exc:
            raise SourceError(f"{rel} is not valid JSON ({exc}).", "Fix it, or add a Dockerfile.") from None

    @property
    def pyproject(self) -> dict[str, Any]:
        """``pyproject.toml`` as a mapping; empty when there is none."""
        return self.toml("pyproject.toml") or {}

    def table(self, *keys: str) -> dict[str, Any]:
        """A nested table of pyproject.toml (``table("tool", "poetry")``); {} when absent."""
        node: Any = self.pyproject
        for key in keys:
            node = node.get(key) if isinstance(node, dict) else None
        return node if isinstance(node, dict) else {}


def wheel_platform_ok(filename: str) -> bool:
    """Whether a distribution file could be installed on Linux (so its hash is worth keeping).

    Wheels for Windows or macOS never match in a Linux image; keeping their hashes only
    makes the generated Dockerfile longer.
    """
    name = PurePosixPath(filename.split("?", 1)[0].split("#", 1)[0]).name
    if not name.endswith(".whl"):
        return True
    stem = name[: -len(".whl")]
    platform = stem.rsplit("-", 1)[-1]
    return any(tag == "any" or tag.startswith(("linux", "manylinux", "musllinux"))
               for tag in platform.split("."))
