"""Image references and the cloud registry a destination points at.

The grammar follows the distribution reference format that Docker and every v2
registry accept, so a reference refused here would also be refused by the push;
refusing it at config time saves a build that could never be pushed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from config.errors import ConfigError

#: Registry used by Docker when a reference names no host.
DEFAULT_REGISTRY = "docker.io"

_HOST_LABEL = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST_RE = re.compile(rf"^{_HOST_LABEL}(?:\.{_HOST_LABEL})*(?::[0-9]+)?$")
_PATH_COMPONENT_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST_RE = re.compile(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[0-9a-fA-F]{32,}$")
#: Docker's limit on the whole name (host plus repository).
_MAX_NAME_LENGTH = 255

_ECR_HOST_RE = re.compile(
    r"^(?P<account>[0-9]{12})\.dkr\.ecr(?:-fips)?\.(?P<region>[a-z0-9-]+)\.amazonaws\.com(?:\.cn)?$"
)
_GAR_HOST_RE = re.compile(r"^(?P<region>[a-z0-9-]+)-docker\.pkg\.dev$")
_ACR_HOST_RE = re.compile(r"^(?P<name>[a-z0-9]+)\.azurecr\.(?:io|cn|us)$")


@dataclass(frozen=True)
class ImageRef:
    """A parsed image reference; ``registry`` is always explicit."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    def with_tag(self, tag: str) -> str:
        return f"{self.name}:{tag}"

    def tagged(self, tag: str) -> ImageRef:
        """The same repository under ``tag`` (no digest)."""
        return ImageRef(self.registry, self.repository, tag, None)

    def to_dict(self) -> dict[str, str | None]:
        """How a reference travels in a task's state (``dataclasses.asdict``'s shape)."""
        return {"registry": self.registry, "repository": self.repository, "tag": self.tag,
                "digest": self.digest}

    @classmethod
    def from_dict(cls, data: dict[str, str | None]) -> ImageRef:
        """The inverse of :meth:`to_dict`."""
        return cls(str(data["registry"]), str(data["repository"]), data.get("tag"), data.get("digest"))

    def __str__(self) -> str:
        text = self.name
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


@dataclass(frozen=True)
class RegistryKind:
    """Which registry API a reference needs, with the coordinates read from it."""

    kind: Literal["ecr", "gar", "acr", "v2"]
    account: str | None = None
    region: str | None = None
    project: str | None = None
    registry_name: str | None = None


def _refuse(text: str, key: str | None, expected: str, hint: str) -> ConfigError:
    where = f"{key}: " if key else ""
    return ConfigError(
        f"{where}found image reference {text!r}, expected {expected}.",
        hint,
    )


def _looks_like_host(component: str) -> bool:
    # Docker's own rule: the first component is a host only if it could not be a
    # repository name, i.e. it has a dot, a port, or is localhost.
    return "." in component or ":" in component or component == "localhost"


def _parse(text: str, key: str | None) -> ImageRef:
    if not text or text != text.strip():
        raise _refuse(
            text,
            key,
            "a non-empty reference without spaces, like registry.example.com/team/app",
            "Remove the surrounding spaces or fill in the reference.",
        )
    rest = text
    digest: str | None = None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not _DIGEST_RE.match(digest):
            raise _refuse(
                text,
                key,
                "a digest written algorithm:hex, like sha256:<64 hex digits>",
                "Copy the digest exactly as the registry reports it.",
            )
    tag: str | None = None
    last_slash = rest.rfind("/")
    colon = rest.rfind(":")
    # A colon after the last slash separates the tag; one before it is a port.
    if colon > last_slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG_RE.match(tag):
            raise _refuse(
                text,
                key,
                "a tag of at most 128 letters, digits, '_', '.' or '-', not starting "
                "with '.' or '-'",
                "Fix the tag after the last ':' or drop it.",
            )
    parts = rest.split("/")
    if len(parts) > 1 and _looks_like_host(parts[0]):
        registry, path = parts[0], parts[1:]
        if not _HOST_RE.match(registry):
            raise _refuse(
                text,
                key,
                "a registry host[:port] made of letters, digits, '-' and '.'",
                "Check the host name before the first '/'.",
            )
    else:
        registry, path = DEFAULT_REGISTRY, parts
        # Docker Hub keeps official images under "library/"; normalising here keeps
        # "ubuntu" and "docker.io/library/ubuntu" the same image.
        if len(path) == 1:
            path = ["library", *path]
    for component in path:
        if not component:
            raise _refuse(
                text,
                key,
                "repository path components that are not empty",
                "Remove the doubled or trailing '/'.",
            )
        if not _PATH_COMPONENT_RE.match(component):
            lower = component.lower()
            hint = (
                f"Registries only accept lowercase repository names: write {lower!r}."
                if lower != component and _PATH_COMPONENT_RE.match(lower)
                else "Use lowercase letters and digits, separated by '.', '_', '__' or '-'."
            )
            raise _refuse(
                text,
                key,
                f"a lowercase repository path; {component!r} is not a valid component",
                hint,
            )
    repository = "/".join(path)
    if len(registry) + 1 + len(repository) > _MAX_NAME_LENGTH:
        raise _refuse(
            text,
            key,
            f"a name of at most {_MAX_NAME_LENGTH} characters",
            "Shorten the repository path.",
        )
    return ImageRef(registry=registry, repository=repository, tag=tag, digest=digest)


