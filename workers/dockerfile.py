"""A Dockerfile for a Python project that has none.

The text is a pure function of the project's files and the request's options (never
of the host, the user, the locale or buildq's version): it is hashed into the source
hash, so two identical requests from anywhere must produce byte-identical text to
share one build.

Layout of what is generated, and why:

* ``FROM`` the configured base (``builder.base-image``; ``builder.accelerator.base-image``
  for GPU jobs), else the official ``python:<version>-slim`` for the project's Python
  version (``--python``, else ``.python-version``, ``requires-python`` in
  ``pyproject.toml``, ``runtime.txt``, else :data:`DEFAULT_PYTHON`). A configured base may
  contain ``{python}``, replaced by that version, so a registry mirror can follow it.
* A virtualenv at ``/opt/venv`` with the base's site-packages visible: pip may install
  into it even on bases whose system Python is "externally managed" (Debian, PEP 668),
  and packages a CUDA/PyTorch base ships stay importable.
* A non-root user with a fixed uid (:data:`APP_UID`), so Kubernetes' ``runAsNonRoot``
  can verify it without a passwd lookup and files it writes have a predictable owner.
* Dependencies in their own layer, before the source is copied: only the requirement
  files (or, for ``pyproject.toml``, the dependency list written into the RUN line) are
  inputs of that layer, so editing code reuses it and editing dependencies rebuilds it.
* The source, then the project itself (``pyproject.toml`` projects), then an exec-form
  ``ENTRYPOINT``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from config.errors import ConfigError, InputError, SourceError

if TYPE_CHECKING:
    from config.schema import LaunchConfig

#: The name the generated Dockerfile has in the build context.
DOCKERFILE = "Dockerfile"
#: Python used when neither an option nor the project says which. Changing it changes
#: every generated Dockerfile that relied on it (and so their tags): do it deliberately.
DEFAULT_PYTHON = "3.12"
#: Minor versions with an official ``python:<v>-slim`` image, oldest first; a
#: ``requires-python`` range is resolved against these.
KNOWN_PYTHONS = ("3.8", "3.9", "3.10", "3.11", "3.12", "3.13")
#: uid and gid of the user the image runs as.
APP_UID = 10001
APP_USER = "app"
WORKDIR = "/app"
VENV = "/opt/venv"
#: The placeholder a configured base image may hold for the Python version.
PYTHON_PLACEHOLDER = "{python}"
#: Files the project is inferred from are small; anything bigger is not what we think.
MAX_PROJECT_FILE = 1 << 20
#: Scripts tried, in this order, when no entrypoint is given and none can be read from
#: ``pyproject.toml``.
ENTRY_SCRIPTS = ("main.py", "train.py", "app.py")

_VERSION_RE = re.compile(r"^\d+\.\d+(?:\.\d+)?$")
_LEADING_VERSION_RE = re.compile(r"^(?:python-?)?(\d+\.\d+(?:\.\d+)?)\b")
# pip options inside a requirements file that name another file pip will read.
_INCLUDE_RE = re.compile(r"^(?:-r|-c|--requirement|--constraint)(?:\s*=\s*|\s+|(?=[^\s-]))(\S+)")
_LOCAL_REQ_RE = re.compile(r"^(?:-e|--editable)\b|^(?:\.{1,2}(?:/|$)|/|file:)")
#: PATH inside the image: the venv first, then the base's own PATH (a plain rootfs
#: imported with ``docker import`` has none, hence the usual default).
_PATH = "/opt/venv/bin:${PATH:-/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin}"


@dataclass(frozen=True)
class PythonOptions:
    """What a request and its launch-config say about generating a Dockerfile."""

    entrypoint: tuple[str, ...] | None = None
    python: str | None = None
    gpu: bool = False
    base_image: str | None = None
    accelerator_base_image: str | None = None
    index_url: str | None = None
    extra_index_urls: tuple[str, ...] = ()
    wheels: str | None = None

    @classmethod
    def create(cls, cfg: LaunchConfig | None, *, entrypoint: str | Sequence[str] | None = None,
               python: str | None = None, gpu: bool = False) -> PythonOptions:
        """The request's options over the config's (an ``--entrypoint`` beats builder.entrypoint)."""
        builder = cfg.builder if cfg is not None else None
        pip = builder.pip if builder is not None else None
        accelerator = builder.accelerator if builder is not None else None
        chosen = parse_entrypoint(entrypoint, "--entrypoint")
        if chosen is None and builder is not None:
            chosen = parse_entrypoint(builder.entrypoint, "builder.entrypoint")
        return cls(
            entrypoint=chosen,
            python=check_python(python),
            gpu=bool(gpu),
            base_image=builder.base_image if builder is not None else None,
            accelerator_base_image=accelerator.base_image if accelerator is not None else None,
            index_url=pip.index_url if pip is not None else None,
            extra_index_urls=tuple(pip.extra_index_urls or ()) if pip is not None else (),
            wheels=pip.wheels if pip is not None else None,
        )


def parse_entrypoint(value: str | Sequence[str] | None, what: str) -> tuple[str, ...] | None:
    """An entrypoint as argv: a string is split like a POSIX shell would, a list is kept."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            argv = shlex.split(value)
        except ValueError as exc:
            raise InputError(f"{what} {value!r} cannot be split into arguments ({exc}).",
                             "Quote it like a shell command, e.g. \"python train.py --lr 0.1\".") from None
    else:
        argv = [str(part) for part in value]
    if not argv or not argv[0]:
        raise InputError(f"{what} is empty.", "Give the command the image runs, e.g. \"python train.py\".")
    return tuple(argv)


