"""The base images a Dockerfile builds on: found, resolved to digests, and pinned.

A tag such as ``python:3.11-slim`` moves when its publisher patches it; the source hash
must move with it, and the build must use exactly the image the hash saw. So before
hashing, every image a Dockerfile names — each ``FROM`` (after ``ARG`` substitution;
stage names and ``scratch`` excepted), each ``COPY --from=<image>`` and each
``RUN --mount=...,from=<image>`` — is resolved to the digest its registry serves for
it now, and the Dockerfile handed to the builder names each one as ``name@digest``.

The digest is the one the reference resolves to as a whole: for a multi-platform base
that is its index (manifest list), from which the builder takes the build's platform.
It costs one ``HEAD`` per reference and pins every platform at once.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from config.errors import BuildError, InputError
from config.references import ImageRef, parse_image_ref

#: The pseudo-image that starts a stage from nothing.
SCRATCH = "scratch"

_INSTRUCTION = re.compile(r"^\s*([A-Za-z]+)\s*(.*)$", re.DOTALL)
_DIRECTIVE = re.compile(r"^#\s*([a-zA-Z]+)\s*=\s*(\S+)\s*$")
_VARIABLE = re.compile(r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?P<modifier>:[-+][^}]*)?\}"
                       r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")
_FLAG = re.compile(r"^--([a-z-]+)(?:=(.*))?$")


@dataclass(frozen=True)
class Base:
    """One image reference of the Dockerfile, where it stands and what it means."""

    #: The reference after ARG substitution, as the build would read it.
    image: str
    #: Index of the instruction (in :func:`instructions` order) it appears in.
    instruction: int
    #: Its text inside that instruction (the ``FROM`` argument or the ``--from=`` value).
    written: str


@dataclass(frozen=True)
class _Instruction:
    keyword: str
    argument: str
    #: First and last (exclusive) line of the instruction in the Dockerfile text.
    start: int
    end: int


def _escape_char(lines: list[str]) -> str:
    for line in lines:
        match = _DIRECTIVE.match(line.strip())
        if not match:
            break
        if match.group(1).lower() == "escape" and match.group(2) in ("\\", "`"):
            return match.group(2)
    return "\\"


def instructions(text: str) -> list[_Instruction]:
    """The Dockerfile's instructions with continuation lines joined; comments dropped."""
    lines = text.splitlines()
    escape = _escape_char(lines)
    found: list[_Instruction] = []
    parts: list[str] = []
    start = 0
    for number, line in enumerate(lines):
        stripped = line.strip()
        if not parts:
            start = number
            if not stripped or stripped.startswith("#"):
                continue
        elif stripped.startswith("#"):
            continue  # a comment inside a continued instruction is skipped by Docker too
        if stripped.endswith(escape):
            parts.append(stripped[:-1])
            continue
        parts.append(stripped)
        match = _INSTRUCTION.match(" ".join(parts))
        if match:
            found.append(_Instruction(match.group(1).upper(), match.group(2).strip(), start,
                                      number + 1))
        parts = []
    if parts:
        match = _INSTRUCTION.match(" ".join(parts))
        if match:
            found.append(_Instruction(match.group(1).upper(), match.group(2).strip(), start,
                                      len(lines)))
    return found


def substitute(text: str, values: Mapping[str, str]) -> str:
    """``$VAR``, ``${VAR}``, ``${VAR:-default}`` and ``${VAR:+alternative}`` as Docker reads them."""
    def one(match: re.Match[str]) -> str:
        name = match.group("braced") or match.group("bare")
        value = values.get(name, "")
        modifier = match.group("modifier")
        if modifier and modifier.startswith(":-"):
            return value or modifier[2:]
        if modifier and modifier.startswith(":+"):
            return modifier[2:] if value else ""
        return value

    return _VARIABLE.sub(one, text)


def _arg_default(argument: str) -> tuple[str, str | None]:
    name, sep, default = argument.partition("=")
    default = default.strip()
    if len(default) >= 2 and default[0] == default[-1] and default[0] in "\"'":
        default = default[1:-1]
    return name.strip(), default if sep else None


def _flags(argument: str) -> tuple[dict[str, list[str]], str]:
    """Leading ``--flag[=value]`` words of an instruction, and the rest."""
    flags: dict[str, list[str]] = {}
    words = argument.split()
    while words and (match := _FLAG.match(words[0])):
        flags.setdefault(match.group(1), []).append(match.group(2) or "")
        words.pop(0)
    return flags, " ".join(words)


