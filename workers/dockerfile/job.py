"""A W&B job's own description of its build: ``wandb-job.json`` beside the code.

The job was made from a run: ``source.entrypoint`` is how the run started,
``requirements.frozen.txt`` the run's exact ``pip freeze``, ``runtime`` its Python. A
job may instead name its own Dockerfile (``source.dockerfile``, relative to
``source.build_context``, itself relative to the project), which is then built as is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from config.errors import SourceError
from workers.dockerfile.project import Project, clean_relative
from workers.dockerfile.python import PythonChoice, from_runtime

JOB_FILE = "wandb-job.json"
#: The run's ``pip freeze``, written by W&B beside the job description.
FROZEN_REQUIREMENTS = "requirements.frozen.txt"
#: Uncommitted changes of a git job's run, which the reference agent applies before building.
DIFF_FILE = "diff.patch"
SOURCE_TYPES = ("artifact", "repo", "image")


@dataclass(frozen=True)
class Job:
    source_type: str
    entrypoint: tuple[str, ...] | None
    args: tuple[str, ...]
    dockerfile: str | None
    build_context: str | None
    base_image: str | None
    python: PythonChoice | None


def _strings(value: Any, what: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str | int | float) for v in value):
        raise SourceError(f"{JOB_FILE} {what} is not a list of strings.", "Fix the job description.")
    return tuple(str(v) for v in value)


def _text(value: Any, what: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise SourceError(f"{JOB_FILE} {what} is not a string.", "Fix the job description.")
    return value


def read_job(project: Project) -> Job | None:
    """The job described in the project, or None when it is not a W&B job."""
    data = project.json(JOB_FILE)
    if data is None:
        return None
    if not isinstance(data, dict):
        raise SourceError(f"{JOB_FILE} is not a JSON object.", "Is it a W&B job description?")
    source_type = data.get("source_type")
    source = data.get("source")
    if source_type not in SOURCE_TYPES or not isinstance(source, dict):
        raise SourceError(f"{JOB_FILE} has no source_type ({', '.join(SOURCE_TYPES)}) and source.",
                          "Is it a W&B job description? Remove it to build the project as it is.")
    if source_type == "image":
        image = source.get("image")
        raise SourceError(f"{JOB_FILE} describes an image job ({image}): there is nothing to build.",
                          f"Run it as the source image:{image}." if image else
                          "Give the job's image as the source image:<reference>.")
    if source.get("notebook"):
        raise SourceError(f"{JOB_FILE} describes a notebook job, which buildq does not convert "
                          "to a script.", "Export the notebook to a .py file and make the job from it, "
                          "or add a Dockerfile.")
    diff = project.text(DIFF_FILE)
    if diff is not None and diff.strip():
        raise SourceError(f"the job carries uncommitted changes of its run ({DIFF_FILE}), which "
                          "buildq does not apply: the image would not hold the code that ran.",
                          "Commit those changes and make the job again, or apply the patch to "
                          "the source and remove diff.patch.")
    dockerfile = _text(source.get("dockerfile"), "source.dockerfile")
    context = _text(source.get("build_context"), "source.build_context")
    if context is not None:
        context = clean_relative(context, f"{JOB_FILE} source.build_context") or None
        if context is not None and not project.is_dir(context):
            raise SourceError(f"{JOB_FILE} source.build_context {context!r} is not a directory of "
                              "the project.", "Fix the job's build_context.")
    if dockerfile is not None:
        dockerfile = clean_relative(dockerfile, f"{JOB_FILE} source.dockerfile")
        inside = f"{context}/{dockerfile}" if context else dockerfile
        if not dockerfile or not project.is_file(inside):
            raise SourceError(f"{JOB_FILE} names the Dockerfile {inside!r}, which is not in the project.",
                              "Fix the job's source.dockerfile (relative to its build_context).")
    runtime = _text(data.get("runtime"), "runtime")
    entrypoint = _strings(source.get("entrypoint"), "source.entrypoint")
    if entrypoint is not None and (not entrypoint or not entrypoint[0]):
        entrypoint = None
    return Job(
        source_type=str(source_type),
        entrypoint=entrypoint,
        args=_strings(source.get("args"), "source.args") or (),
        dockerfile=dockerfile,
        build_context=context,
        base_image=_text(source.get("base_image"), "source.base_image"),
        python=from_runtime(runtime, JOB_FILE) if runtime else None,
    )