def parse_image_ref(text: str) -> ImageRef:
    """Parse ``[host[:port]/]path[:tag][@digest]``; a missing host means Docker Hub."""
    return _parse(text, None)


def parse_destination(text: str, key: str = "builder.destination") -> ImageRef:
    """Parse where images are pushed: a repository with no tag, ``https://`` allowed.

    buildq chooses the tag itself (the source hash), so a tag here is a mistake
    that would otherwise be silently dropped.
    """
    if not isinstance(text, str):
        raise ConfigError(
            f"{key}: found {type(text).__name__}, expected a repository like "
            "registry.example.com/team/app.",
            f"Write {key} as a string.",
        )
    body = text
    if body.startswith("https://"):
        body = body[len("https://") :]
    elif "://" in body:
        scheme = body.split("://", 1)[0]
        raise _refuse(
            text,
            key,
            "a repository with no scheme (or https://), like registry.example.com/team/app",
            f"Drop the {scheme}:// prefix; plain-HTTP registries are listed in "
            "BUILDQ_INSECURE_REGISTRIES instead.",
        )
    body = body.rstrip("/")
    if "/" not in body and (":" in body or "." in body or body == "localhost"):
        # "host:5000" would otherwise read as Docker Hub's "host" with tag "5000".
        raise _refuse(
            text,
            key,
            "a registry host followed by a repository path",
            f"Add the repository after the host, e.g. {body}/my-app.",
        )
    ref = _parse(body, key)
    if ref.tag is not None or ref.digest is not None:
        raise ConfigError(
            f"{key}: found {text!r}, expected a repository without a tag or digest "
            "(destination must not carry a tag: buildq tags with the source hash).",
            f"Write {key}: {ref.name}",
        )
    return ref


def ecr_host_typo(ref: ImageRef) -> str | None:
    """The real ECR host for ``<account>.ecr.<region>.amazonaws.com``, else None.

    That shorter form appears in published agent docs but does not resolve, so a
    config copied from them would only fail at push time.
    """
    m = re.match(r"^([0-9]{12})\.ecr\.([a-z0-9-]+)\.amazonaws\.com$", ref.registry)
    if m is None:
        return None
    return f"{m.group(1)}.dkr.ecr.{m.group(2)}.amazonaws.com"


def classify_registry(ref: ImageRef) -> RegistryKind:
    """Tell ECR, Artifact Registry and ACR apart from a plain v2 registry by host."""
    host = ref.registry.lower()
    if m := _ECR_HOST_RE.match(host):
        return RegistryKind("ecr", account=m.group("account"), region=m.group("region"))
    if m := _GAR_HOST_RE.match(host):
        parts = ref.repository.split("/")
        project = parts[0] if parts else None
        repo = parts[1] if len(parts) > 1 else None
        return RegistryKind("gar", region=m.group("region"), project=project, registry_name=repo)
    if m := _ACR_HOST_RE.match(host):
        return RegistryKind("acr", registry_name=m.group("name"))
    return RegistryKind("v2")