def check_python(version: str | None) -> str | None:
    """``--python`` as given, if it names a version an official image can be tagged with."""
    if version is None:
        return None
    version = version.strip().removeprefix("python").strip()
    if not _VERSION_RE.match(version):
        raise InputError(f"--python {version!r} is not a Python version.",
                         "Write it as MAJOR.MINOR or MAJOR.MINOR.PATCH, e.g. --python 3.11.")
    return version


# --- reading the project -----------------------------------------------------------------


def _read_text(root: Path, rel: str) -> str | None:
    """A small regular file of the project, or None if absent.

    Never follows a symlink out of the project: on a build host the project came from a
    git URL or an archive, and its ``pyproject.toml`` must not read the host's files.
    """
    real_root = os.path.realpath(root)
    path = os.path.realpath(os.path.join(real_root, rel))
    if not path.startswith(real_root + os.sep):
        raise SourceError(f"{rel!r} resolves outside the project.",
                          "Replace the symlink with the file itself.")
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    if st.st_size > MAX_PROJECT_FILE:
        raise SourceError(f"{rel!r} is larger than {MAX_PROJECT_FILE} bytes.",
                          "Is it really the file buildq expects there?")
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def _exists(root: Path, rel: str) -> bool:
    return os.path.lexists(os.path.join(root, rel))


def has_dockerfile(root: Path) -> bool:
    """Whether the project brings its own Dockerfile (then nothing is generated)."""
    return _exists(root, DOCKERFILE)


def _pyproject(root: Path) -> dict[str, Any] | None:
    text = _read_text(root, "pyproject.toml")
    if text is None:
        return None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SourceError(f"pyproject.toml is not valid TOML ({exc}).",
                          "Fix it, or add a Dockerfile.") from None


def _python_from_requires(spec: str) -> str | None:
    """The known Python a ``requires-python`` range admits, nearest the default.

    Nearest the default rather than the newest: the answer must not move when a newer
    Python is added to :data:`KNOWN_PYTHONS`, or existing projects would change tag.
    """
    from packaging.specifiers import InvalidSpecifier, SpecifierSet

    try:
        allowed = SpecifierSet(spec)
    except InvalidSpecifier:
        raise SourceError(f"pyproject.toml requires-python {spec!r} is not a version range.",
                          "Write it like \">=3.10\", or pass --python.") from None
    fits = [v for v in KNOWN_PYTHONS if allowed.contains(v, prereleases=True)]
    if not fits:
        return None
    default = KNOWN_PYTHONS.index(DEFAULT_PYTHON)
    return min(fits, key=lambda v: (abs(KNOWN_PYTHONS.index(v) - default),
                                    -KNOWN_PYTHONS.index(v)))


def detect_python(root: Path, pyproject: dict[str, Any] | None) -> tuple[str, str]:
    """The project's Python version and where it was read, in the documented order."""
    text = _read_text(root, ".python-version")
    if text is not None:
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            match = _LEADING_VERSION_RE.match(line)
            if match:
                return match.group(1), ".python-version"
    project = (pyproject or {}).get("project")
    requires = project.get("requires-python") if isinstance(project, dict) else None
    if isinstance(requires, str) and requires.strip():
        found = _python_from_requires(requires)
        if found is None:
            raise SourceError(
                f"pyproject.toml requires-python {requires!r} admits none of the Python "
                f"versions buildq knows ({', '.join(KNOWN_PYTHONS)}).",
                "Pass --python, or set builder.base-image.")
        return found, "pyproject.toml requires-python"
    text = _read_text(root, "runtime.txt")
    if text is not None:
        match = _LEADING_VERSION_RE.match(text.strip())
        if match:
            return match.group(1), "runtime.txt"
    return DEFAULT_PYTHON, "buildq's default"


