"""The launch-config as typed, frozen models.

Field aliases are the W&B launch-agent key names (hyphenated), so a user's
existing ``launch-config.yaml`` is read as is. The models check shapes and types
only; rules that span keys (regions that must agree, store schemes that must fit
the environment) live in :mod:`config.checking`, and the loader reports all of them at once.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from config.references import ImageRef, parse_destination

#: Kubernetes Job name used for kaniko builds when the config names none.
DEFAULT_BUILD_JOB_NAME = "launch-agent-build"

BuilderType = Literal["docker", "kaniko", "noop"]
EnvironmentType = Literal["aws", "gcp", "azure"]
LegacyRegistryType = Literal["ecr", "gcr", "acr", "local"]


class _Section(BaseModel):
    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        populate_by_name=True,
        str_strip_whitespace=True,
        strict=True,
    )


class Environment(_Section):
    """Where the agent runs; decides which credentials and stores fit."""

    type: EnvironmentType
    region: str | None = None
    project: str | None = None


class AcceleratorConfig(_Section):
    """What GPU jobs are built on when buildq writes their Dockerfile."""

    #: A CUDA image with Python 3; may contain ``{python}`` for the project's version.
    base_image: str | None = Field(default=None, alias="base-image")


class PipConfig(_Section):
    """Where generated Dockerfiles install Python packages from (no credentials: they
    would be baked into image history)."""

    index_url: str | None = Field(default=None, alias="index-url")
    extra_index_urls: list[str] | None = Field(default=None, alias="extra-index-urls")
    #: A directory of wheels inside the project; alone it means ``--no-index``.
    wheels: str | None = None
    #: Optional-dependency groups (extras) of the project that are installed too.
    extras: list[str] | None = None


#: How a Dockerfile's base images count in the source hash (see BuilderConfig.base_policy).
BasePolicy = Literal["digest", "tag"]


class BuilderConfig(_Section):
    """How images are built and where they are pushed."""

    type: BuilderType | None = None
    destination: str | None = None
    #: The Google Cloud tab of the W&B guide names the destination ``uri``.
    uri: str | None = None
    build_context_store: str | None = Field(default=None, alias="build-context-store")
    build_job_name: str = Field(default=DEFAULT_BUILD_JOB_NAME, alias="build-job-name")
    #: A Kubernetes Job spec merged into the kaniko job buildq creates.
    kaniko_config: dict[str, JsonValue] | None = Field(default=None, alias="kaniko-config")
    kaniko_image: str | None = Field(default=None, alias="kaniko-image")
    #: The target platform (``linux/amd64``), or several (a list, or comma-separated): one
    #: image per platform and an image index over them.
    platform: str | list[str] | None = None
    #: Kubernetes secret holding registry credentials for kaniko, and the key in it.
    secret_name: str | None = Field(default=None, alias="secret-name")
    secret_key: str | None = Field(default=None, alias="secret-key")
    #: Kept apart from the destination so cache layers never mix with release images.
    cache_repo: str | None = Field(default=None, alias="cache-repo")
    #: Base of generated Dockerfiles (projects without one); may contain ``{python}``.
    base_image: str | None = Field(default=None, alias="base-image")
    accelerator: AcceleratorConfig | None = None
    #: Command of generated Dockerfiles when the request gives none: a shell-like string
    #: (split with shlex) or an argv list.
    entrypoint: str | list[str] | None = None
    pip: PipConfig | None = None
    #: ``digest`` (the default): every base image is resolved to the digest its registry
    #: serves now, which goes into the source hash and pins the build; ``tag``: bases are
    #: hashed by their text only, so a moved base tag rebuilds nothing.
    base_policy: BasePolicy | None = Field(default=None, alias="base-policy")


class LegacyRegistry(_Section):
    """The pre-``builder.destination`` registry block, still read for old configs."""

    type: LegacyRegistryType
    uri: str | None = None
    repository: str | None = None
    region: str | None = None
    project: str | None = None
    image_name: str | None = Field(default=None, alias="image-name")


class LaunchConfig(BaseModel):
    """A validated launch-config; build it with :func:`config.load_config`."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    environment: Environment | None = None
    registry: LegacyRegistry | None = None
    builder: BuilderConfig = Field(default_factory=BuilderConfig)
    #: The file the config came from, or "<defaults>" / "<inline>".
    origin: str = "<defaults>"
    #: Things the user should change that do not stop a build (deprecated keys).
    warnings: tuple[str, ...] = ()

    def to_mapping(self) -> dict[str, Any]:
        """The config as W&B-named keys, only those that were set; JSON-able."""
        data = self.model_dump(
            mode="json",
            by_alias=True,
            exclude_unset=True,
            exclude={"origin", "warnings"},
        )
        # A section set to its defaults (an empty "builder:") adds nothing.
        return {k: v for k, v in data.items() if v not in (None, {})}

    def destination(self) -> ImageRef | None:
        """Where images are pushed: builder.destination, builder.uri, else the legacy block."""
        if self.builder.destination:
            return parse_destination(self.builder.destination, "builder.destination")
        if self.builder.uri:
            return parse_destination(self.builder.uri, "builder.uri")
        legacy = legacy_destination(self.registry, self.environment)
        if legacy is None:
            return None
        return parse_destination(legacy, "registry")


def legacy_destination(
    registry: LegacyRegistry | None, environment: Environment | None
) -> str | None:
    """The ``builder.destination`` equivalent of an old ``registry`` block.

    Returns None when the block gives no push target (``local``) or too little to
    build one; the loader reports the latter.
    """
    if registry is None or registry.type == "local":
        return None
    if registry.uri:
        base = registry.uri.rstrip("/")
        if registry.repository and "/" not in base.removeprefix("https://"):
            base = f"{base}/{registry.repository}"
        if registry.type == "gcr" and registry.image_name:
            base = f"{base}/{registry.image_name}"
        return base
    if registry.type == "gcr":
        region = registry.region or (environment.region if environment else None)
        project = registry.project or (environment.project if environment else None)
        if region and project and registry.repository and registry.image_name:
            return f"{region}-docker.pkg.dev/{project}/{registry.repository}/{registry.image_name}"
    return None
