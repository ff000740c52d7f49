"""What a request and its launch-config say about a generated Dockerfile."""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from config.errors import InputError

if TYPE_CHECKING:
    from config.schema import LaunchConfig

_VERSION_RE = re.compile(r"^\d+\.\d+(?:\.\d+)?$")


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
    #: Optional-dependency groups (extras) of the project to install too, sorted.
    extras: tuple[str, ...] = ()

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
            extras=tuple(sorted(set(pip.extras or ()))) if pip is not None else (),
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
