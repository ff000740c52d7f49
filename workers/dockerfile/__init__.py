"""A Dockerfile for a Python project that has none.

The text is a pure function of the project's files and the request's options (never
of the host, the user, the locale or buildq's version): it is hashed into the source
hash, so two identical requests from anywhere must produce byte-identical text to
share one build.

One module per decision: :mod:`.job` reads a W&B job's ``wandb-job.json``;
:mod:`.styles` finds the packaging style and how dependencies get in (with
:mod:`.locks` turning a lockfile into pins); :mod:`.python` picks the Python;
:mod:`.start` the command; :mod:`.render` writes the text. :func:`plan` puts them
together, with what the record says about it and the default ``.dockerignore``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from config.errors import ConfigError, InputError, SourceError
from workers.context import DEFAULT_DOCKERIGNORE, BuildInputs, context_files, has_ignore_file
from workers.dockerfile.job import FROZEN_REQUIREMENTS, JOB_FILE, Job, read_job
from workers.dockerfile.locks import supports
from workers.dockerfile.options import PythonOptions, check_python, parse_entrypoint
from workers.dockerfile.project import Project
from workers.dockerfile.python import DEFAULT_PYTHON, KNOWN_PYPYS, KNOWN_PYTHONS, PythonChoice, detect_python
from workers.dockerfile.render import APP_UID, APP_USER, VENV, WORKDIR, Recipe, render
from workers.dockerfile.start import ENTRY_SCRIPTS, WEB_PORT, decide_start
from workers.dockerfile.styles import Dependencies, detect_dependencies, read_requirement_files

__all__ = [
    "APP_UID", "APP_USER", "DEFAULT_PYTHON", "DOCKERFILE", "ENTRY_SCRIPTS", "KNOWN_PYPYS",
    "KNOWN_PYTHONS", "PYTHON_PLACEHOLDER", "VENV", "WEB_PORT", "WORKDIR", "Plan", "PythonOptions",
    "check_python", "dockerfile_for", "generate", "has_dockerfile", "needs_plan",
    "parse_entrypoint", "plan", "plan_for",
]

#: The name the generated Dockerfile has in the build context.
DOCKERFILE = "Dockerfile"
#: The placeholder a configured base image may hold for the Python version.
PYTHON_PLACEHOLDER = "{python}"
_ENV_FILE = re.compile(r"(^|/)\.env(\.[^/]*)?$")


@dataclass(frozen=True)
class Plan:
    """How a project without a Dockerfile is built, and what its record says of it."""

    #: The generated Dockerfile; None when a W&B job names its own (``dockerfile``).
    text: str | None
    dockerfile: str | None = None
    #: The directory inside the source that is the context (a job's build_context).
    context: str | None = None
    #: "locked", "resolved" or "none"; None when the job's own Dockerfile decides.
    dependencies: str | None = None
    lock: str | None = None
    #: The job description the build followed (``wandb-job.json``), if any.
    job: str | None = None
    style: str | None = None
    #: The default ignore patterns the build uses (empty when the project has its own).
    ignore: tuple[str, ...] = ()
    warnings: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        """What the build's state carries (JSON), without the text (kept beside it)."""
        return {"dockerfile": self.dockerfile, "context": self.context,
                "dependencies": self.dependencies, "lock": self.lock, "job": self.job,
                "style": self.style, "ignore": list(self.ignore), "warnings": list(self.warnings)}


def has_dockerfile(root: Path) -> bool:
    """Whether the project brings its own Dockerfile (then nothing is generated)."""
    return os.path.lexists(os.path.join(root, DOCKERFILE))


def _needs_python(options: PythonOptions, job: Job | None) -> bool:
    if job is not None and job.base_image:
        return False
    configured = options.accelerator_base_image if options.gpu else options.base_image
    return not configured or PYTHON_PLACEHOLDER in configured


def _base_image(options: PythonOptions, job: Job | None, python: PythonChoice | None,
                ) -> tuple[str, str]:
    """The FROM image and a note saying where it came from."""
    if job is not None and job.base_image:
        if options.python:
            raise InputError(f"--python {options.python} cannot change the job's base image "
                             f"({job.base_image}).", "Drop --python.")
        return job.base_image, f"{JOB_FILE} source.base_image"
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
            if python.implementation != "cpython":
                raise SourceError(f"{python.source} asks for PyPy {python.version}, and {key} "
                                  f"({configured}) is a CPython image by version.",
                                  f"Set {key} to a PyPy image without {PYTHON_PLACEHOLDER}, or pass "
                                  "--python for a CPython version.")
            return configured.replace(PYTHON_PLACEHOLDER, python.version), \
                f"{key}, Python {python.version} from {python.source}"
        if options.python:
            raise InputError(f"--python {options.python} cannot change {key} ({configured}).",
                             f"Drop --python, or write {PYTHON_PLACEHOLDER} into {key} where "
                             "the version goes.")
        return configured, key
    assert python is not None
    if python.implementation == "pypy":
        return f"pypy:{python.version}-slim", f"official image, PyPy {python.version} from {python.source}"
    return f"python:{python.version}-slim", f"official image, Python {python.version} from {python.source}"