def _requirement_files(root: Path, first: str) -> list[str]:
    """``first`` and every file it includes with -r/-c, as project-relative paths."""
    seen: list[str] = []
    todo = [first]
    while todo:
        rel = todo.pop(0)
        if rel in seen:
            continue
        text = _read_text(root, rel)
        if text is None:
            raise SourceError(f"{seen[-1] if seen else first!r} includes {rel!r}, which is not in "
                              "the project.", "Add the file or remove the -r/-c line.")
        seen.append(rel)
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.split(" #", 1)[0].strip()
            if not line or line.startswith("#"):
                continue
            if _LOCAL_REQ_RE.match(line):
                # The dependency layer is built before the source is copied.
                raise SourceError(
                    f"{rel} line {number} installs from the project itself ({line!r}), which "
                    "the generated Dockerfile cannot do before copying the source.",
                    "Remove that line (a pyproject.toml project without requirements.txt is "
                    "installed for you), or add a Dockerfile.")
            match = _INCLUDE_RE.match(line)
            if match:
                target = PurePosixPath(rel).parent / match.group(1)
                parts = [p for p in target.parts if p not in ("", ".")]
                if target.is_absolute() or ".." in parts:
                    raise SourceError(f"{rel} line {number} includes {match.group(1)!r} from "
                                      "outside the project.", "Keep requirement files inside it.")
                todo.append("/".join(parts))
    return seen


def _project_dependencies(pyproject: dict[str, Any]) -> list[str] | None:
    """``[project] dependencies`` when they are static; None when only pip can know them."""
    project = pyproject.get("project")
    if not isinstance(project, dict) or "dependencies" in (project.get("dynamic") or []):
        return None
    deps = project.get("dependencies", [])
    if not isinstance(deps, list) or not all(isinstance(d, str) for d in deps):
        raise SourceError("pyproject.toml [project] dependencies is not a list of strings.",
                          "Fix it, or add a Dockerfile.")
    # Sorted: the layer depends on the set of requirements, not on how they were listed.
    return sorted(d.strip() for d in deps if d.strip())


def _scripts(pyproject: dict[str, Any]) -> list[str]:
    project = pyproject.get("project")
    scripts = project.get("scripts") if isinstance(project, dict) else None
    return sorted(scripts) if isinstance(scripts, dict) else []


# --- writing it --------------------------------------------------------------------------


def _json(argv: Sequence[str]) -> str:
    # Exec form: no shell parses the arguments, so nothing needs quoting or escaping.
    return json.dumps(list(argv))


def _base_image(options: PythonOptions, python: tuple[str, str] | None) -> tuple[str, str]:
    """The FROM image and a note saying where it came from."""
    configured: str | None
    if options.gpu:
        if not options.accelerator_base_image:
            raise ConfigError(
                "a GPU job needs a CUDA base image, and builder.accelerator.base-image is not set.",
                "Set builder.accelerator.base-image to a CUDA image with Python 3 "
                "(e.g. a pytorch/pytorch ...-cuda...-runtime tag), or add a Dockerfile.")
        configured, key = options.accelerator_base_image, "builder.accelerator.base-image"
    else:
        configured, key = options.base_image, "builder.base-image"
    if configured:
        if PYTHON_PLACEHOLDER in configured:
            assert python is not None
            return configured.replace(PYTHON_PLACEHOLDER, python[0]), \
                f"{key}, Python {python[0]} from {python[1]}"
        if options.python:
            raise InputError(f"--python {options.python} cannot change {key} ({configured}).",
                             f"Drop --python, or write {PYTHON_PLACEHOLDER} into {key} where "
                             "the version goes.")
        return configured, key
    assert python is not None
    return f"python:{python[0]}-slim", f"official image, Python {python[0]} from {python[1]}"


def _needs_python(options: PythonOptions) -> bool:
    configured = options.accelerator_base_image if options.gpu else options.base_image
    return not configured or PYTHON_PLACEHOLDER in configured


