"""Service settings read from the environment, in one place.

Nothing in ``tasks/`` or ``workers/`` reads ``os.environ``: they receive a
:class:`Settings` built here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from config.errors import ConfigError
from config.names import PLATFORM_FORMS, split_platforms
from config.references import parse_image_ref

#: Where the launch agent looks for its config when neither --config nor BUILDQ_CONFIG is given.
DEFAULT_CONFIG_PATH = Path("~/.config/wandb/launch-config.yaml")
#: Environment variables holding secret build-arg values: BUILDQ_SECRET_<NAME>.
SECRET_ENV_PREFIX = "BUILDQ_SECRET_"
#: Default limits on an archive source (see ``Settings.max_archive_bytes``).
DEFAULT_MAX_ARCHIVE_BYTES = 10 * 1024**3
DEFAULT_MAX_ARCHIVE_MEMBERS = 500_000


def _data_home(env: Mapping[str, str]) -> Path:
    base = env.get("XDG_DATA_HOME") or str(Path(env.get("HOME", "/tmp")) / ".local" / "share")
    return Path(base) / "buildq"


def _default_workdir(env: Mapping[str, str]) -> Path:
    return _data_home(env) / "work"


def _number(env: Mapping[str, str], name: str, default: float, minimum: float = 0.0,
            strict: bool = True) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(
            f"environment variable {name}={raw!r} is not a number.",
            f"Set {name} to a number of seconds, e.g. {name}={default:g}.",
        ) from None
    if value < minimum or (strict and value == minimum):
        raise ConfigError(f"environment variable {name}={raw!r} is too small.",
                          f"Use a number above {minimum:g}" + ("." if strict else " or equal to it."))
    return value


def _count(env: Mapping[str, str], name: str, default: int) -> int:
    """A positive whole number (a size in bytes, a count) from the environment."""
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    hint = f"Set {name} to a positive integer, e.g. {name}={default}."
    try:
        value = int(raw.strip())
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not a whole number.",
                          hint) from None
    if value < 1:
        raise ConfigError(f"environment variable {name}={raw!r} is too small.", hint)
    return value


def _path(env: Mapping[str, str], name: str) -> Path | None:
    raw = env.get(name, "").strip()
    return Path(raw).expanduser() if raw else None


def _paths(env: Mapping[str, str], name: str) -> tuple[Path, ...]:
    """An os.pathsep-separated list of absolute directories, ``~`` expanded."""
    paths: list[Path] = []
    for item in env.get(name, "").split(os.pathsep):
        if not item.strip():
            continue
        path = Path(item.strip()).expanduser()
        if not path.is_absolute():
            raise ConfigError(f"environment variable {name} has {item!r}, which is not an "
                              "absolute path.",
                              f"Write {name}=/srv/src{os.pathsep}/home/shared/checkouts.")
        paths.append(path)
    return tuple(paths)


def _pairs(env: Mapping[str, str], name: str) -> dict[str, str]:
    """``a=b,c=d`` → {"a": "b", "c": "d"}."""
    pairs: dict[str, str] = {}
    for item in env.get(name, "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ConfigError(f"environment variable {name} has {item!r}, which is not HOST=ENDPOINT.",
                              f"Write {name}=registry.example.com=127.0.0.1:5000,other=host:port.")
        pairs[key.strip()] = value.strip()
    return pairs


@dataclass(frozen=True)
class Settings:
    """How this process reaches Redis, stores contexts and bounds its work."""

    #: Broker, result backend, locks and records; None means the embedded in-process mode.
    #: Out of repr: it may hold the Redis password.
    redis_url: str | None = field(default=None, repr=False)
    #: Launch-config path from BUILDQ_CONFIG (the --config option wins over it).
    config_path: str | None = None
    #: Scratch space for fetched sources; every directory made here is removed after use.
    workdir: Path = field(default_factory=lambda: _default_workdir(os.environ))
    #: Default context store for the docker pool when the config names none.
    context_store: str = ""
    #: Lock lease: a holder that stops renewing loses the lock after this long.
    lock_lease: float = 60.0
    #: Longest a single image build may run before it is cancelled.
    build_timeout: float = 3600.0
    #: Docker build network mode ("none" or "host" where no bridge exists).
    network_mode: str | None = None
    #: The Dockerfile frontend image the docker pool's BuildKit builds with: every
    #: Dockerfile without a '# syntax=' line, and one whose official docker/dockerfile:1
    #: line cannot be pulled (BUILDQ_DOCKERFILE_FRONTEND); None: the engine's built-in one.
    dockerfile_frontend: str | None = None
    #: The platforms a docker-pool worker builds and advertises (BUILDQ_PLATFORMS); empty:
    #: what its engine builds, natively or under QEMU (workers/platforms.py).
    platforms: tuple[str, ...] = ()
    #: Registries spoken to over plain HTTP besides loopback ones.
    insecure_registries: tuple[str, ...] = ()
    #: Basic credentials for the destination registry, when not in docker's config.json.
    registry_username: str | None = None
    registry_password: str | None = field(default=None, repr=False)
    #: Directory holding docker's config.json (DOCKER_CONFIG), else ~/.docker.
    docker_config_dir: Path = field(default_factory=lambda: Path.home() / ".docker")
    #: Seconds between retries grow from this base, with jitter.
    retry_base: float = 2.0
    #: Retries of a transient fault before the build is marked failed.
    max_retries: int = 5
    #: S3-compatible endpoint for context stores (MinIO, moto); None means AWS itself.
    s3_endpoint_url: str | None = None
    #: Region a kaniko Job's S3 client signs for when the launch-config's environment names
    #: none (an S3-compatible store, or aws without a region): kaniko's client needs one.
    s3_region: str = "us-east-1"
    #: Cloud Storage endpoint (gcp-storage-emulator in tests), reached anonymously;
    #: None means Google itself with google.auth.default() credentials.
    gcs_endpoint_url: str | None = None
    #: ECR API endpoint override (moto in tests); None means AWS itself.
    ecr_endpoint_url: str | None = None
    #: Blob endpoint standing in for https://<account>.blob.core.windows.net (Azurite).
    azure_blob_endpoint: str | None = None
    #: Storage account key for Azure Blob stores, when not using DefaultAzureCredential.
    azure_storage_key: str | None = field(default=None, repr=False)
    #: Where a registry host is really reached: {"<acct>.dkr.ecr.<region>.amazonaws.com": "127.0.0.1:5001"}.
    registry_endpoints: dict[str, str] = field(default_factory=dict)
    #: Namespace of Kaniko Jobs when neither kaniko-config nor the pod's own namespace says.
    kube_namespace: str = "default"
    #: Create a missing ECR repository instead of failing.
    create_repositories: bool = False
    #: Flower login(s), ``user:password[,user:password]`` (BUILDQ_FLOWER_BASIC_AUTH).
    flower_basic_auth: str | None = field(default=None, repr=False)
    #: Values of secret build args on this worker, from BUILDQ_SECRET_<NAME> (the name's key).
    build_secrets: dict[str, str] = field(default_factory=dict, repr=False)
    #: Directory of secret build-arg files ``<dir>/<NAME>`` (a mounted Kubernetes Secret).
    secrets_dir: Path | None = None
    #: Kubernetes Secret whose keys (one per secret build arg name) kaniko Jobs read.
    build_secrets_secret: str = "buildq-build-secrets"
    #: Cap on the unpacked size of an archive source: a small .tar.gz can expand to fill
    #: the build host's disk, so it is refused before that (BUILDQ_MAX_ARCHIVE_BYTES).
    max_archive_bytes: int = DEFAULT_MAX_ARCHIVE_BYTES
    #: Seconds a resolved base-image digest is reused by this process (0: ask every time):
    #: a burst of requests costs one registry round trip per base, and a moved tag is
    #: seen within a minute, well inside the hours a patched base takes to matter.
    base_ttl: float = 60.0
    #: How base images count in the hash when neither the request nor builder.base-policy
    #: says: "digest" (resolved and pinned) or "tag" (their text only).
    base_policy: str = "digest"
    #: Cap on an archive's member count: millions of empty files exhaust inodes, not bytes.
    max_archive_members: int = DEFAULT_MAX_ARCHIVE_MEMBERS
    #: Directories under which a worker serving remote requests reads a local path or a
    #: ``file://`` source (BUILDQ_SOURCE_ROOTS, os.pathsep-separated); buildq's own upload
    #: area is always allowed, and by default it is the only place.
    source_roots: tuple[Path, ...] = ()
    #: Glob patterns over ``registry/repository`` that workers may push to
    #: (BUILDQ_ALLOWED_DESTINATIONS, comma-separated); empty: the operator's launch-config
    #: destination and repositories under it, plus loopback registries.
    allowed_destinations: tuple[str, ...] = ()
    #: Message signing (Celery's ``auth`` serializer): this process's RSA private key and
    #: its certificate, both PEM (BUILDQ_SIGNING_KEY, BUILDQ_SIGNING_CERT). With both set,
    #: every task message it sends is signed, and it accepts only signed messages.
    signing_key: Path | None = None
    signing_cert: Path | None = None
    #: Directory of the certificates whose signatures a worker trusts (BUILDQ_SIGNING_CERTS_DIR).
    signing_certs_dir: Path | None = None
    #: Where every ended request's record is POSTed (BUILDQ_NOTIFY_URL); None: nowhere.
    notify_url: str | None = None
    #: Key of the X-Buildq-Signature HMAC of each notification (BUILDQ_NOTIFY_SECRET).
    notify_secret: str | None = field(default=None, repr=False)
    #: Retries of a notification answered 5xx or not reached, with backoff (then given up).
    notify_retries: int = 5

    @property
    def embedded(self) -> bool:
        return not self.redis_url

    @property
    def signing(self) -> bool:
        """Whether messages are signed and only signed ones accepted."""
        return self.signing_key is not None or self.signing_cert is not None

    @property
    def visibility_timeout(self) -> int:
        # An unacked build must not be redelivered while it still runs.
        return int(self.build_timeout * 2 + 600)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        workdir = Path(env.get("BUILDQ_WORKDIR") or _default_workdir(env))
        store = env.get("BUILDQ_CONTEXT_STORE") or (_data_home(env) / "contexts").as_uri()
        docker_config = env.get("DOCKER_CONFIG") or str(Path(env.get("HOME", "/root")) / ".docker")
        insecure = tuple(
            h.strip() for h in env.get("BUILDQ_INSECURE_REGISTRIES", "").split(",") if h.strip()
        )
        # A field's default is the value of an unset variable: cls.<field> reads it, so
        # each default is written once, in the field.
        return cls(
            redis_url=env.get("BUILDQ_REDIS_URL") or None,
            config_path=env.get("BUILDQ_CONFIG") or None,
            workdir=workdir,
            context_store=store,
            lock_lease=_number(env, "BUILDQ_LOCK_LEASE", cls.lock_lease),
            build_timeout=_number(env, "BUILDQ_BUILD_TIMEOUT", cls.build_timeout),
            network_mode=env.get("BUILDQ_NETWORK_MODE") or None,
            dockerfile_frontend=_image_ref(env, "BUILDQ_DOCKERFILE_FRONTEND"),
            platforms=_platforms(env, "BUILDQ_PLATFORMS"),
            insecure_registries=insecure,
            registry_username=env.get("BUILDQ_REGISTRY_USERNAME") or None,
            registry_password=env.get("BUILDQ_REGISTRY_PASSWORD") or None,
            docker_config_dir=Path(docker_config),
            retry_base=_number(env, "BUILDQ_RETRY_BASE", cls.retry_base),
            max_retries=int(_number(env, "BUILDQ_MAX_RETRIES", cls.max_retries, strict=False)),
            s3_endpoint_url=env.get("BUILDQ_S3_ENDPOINT_URL") or None,
            s3_region=env.get("BUILDQ_S3_REGION") or cls.s3_region,
            # STORAGE_EMULATOR_HOST is the name Google's own clients (and kaniko's) honour.
            gcs_endpoint_url=(env.get("BUILDQ_GCS_ENDPOINT_URL") or env.get("STORAGE_EMULATOR_HOST")
                              or None),
            ecr_endpoint_url=env.get("BUILDQ_ECR_ENDPOINT_URL") or None,
            azure_blob_endpoint=env.get("BUILDQ_AZURE_BLOB_ENDPOINT") or None,
            azure_storage_key=env.get("BUILDQ_AZURE_STORAGE_KEY") or None,
            registry_endpoints=_pairs(env, "BUILDQ_REGISTRY_ENDPOINTS"),
            kube_namespace=env.get("BUILDQ_KUBE_NAMESPACE") or cls.kube_namespace,
            create_repositories=env.get("BUILDQ_CREATE_REPOSITORIES", "").lower() in ("1", "true", "yes"),
            flower_basic_auth=env.get("BUILDQ_FLOWER_BASIC_AUTH") or None,
            max_archive_bytes=_count(env, "BUILDQ_MAX_ARCHIVE_BYTES", DEFAULT_MAX_ARCHIVE_BYTES),
            max_archive_members=_count(env, "BUILDQ_MAX_ARCHIVE_MEMBERS",
                                       DEFAULT_MAX_ARCHIVE_MEMBERS),
            build_secrets={k[len(SECRET_ENV_PREFIX):]: v for k, v in env.items()
                           if k.startswith(SECRET_ENV_PREFIX) and len(k) > len(SECRET_ENV_PREFIX)},
            secrets_dir=Path(env["BUILDQ_SECRETS_DIR"]) if env.get("BUILDQ_SECRETS_DIR") else None,
            build_secrets_secret=env.get("BUILDQ_BUILD_SECRETS_SECRET") or cls.build_secrets_secret,
            base_ttl=_number(env, "BUILDQ_BASE_TTL", cls.base_ttl, strict=False),
            base_policy=_base_policy(env.get("BUILDQ_BASE_POLICY") or cls.base_policy),
            source_roots=_paths(env, "BUILDQ_SOURCE_ROOTS"),
            signing_key=_path(env, "BUILDQ_SIGNING_KEY"),
            signing_cert=_path(env, "BUILDQ_SIGNING_CERT"),
            signing_certs_dir=_path(env, "BUILDQ_SIGNING_CERTS_DIR"),
            allowed_destinations=tuple(
                p.strip() for p in env.get("BUILDQ_ALLOWED_DESTINATIONS", "").split(",")
                if p.strip()),
            notify_url=(check_notify_url(env["BUILDQ_NOTIFY_URL"], "BUILDQ_NOTIFY_URL")
                        if env.get("BUILDQ_NOTIFY_URL") else None),
            notify_secret=env.get("BUILDQ_NOTIFY_SECRET") or None,
            notify_retries=int(_number(env, "BUILDQ_NOTIFY_RETRIES", cls.notify_retries,
                                       strict=False)),
        )


def _platforms(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """Platforms from the environment, comma-separated, each checked as a request's is."""
    raw = (env.get(name) or "").strip()
    if not raw:
        return ()
    found, why = split_platforms(raw)
    if why is not None:
        raise ConfigError(f"environment variable {name}={raw[:120]!r} {why}.",
                          f"{PLATFORM_FORMS} Unset it to build what the engine can.")
    return tuple(found)


def _image_ref(env: Mapping[str, str], name: str) -> str | None:
    """An image reference from the environment, checked as a FROM line would be."""
    raw = (env.get(name) or "").strip()
    if not raw:
        return None
    try:
        parse_image_ref(raw)
    except ConfigError as exc:
        raise ConfigError(f"environment variable {name}={raw!r} is not an image reference: "
                          f"{exc.message}",
                          f"Set {name} to an image the build hosts' engine can pull, e.g. "
                          f"{name}=registry.example.com/tools/dockerfile:1.6.") from None
    return raw


def check_notify_url(url: str, origin: str) -> str:
    """A notification target: an absolute http(s) URL."""
    from urllib.parse import urlsplit

    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{origin} {url!r} is not an http:// or https:// URL.",
                          "Give the full URL that receives the record, e.g. "
                          "https://ci.example.com/hooks/buildq.")
    return url.strip()


def _base_policy(value: str) -> str:
    if value not in ("digest", "tag"):
        raise ConfigError(f"BUILDQ_BASE_POLICY is {value!r}, not digest or tag.",
                          "Set it to digest (resolve base images) or tag (hash their text only).")
    return value