def find_bases(text: str, build_args: Mapping[str, str] | None = None) -> list[Base]:
    """Every image reference the Dockerfile builds from, in order, duplicates included."""
    args = dict(build_args or {})
    global_args: dict[str, str] = {}
    stages: set[str] = set()
    stage_count = 0
    bases: list[Base] = []
    for index, instruction in enumerate(instructions(text)):
        keyword, argument = instruction.keyword, instruction.argument
        if keyword == "ARG" and stage_count == 0:
            # Only ARGs before the first FROM apply to FROM lines.
            for word in argument.split():
                name, default = _arg_default(word)
                if name in args:
                    global_args[name] = args[name]
                elif default is not None:
                    global_args[name] = substitute(default, global_args)
        elif keyword == "FROM":
            _, rest = _flags(argument)
            words = rest.split()
            if not words:
                raise InputError(f"line {instruction.start + 1} of the Dockerfile: FROM names no "
                                 "image.", "Write FROM <image>[:tag] [AS <name>].")
            image = substitute(words[0], global_args)
            if len(words) >= 3 and words[1].lower() == "as":
                stages.add(words[2].lower())
            if image.lower() != SCRATCH and image.lower() not in stages:
                bases.append(Base(image, index, words[0]))
            stage_count += 1
        elif keyword in ("COPY", "RUN"):
            flags, _ = _flags(argument)
            sources = flags.get("from", [])
            for mount in flags.get("mount", []):
                options = dict(p.partition("=")[::2] for p in mount.split(","))
                if "from" in options:
                    sources.append(options["from"])
            for written in sources:
                image = substitute(written, global_args)
                if image.lower() in stages or image.isdigit() or not image:
                    continue
                bases.append(Base(image, index, written))
    return bases


def pin(text: str, resolved: Mapping[str, str], build_args: Mapping[str, str] | None = None) -> str:
    """The Dockerfile with each base named by its digest (``image`` → ``image@digest``).

    ``resolved`` maps each base as :func:`find_bases` reports it to its digest; lines
    without a base keep their exact text.
    """
    lines = text.splitlines(keepends=True)
    steps = instructions(text)
    for base in reversed(find_bases(text, build_args)):
        digest = resolved.get(base.image)
        if not digest or "@" in base.image:
            continue
        step = steps[base.instruction]
        pinned = f"{_without_digest(base.image)}@{digest}"
        for number in range(step.start, step.end):
            line = lines[number]
            replaced = _replace_word(line, base.written, pinned)
            if replaced != line:
                lines[number] = replaced
                break
    return "".join(lines)


def _without_digest(image: str) -> str:
    return image.split("@", 1)[0]


def _replace_word(line: str, word: str, replacement: str) -> str:
    # Only a whole word (or a --from= / from= value): "FROM base" must not touch "base2".
    pattern = re.compile(rf"(?<![^\s=,]){re.escape(word)}(?![^\s,])")
    return pattern.sub(lambda _: replacement, line, count=1)


def parse_base(image: str) -> ImageRef:
    """A base reference parsed, with a message about the Dockerfile when it is malformed."""
    try:
        return parse_image_ref(image)
    except InputError as exc:
        raise InputError(f"the Dockerfile's base image {image!r} is not a valid reference: "
                         f"{exc.message}", exc.hint) from None


#: Looks up the digest ``ref`` resolves to in its registry now (None: no such image).
Lookup = Callable[[ImageRef], "str | None"]


class DigestCache:
    """Reference → digest for a short while, per process: a burst of requests for one
    base costs one registry round trip, and a moved tag is seen within ``ttl`` seconds."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._entries: dict[str, tuple[float, str]] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> str | None:
        if self.ttl <= 0:
            return None
        with self._lock:
            hit = self._entries.get(key)
        if hit is None or time.monotonic() - hit[0] >= self.ttl:
            return None
        return hit[1]

    def put(self, key: str, digest: str) -> None:
        if self.ttl > 0:
            with self._lock:
                self._entries[key] = (time.monotonic(), digest)


def resolve(bases: Iterable[Base], lookup: Lookup, cache: DigestCache) -> dict[str, str]:
    """Each distinct base → its digest; a base written with a digest costs no request."""
    resolved: dict[str, str] = {}
    for base in bases:
        if base.image in resolved:
            continue
        ref = parse_base(base.image)
        if ref.digest:
            resolved[base.image] = ref.digest
            continue
        key = str(ref if ref.tag else ref.tagged("latest"))
        digest = cache.get(key)
        if digest is None:
            digest = lookup(ref if ref.tag else ref.tagged("latest"))
            if digest is None:
                raise BuildError(f"the base image {base.image} does not exist in its registry "
                                 f"({ref.registry}).",
                                 "Check the name and tag in the Dockerfile's FROM, or push the "
                                 "image first; --base-policy tag builds without resolving it.")
            cache.put(key, digest)
        resolved[base.image] = digest
    return resolved
