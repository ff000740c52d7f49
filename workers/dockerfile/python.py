"""Which Python a generated image runs, and where that was read.

In order: ``--python``; a W&B job's ``runtime``; ``.python-version``; ``runtime.txt``;
Pipfile's ``[requires]``; ``requires-python`` or Poetry's ``python`` constraint (the
newest known minor it admits, and for which the lock has the wheels it needs); else
:data:`DEFAULT_PYTHON`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from packaging.specifiers import InvalidSpecifier, SpecifierSet

from config.errors import SourceError
from workers.dockerfile.constraints import poetry_specifiers
from workers.dockerfile.project import Project

#: Python used when neither an option nor the project says which. Changing it changes
#: every generated Dockerfile that relied on it (and so their tags): do it deliberately.
DEFAULT_PYTHON = "3.12"
#: Minor versions with an official ``python:<v>-slim`` image, oldest first; a version
#: range is resolved to the newest of these it admits.
KNOWN_PYTHONS = ("3.8", "3.9", "3.10", "3.11", "3.12", "3.13", "3.14")
#: Minor versions with an official ``pypy:<v>-slim`` image.
KNOWN_PYPYS = ("3.9", "3.10", "3.11")

# An interpreter as pyenv, uv, asdf and Heroku write it: "3.11", "3.11.4", "cpython@3.11",
# "cpython-3.11.9-linux-x86_64-gnu", "pypy3.10", "pypy3.10-7.3.12", "3.13t", "python-3.9.1".
_SPEC_RE = re.compile(
    r"^(?:(?P<impl>cpython|pypy|python)[-@]?)?"
    r"(?P<version>\d+(?:\.\d+){0,2}(?:(?:a|b|rc)\d+)?)(?P<threaded>t)?(?P<rest>[-+].*)?$",
    re.IGNORECASE)
_RUNTIME_RE = re.compile(r"^(?:(?P<impl>cpython|pypy)\s+)?(?P<version>\d+\.\d+(?:\.\d+)?)\b",
                         re.IGNORECASE)


@dataclass(frozen=True)
class PythonChoice:
    """A Python version, its implementation, and the file or option it came from."""

    version: str
    source: str
    implementation: str = "cpython"

    @property
    def minor(self) -> str:
        return ".".join(self.version.split(".")[:2])


def parse_interpreter(text: str, where: str) -> PythonChoice:
    """One interpreter name as version files write it; a clear refusal for what has no image."""
    raw = text.strip()
    match = _SPEC_RE.match(raw)
    if match is None:
        raise SourceError(
            f"{where} asks for {raw!r}, which is not a CPython or PyPy version buildq can build on.",
            "Write a version like 3.11 (or pypy3.10), or set builder.base-image to an image "
            "with that Python.")
    impl = (match.group("impl") or "cpython").lower()
    version = match.group("version")
    rest = match.group("rest") or ""
    if impl == "python":
        impl = "cpython"
    if impl == "pypy" and "." not in version:
        raise SourceError(f"{where} asks for {raw!r}: name the Python version PyPy implements.",
                          "Write it like pypy3.10.")
    if "freethreaded" in rest.lower():
        threaded = True
    else:
        threaded = bool(match.group("threaded"))
        # uv writes the platform after the version ("-linux-x86_64-gnu"), pyenv PyPy's own
        # release ("pypy3.10-7.3.12"); anything else ("3.12-dev", "3.11.4-debug") is a
        # build no official image is tagged with.
        if rest and impl == "cpython" and not re.match(r"^-(linux|macos|windows)\b", rest.lower()):
            raise SourceError(f"{where} asks for {raw!r}, which has no official image.",
                              "Write a released version like 3.12, or set builder.base-image.")
    if version.count(".") == 0:
        raise SourceError(f"{where} asks for Python {version!r} without a minor version.",
                          "Write it like 3.11.")
    if version.split(".")[0] != "3":
        raise SourceError(f"{where} asks for Python {version}; generated Dockerfiles need Python 3.",
                          "Move the project to Python 3, or add a Dockerfile.")
    if threaded:
        raise SourceError(
            f"{where} asks for {raw!r}, a free-threaded CPython: there is no official "
            "python image of it.",
            "Set builder.base-image to an image with a free-threaded build, or use the "
            "regular build (drop the 't').")
    if impl == "pypy":
        minor = ".".join(version.split(".")[:2])
        if minor not in KNOWN_PYPYS:
            raise SourceError(f"{where} asks for PyPy {minor}; official pypy images exist for "
                              f"{', '.join(KNOWN_PYPYS)}.",
                              "Pick one of those, or set builder.base-image to a PyPy image.")
        # PyPy images are tagged by the Python version only; PyPy's own patch is not a tag.
        return PythonChoice(minor, where, "pypy")
    return PythonChoice(version, where, "cpython")


def _from_version_file(project: Project, rel: str) -> PythonChoice | None:
    text = project.text(rel)
    if text is None:
        return None
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line == "system":
            continue
        return parse_interpreter(line, rel)
    return None


def from_runtime(runtime: str, where: str) -> PythonChoice:
    """A W&B job's ``runtime`` ("3.11.2", "CPython 3.11.2"), to its minor version.

    The minor only, as the reference builder does: any patch of it runs the job, and the
    minor's image always exists.
    """
    match = _RUNTIME_RE.match(runtime.strip())
    if match is None:
        raise SourceError(f"{where} runtime {runtime!r} is not a Python version.",
                          "Pass --python, or fix the job's runtime (e.g. \"3.11.2\").")
    impl = (match.group("impl") or "cpython").lower()
    minor = ".".join(match.group("version").split(".")[:2])
    return parse_interpreter(("pypy" if impl == "pypy" else "") + minor, where)


def _from_pipfile(project: Project) -> PythonChoice | None:
    requires = (project.toml("Pipfile") or {}).get("requires")
    if not isinstance(requires, dict):
        return None
    for key in ("python_full_version", "python_version"):
        value = requires.get(key)
        if isinstance(value, str) and value.strip() and value.strip() != "*":
            return parse_interpreter(value, f"Pipfile [requires] {key}")
    return None


def newest_admitted(specs: list[SpecifierSet], where: str, known: tuple[str, ...] = KNOWN_PYTHONS,
                    built_for: Callable[[str], bool] | None = None) -> tuple[str, bool]:
    """The newest known minor some patch of which the union of ``specs`` admits, preferring
    one ``built_for`` accepts (the lock has wheels for it); and whether that preference held."""
    def admits(minor: str) -> bool:
        return any(s.contains(f"{minor}.0", prereleases=True) or s.contains(f"{minor}.99", prereleases=True)
                   for s in specs)

    fits = [v for v in known if admits(v)]
    if not fits:
        raise SourceError(f"{where} admits none of the Python versions buildq knows "
                          f"({', '.join(known)}).", "Pass --python, or set builder.base-image.")
    if built_for is not None:
        built = [v for v in fits if built_for(v)]
        if built and built[-1] != fits[-1]:
            return built[-1], True
    return fits[-1], False


def _from_ranges(project: Project, built_for: Callable[[str], bool] | None) -> PythonChoice | None:
    requires = project.table("project").get("requires-python")
    poetry = project.table("tool", "poetry", "dependencies").get("python")
    if isinstance(requires, str) and requires.strip():
        try:
            specs = [SpecifierSet(requires)]
        except InvalidSpecifier:
            raise SourceError(f"pyproject.toml requires-python {requires!r} is not a version range.",
                              "Write it like \">=3.10\", or pass --python.") from None
        where, value = "pyproject.toml requires-python", requires
    elif isinstance(poetry, str) and poetry.strip():
        where, value = "pyproject.toml [tool.poetry.dependencies] python", poetry
        specs = poetry_specifiers(poetry, where)
    else:
        return None
    minor, narrowed = newest_admitted(specs, f"{where} {value!r}", built_for=built_for)
    return PythonChoice(minor, f"{where} and the lock's wheels" if narrowed else where)


def detect_python(project: Project, option: str | None, job_runtime: PythonChoice | None,
                  built_for: Callable[[str], bool] | None = None) -> PythonChoice:
    """The project's Python and where it was read, in the documented order."""
    if option:
        return PythonChoice(option, "--python")
    if job_runtime is not None:
        return job_runtime
    for found in (_from_version_file(project, ".python-version"),
                  _from_version_file(project, "runtime.txt"),
                  _from_pipfile(project),
                  _from_ranges(project, built_for)):
        if found is not None:
            return found
    return PythonChoice(DEFAULT_PYTHON, "buildq's default")