def _job_dependencies(project: Project, extras: tuple[str, ...]) -> Dependencies:
    """A job installs its run's ``pip freeze`` exactly; without one, the project's own style."""
    if not project.is_file(FROZEN_REQUIREMENTS):
        return detect_dependencies(project, extras)
    files = read_requirement_files(project, FROZEN_REQUIREMENTS)
    return Dependencies(
        style="wandb job", mode="locked", lock=FROZEN_REQUIREMENTS,
        note=f"the run's own pip freeze ({FROZEN_REQUIREMENTS}), exactly",
        copy=tuple(files.files), requirement_file=FROZEN_REQUIREMENTS, file_no_deps=True,
        names=frozenset(files.names), git_for=tuple(sorted(files.git)))


def _pip(root: Path, options: PythonOptions, deps: Dependencies) -> tuple[tuple[str, ...], str | None,
                                                                           list[str]]:
    pip = ["python", "-m", "pip", "install", "--no-cache-dir"]
    warnings: list[str] = []
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
        if deps.indexes:
            warnings.append(f"{deps.lock} installs from {', '.join(deps.indexes)}; builder.pip."
                            "index-url replaces it, so the pins must be found there.")
    extra = [*options.extra_index_urls]
    if not options.index_url and not wheels:
        extra += [i for i in deps.indexes if i not in extra]
    for url in extra:
        pip += ["--extra-index-url", url]
    return tuple(pip), wheels, warnings


def _ignore(root: Path, wheels: str | None) -> tuple[tuple[str, ...], str | None, list[str]]:
    """Default ignore patterns (when the project has none), the comment, and warnings."""
    if has_ignore_file(root):
        found = [rel for rel in context_files(root, BuildInputs()) if _ENV_FILE.search(rel)]
        warnings = [f"{rel} is copied into the image: the project's .dockerignore lets it through "
                    "(a .env file usually holds secrets)." for rel in found[:5]]
        return (), None, warnings
    patterns = list(DEFAULT_DOCKERIGNORE)
    if wheels:
        # The configured wheelhouse is an input of the build, whatever its name.
        patterns += [f"!{wheels}", f"!{wheels}/**"]
    note = "buildq's default .dockerignore, as the project has none:\n#   " + "\n#   ".join(
        " ".join(patterns[i:i + 8]) for i in range(0, len(patterns), 8))
    return tuple(patterns), note, []


def plan(root: Path, options: PythonOptions) -> Plan:
    """How the project at ``root`` is built; errors say what the project lacks."""
    project = Project(root)
    job = read_job(project)
    if job is not None and job.dockerfile is not None:
        return Plan(None, dockerfile=job.dockerfile, context=job.build_context, job=JOB_FILE,
                    style="wandb job")
    deps = _job_dependencies(project, options.extras) if job is not None else \
        detect_dependencies(project, options.extras)
    python: PythonChoice | None = None
    if _needs_python(options, job):
        pins = deps.pins if deps.locked_pins else ()
        python = detect_python(project, options.python, job.python if job is not None else None,
                               built_for=(lambda minor: supports(pins, minor)) if pins else None)
    base, base_note = _base_image(options, job, python)
    start = decide_start(project, options.entrypoint, job, deps)
    pip, wheels, warnings = _pip(root, options, deps)
    ignore, context_note, ignore_warnings = _ignore(root, wheels)
    python_check = None
    if job is not None and job.python is not None and python is None and not options.python:
        python_check = job.python.minor
    interpreter = "pypy3" if python is not None and python.implementation == "pypy" else "python3"
    all_warnings = tuple([*warnings, *ignore_warnings])
    text = render(Recipe(base=base, base_note=base_note, interpreter=interpreter, deps=deps,
                         start=start, pip=pip, wheels=wheels, context_note=context_note,
                         warnings=all_warnings, python_check=python_check))
    return Plan(text, dependencies=deps.mode, lock=deps.lock, job=JOB_FILE if job is not None else None,
                style=deps.style, ignore=ignore, warnings=all_warnings)


def needs_plan(root: Path, dockerfile: str | None) -> bool:
    """Whether a request needs a generated Dockerfile: it names none, and none is present."""
    return not dockerfile and not has_dockerfile(root)


def plan_for(root: Path, dockerfile: str | None, options: PythonOptions) -> Plan | None:
    """The plan when this request needs one (see :func:`needs_plan`)."""
    return plan(root, options) if needs_plan(root, dockerfile) else None


def generate(root: Path, options: PythonOptions) -> str:
    """The generated Dockerfile text for the project at ``root``."""
    found = plan(root, options)
    if found.text is None:
        raise InputError(f"{JOB_FILE} names its own Dockerfile ({found.dockerfile}); nothing is generated.",
                         "Builds use that Dockerfile; see it in the project.")
    return found.text


def dockerfile_for(root: Path, dockerfile: str | None, options: PythonOptions) -> str | None:
    """The generated text when this request needs one: no Dockerfile named and none present."""
    found = plan_for(root, dockerfile, options)
    return found.text if found is not None else None