def generate(root: Path, options: PythonOptions) -> str:
    """The Dockerfile text for the project at ``root``; errors say what the project lacks."""
    pyproject = _pyproject(root)
    python: tuple[str, str] | None = None
    if _needs_python(options):
        if options.python:
            python = (options.python, "--python")
        else:
            python = detect_python(root, pyproject)
    base, base_note = _base_image(options, python)

    pip = ["python", "-m", "pip", "install", "--no-cache-dir"]
    wheels: str | None = None
    if options.wheels:
        wheels = options.wheels.strip("/")
        if not os.path.isdir(os.path.join(root, wheels)):
            raise SourceError(f"builder.pip.wheels names {options.wheels!r}, which is not a "
                              "directory in the project.",
                              "Put the wheels there, or remove builder.pip.wheels.")
        pip += ["--find-links", wheels]
        if not options.index_url:
            # Wheels without an index mean "offline": never reach out to PyPI behind them.
            pip.append("--no-index")
    if options.index_url:
        pip += ["--index-url", options.index_url]
    for extra in options.extra_index_urls:
        pip += ["--extra-index-url", extra]

    # Dependencies: requirements.txt wins; else a pyproject.toml project.
    deps_copy: list[str] = []
    deps_run: list[str] | None = None
    deps_note = ""
    install_project: list[str] | None = None
    if _read_text(root, "requirements.txt") is not None:
        deps_copy = _requirement_files(root, "requirements.txt")
        deps_run = [*pip, "-r", "requirements.txt"]
        deps_note = "from requirements.txt"
    elif pyproject is not None and ("project" in pyproject or "build-system" in pyproject):
        deps = _project_dependencies(pyproject)
        if deps is None:
            deps_note = ("pyproject.toml's dependencies are dynamic, so they are installed "
                         "with the project after the source")
            install_project = [*pip, "."]
        else:
            deps_note = "from pyproject.toml [project] dependencies"
            deps_run = [*pip, *deps] if deps else None
            install_project = [*pip, "--no-deps", "."]

    entrypoint = options.entrypoint
    if entrypoint is None:
        scripts = _scripts(pyproject) if install_project is not None and pyproject else []
        candidates = [name for name in ENTRY_SCRIPTS if _exists(root, name)]
        if len(scripts) == 1:
            entrypoint = (scripts[0],)
        elif len(candidates) == 1:
            entrypoint = ("python", candidates[0])
        else:
            found = (f"several candidates ({', '.join(scripts or candidates)})"
                     if len(scripts) > 1 or len(candidates) > 1 else "nothing to start")
            raise SourceError(
                f"the project has no Dockerfile and buildq cannot tell how to start it: "
                f"no --entrypoint, no builder.entrypoint, and {found}.",
                "Pass --entrypoint \"python train.py\" (or set builder.entrypoint), add a "
                f"{' / '.join(ENTRY_SCRIPTS)}, a single [project.scripts] entry in "
                "pyproject.toml, or a Dockerfile.")

    lines = [
        "# Generated by buildq for a Python project without a Dockerfile.",
        f"# Base: {base_note}.",
        "# Keep and edit it with: buildq dockerfile SOURCE --save",
        f"FROM {base}",
        "",
        "ENV PYTHONDONTWRITEBYTECODE=1 \\",
        "    PYTHONUNBUFFERED=1 \\",
        "    PIP_NO_CACHE_DIR=1 \\",
        "    PIP_DISABLE_PIP_VERSION_CHECK=1 \\",
        f"    VIRTUAL_ENV={VENV} \\",
        f"    PATH=\"{_PATH}\"",
        "# A virtualenv: pip may install here even where the system Python is externally",
        "# managed, and the base's own packages (e.g. CUDA builds of PyTorch) stay visible.",
        f"RUN {_json(['python3', '-m', 'venv', '--system-site-packages', VENV])}",
        "# A fixed uid, so runAsNonRoot can check it and written files have a known owner.",
        # shadow's tools on Debian/Ubuntu bases, busybox's on Alpine ones.
        f"RUN (groupadd --gid {APP_UID} {APP_USER} && useradd --uid {APP_UID} --gid {APP_UID} "
        f"--create-home --home-dir /home/{APP_USER} --shell /bin/sh {APP_USER} \\",
        f"     || (addgroup -g {APP_UID} {APP_USER} && adduser -D -u {APP_UID} -G {APP_USER} "
        f"-h /home/{APP_USER} -s /bin/sh {APP_USER})) \\",
        f"    && install -d -o {APP_UID} -g {APP_UID} {WORKDIR}",
        f"WORKDIR {WORKDIR}",
        "",
    ]
    if deps_run is not None or wheels:
        lines.append(f"# Dependencies ({deps_note}), in their own layer before the source.")
        if wheels:
            lines.append(f"COPY {_json([wheels, wheels])}")
        for rel in deps_copy:
            lines.append(f"COPY {_json([rel, rel])}")
        if deps_run is not None:
            lines.append(f"RUN {_json(deps_run)}")
    elif deps_note:
        lines.append(f"# Dependencies: {deps_note}.")
    else:
        lines.append("# Dependencies: none (no requirements.txt or pyproject.toml).")
    lines += ["", "# The source, owned by the app user so the job can write in its directory.",
              f"COPY --chown={APP_UID}:{APP_UID} . ."]
    if install_project is not None:
        lines.append(f"RUN {_json(install_project)}")
    lines += [f"USER {APP_UID}:{APP_UID}", f"ENTRYPOINT {_json(entrypoint)}", ""]
    return "\n".join(lines)


def dockerfile_for(root: Path, dockerfile: str | None, options: PythonOptions) -> str | None:
    """The generated text when this request needs one: no Dockerfile named and none present."""
    if dockerfile or has_dockerfile(root):
        return None
    return generate(root, options)
