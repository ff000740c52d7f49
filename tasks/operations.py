"""The body of each stage: what it asks of ``workers/`` and which stage comes next.

Bodies take the state and the settings, change the state, and return the name of
the next stage ("" after the record). They raise :class:`BuildqError` for anything
a user should read; :class:`tasks.stages.StageTask` turns that into a failed record.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import re
import shutil
import tempfile
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from config import LaunchConfig, config_from_mapping, load_config
from config.errors import BuildError, BuildqError, ConfigError, InputError
from config.names import HASH_LABEL, PLATFORM_FORMS, platform_fields, split_platforms
from config.policy import DestinationPolicy, check_push_targets
from config.references import ImageRef, parse_destination, parse_image_ref
from config.settings import Settings, check_notify_url
from tasks.app import settings as current_settings
from tasks.cancelling import current_stop
from tasks.connection import redis_client
from tasks.events import LogWriter, add_event, add_unsent, emit
from tasks.lock import Lease, new_token
from tasks.records import last_tag, remember_request
from tasks.state import BuildState
from workers.bases import DigestCache, find_bases, pin, resolve
from workers.builders import Builder, BuildRequest, engine_available
from workers.context import BuildInputs, image_tag, read_dockerfile, source_hash, write_context
from workers.dockerfile import PythonOptions, check_python, needs_plan, parse_entrypoint, plan
from workers.registries import registry_for
from workers.secrets import check_names, lookup
from workers.sources import SourceSpec, fetch_source, parse_source
from workers.sources.base import in_scratch, names_local_path
from workers.sources.roots import (
    check_local_read,
    check_roots,
    check_source_text,
    is_shipped_source,
)
from workers.stores import ContextStore, split_store_url, store_for_url

if TYPE_CHECKING:
    from workers.builders.kaniko import KanikoRequest


def new_request_id() -> str:
    return str(uuid.uuid4())


def resolve_config(config: str | dict[str, Any] | None, settings: Settings,
                   destination_given: bool = False) -> LaunchConfig:
    if isinstance(config, dict):
        return config_from_mapping(config, origin="<build_image config>",
                                   destination_given=destination_given)
    return load_config(config, env_path=settings.config_path, destination_given=destination_given)


def with_destination(cfg: LaunchConfig, destination: str) -> LaunchConfig:
    """The config with ``destination`` as builder.destination, checked by the same rules."""
    mapping = cfg.to_mapping()
    builder = dict(mapping.get("builder") or {})
    builder.pop("uri", None)
    builder["destination"] = destination
    mapping["builder"] = builder
    return config_from_mapping(mapping, origin=f"--destination (with {cfg.origin})")


def choose_builder(requested: str | None, cfg: LaunchConfig, settings: Settings) -> str:
    """``builder.type`` wins; else docker when an engine (or a docker pool) answers; else noop."""
    choice = requested or cfg.builder.type
    if choice:
        if choice not in ("docker", "kaniko", "noop"):
            raise ConfigError(f"builder {choice!r} is not one of docker, kaniko, noop.",
                              "Pass --builder docker|kaniko|noop or fix builder.type.")
        return choice
    return "docker" if _docker_answers(settings) else "noop"


#: How long a control host trusts its last look for a Docker Engine or docker pool.
DOCKER_PROBE_SECONDS = 10.0
_docker_probe: tuple[float, bool] | None = None


def _docker_answers(settings: Settings) -> bool:
    # The probe (an engine ping, then a presence read) costs more than a cache-hit build
    # itself, and its answer changes only when hosts come and go.
    global _docker_probe
    now = time.monotonic()
    if _docker_probe is not None and now - _docker_probe[0] < DOCKER_PROBE_SECONDS:
        return _docker_probe[1]
    answer = engine_available() or (not settings.embedded and _pool_alive(settings, "docker"))
    _docker_probe = (now, answer)
    return answer


def _pool_alive(settings: Settings, pool: str) -> bool:
    from tasks.presence import pool_alive

    return pool_alive(redis_client(settings), pool)


def describe_request(request_id: str, source: str, settings: Settings, *, destination: str | None,
                     ref: str | None, dockerfile: str | None, build_args: dict[str, str] | None,
                     target: str | None, platform: str | list[str] | None,
                     config: str | dict[str, Any] | None, entrypoint: str | list[str] | None = None,
                     python: str | None = None, gpu: bool = False,
                     secrets: list[str] | tuple[str, ...] | None = None,
                     base_policy: str | None = None, force: bool = False,
                     for_workers: bool = False, shipped: bool = False, here: bool = True,
                     notify: str | None = None,
                     ) -> tuple[BuildState, LaunchConfig, SourceSpec]:
    """The state of a request with every input of its build checked and filled in.

    Shared by the chain and the CLI's ``hash`` and ``kaniko-job``, so that what a build is
    made of is decided once; ``buildq build`` and ``build_image.delay()`` call it before
    anything is shipped or queued, and the worker calls it again (it trusts no message).
    Raises :class:`InputError` for a bad option, :class:`ForbiddenError` for a request
    outside the operator's rules.

    ``here=False``: a local path names a file on the workers, not on this host (a script's
    ``build_image.delay()``), so this host does not look at it.
    ``for_workers``: the request runs on workers (not in embedded mode), so their rules
    apply: local reads only under the source roots (unless ``shipped``: the caller
    uploads a local source itself) and pushes only to allowed destinations.
    """
    guarded = for_workers and not settings.embedded
    if guarded and not shipped:
        # Before parsing, which would look at a local path.
        check_source_text(source, settings)
    if guarded and isinstance(config, str):
        # A launch-config named by path is a file the worker reads for the request too.
        check_local_read(config, settings, what="config")
    state = BuildState(request_id=request_id, source={"location": source, "ref": ref},
                       dockerfile=dockerfile, build_args=dict(build_args or {}), target=target,
                       platform=platform if isinstance(platform, str) else None, gpu=bool(gpu))
    # Checked here so a bad option fails the request before any work; used at "hash".
    state.secrets = list(check_names(secrets, state.build_args))
    asked = check_platforms(platform, "--platform")
    argv = parse_entrypoint(entrypoint, "--entrypoint")
    state.entrypoint = list(argv) if argv is not None else None
    state.python = check_python(python)
    cfg = resolve_config(config, settings, bool(destination))
    state.config = cfg.to_mapping()
    spec = parse_source(source, ref, look=here)
    if guarded and not (shipped and names_local_path(source)):
        check_roots(spec, settings)
    state.source = spec.to_dict()
    if destination:
        cfg = with_destination(cfg, destination)
        state.config = cfg.to_mapping()
    state.ref = cfg.destination()
    platforms = asked or check_platforms(cfg.builder.platform, "builder.platform")
    # One platform is an ordinary build; several fan out into one build each (tasks/
    # multiplatform.py), and the state keeps the list.
    state.platform = platforms[0] if len(platforms) == 1 else None
    state.platforms = platforms if len(platforms) > 1 else []
    state.base_policy = check_base_policy(base_policy or cfg.builder.base_policy
                                          or settings.base_policy)
    state.force = bool(force)
    if guarded and spec.kind != "image":
        check_push_targets(DestinationPolicy.from_settings(settings), state.ref,
                           cfg.builder.cache_repo, cfg.builder.kaniko_config)
    state.notify = check_notify_url(notify, "notify") if notify else None
    return state, cfg, spec


def check_platforms(platform: object, what: str) -> list[str]:
    """A request's platforms (none when ``platform`` is None): one ``os/arch[/variant]``,
    several comma-separated or a list, each known and named once."""
    if platform is None:
        return []
    found, why = split_platforms(platform)
    if why is not None:
        shown = ",".join(map(str, platform)) if isinstance(platform, list | tuple) else \
            str(platform)
        raise InputError(f"{what} {shown[:120]!r} {why}.", PLATFORM_FORMS)
    return found


def check_kaniko_platforms(state: BuildState) -> None:
    """Refuse a platform of ``state`` (its one or its several) the kaniko pool cannot
    build: kaniko builds Linux images only.

    Every other platform gets a Job of its own, on a node of its architecture (see
    workers/builders/kaniko/manifest.py ``platform_node_selector``).
    """
    platforms = state.platforms or ([state.platform] if state.platform else [])
    foreign = [p for p in platforms if platform_fields(p)["os"] != "linux"]
    if foreign:
        raise InputError(f"the kaniko pool builds Linux images only, and this request names "
                         f"{', '.join(foreign)}.",
                         "Build it on a docker-pool host of that operating system "
                         "(builder.type: docker), or ask for linux/<arch> platforms.")


def check_base_policy(policy: str) -> str:
    if policy not in ("digest", "tag"):
        raise InputError(f"base policy {policy!r} is not digest or tag.",
                         "Use digest (resolve base images to digests) or tag (hash their text).")
    return policy


def new_request(request_id: str, source: str, settings: Settings, *, destination: str | None,
                ref: str | None, dockerfile: str | None, build_args: dict[str, str] | None,
                target: str | None, platform: str | list[str] | None, builder: str | None,
                config: str | dict[str, Any] | None, entrypoint: str | list[str] | None = None,
                python: str | None = None, gpu: bool = False,
                secrets: list[str] | None = None, base_policy: str | None = None,
                force: bool = False, notify: str | None = None) -> BuildState:
    """The state of a fresh request; input errors become a failed state, never an exception."""
    state = BuildState(request_id=request_id, source={"location": source, "ref": ref},
                       dockerfile=dockerfile, build_args=dict(build_args or {}), target=target,
                       platform=platform if isinstance(platform, str) else None, gpu=bool(gpu))
    try:
        state, cfg, spec = describe_request(
            request_id, source, settings, destination=destination, ref=ref, dockerfile=dockerfile,
            build_args=build_args, target=target, platform=platform, config=config,
            entrypoint=entrypoint, python=python, gpu=gpu, secrets=secrets,
            base_policy=base_policy, force=force, for_workers=True, notify=notify)
        if spec.kind == "image":
            state.ref = None
            state.platforms = []  # an image job builds nothing: no index either
            state.builder = "noop"
            return state
        if state.ref is None:
            raise InputError("no destination for the image.",
                             "Pass --destination registry/repository or set builder.destination"
                             " in the launch-config.")
        state.builder = choose_builder(builder, cfg, settings)
        if state.builder == "noop":
            raise InputError(
                f"building is disabled (builder.type: noop) but a {spec.kind} source needs a build.",
                "Set builder.type to docker (with a Docker Engine) or kaniko, or pass --builder.")
        if state.builder == "kaniko":
            check_kaniko_platforms(state)
            state.context_store = kaniko_store(cfg)
    except InputError as exc:
        state.fail(str(exc), exc.kind)
        if notify and state.notify is None:
            # Refused for another reason: still tell a well-formed receiver.
            with contextlib.suppress(InputError):
                state.notify = check_notify_url(notify, "notify")
    return state


def kaniko_store(cfg: LaunchConfig) -> str:
    """The context store a kaniko build uploads to; kaniko has no other way to its context."""
    if not cfg.builder.build_context_store:
        raise ConfigError("the kaniko builder needs builder.build-context-store.",
                          "Set it to s3://bucket/prefix, gs://bucket/prefix or "
                          "https://<account>.blob.core.windows.net/<container>/prefix.")
    return cfg.builder.build_context_store


def _client(settings: Settings) -> Any:
    return redis_client(settings)


def fetch(state: BuildState, settings: Settings) -> str:
    """The first stage (a restarted copy of a request answered meanwhile never gets here:
    the stage's way in looks, see ``StageTask._enter``)."""
    spec = SourceSpec.from_dict(state.source)
    if spec.kind == "image":
        return _resolve_image(state, spec, settings)
    check_roots(spec, settings)  # again: a restarted request comes as a state, not a source
    # A fetch repeated in the same task (Redis was unreachable at the stage's end) would
    # otherwise leave the tree it fetched the first time behind.
    _drop_tree(state)
    settings.workdir.mkdir(parents=True, exist_ok=True)
    fetched = fetch_source(spec, settings.workdir, settings)
    state.workdir = str(fetched.root)
    state.owned = fetched.owned
    state.commit = fetched.commit
    return "hash"


def _resolve_image(state: BuildState, spec: SourceSpec, settings: Settings) -> str:
    """An image job builds nothing: report the digest the registry has for it."""
    ref = parse_image_ref(spec.location)
    state.image = spec.location
    state.ref = ref
    state.tag = ref.tag
    digest = registry_for(ref, settings).manifest_digest(ref, ref.digest or ref.tag or "latest")
    if digest is None:
        raise InputError(f"image {spec.location} does not exist in its registry.",
                         "Push it first, or give a git or directory source to build.")
    state.digest = digest
    state.status = "skipped"
    return "record"


def build_inputs(state: BuildState, root: Path | None = None) -> BuildInputs:
    """The typed inputs of this build: the one place they are assembled.

    The hash stage, the upload, the kaniko dispatch, ``buildq hash`` and ``buildq
    kaniko-job`` all take them from here, so equal requests hash alike on every path.
    Given the fetched ``root``, a project without a Dockerfile gets one generated (once:
    the text stays in the state, so every later stage packs the very bytes hashed), and
    the Dockerfile names each resolved base by its digest: hashed and packed that way, so
    the build uses exactly the bases the hash saw, whatever their tags do meanwhile.
    """
    if root is not None:
        _generate_dockerfile(state, root)
    generated = state.generated or {}
    inputs = BuildInputs.create(generated.get("dockerfile") or state.dockerfile, state.build_args,
                                state.target, state.platform, state.generated_dockerfile,
                                state.secrets, context_dir=generated.get("context"),
                                default_ignore=generated.get("ignore") or ())
    if not state.bases:
        return inputs
    bases = tuple((b["image"], b["digest"]) for b in state.bases)
    if root is None:
        return dataclasses.replace(inputs, bases=bases)
    pinned = pin(read_dockerfile(root, inputs), dict(bases), state.build_args)
    return dataclasses.replace(inputs, bases=bases, dockerfile_text=pinned)


#: Base-image digests this process resolved lately (BUILDQ_BASE_TTL).
_digests: DigestCache | None = None


def _digest_cache(settings: Settings) -> DigestCache:
    global _digests
    if _digests is None or _digests.ttl != settings.base_ttl:
        _digests = DigestCache(settings.base_ttl)
    return _digests


def resolve_bases(state: BuildState, root: Path, settings: Settings) -> None:
    """Resolve the Dockerfile's base images to digests, with the push's own registry clients."""
    state.bases = []
    if state.base_policy == "tag":
        return
    inputs = build_inputs(state, root)
    found = find_bases(read_dockerfile(root, inputs), state.build_args)

    def lookup(ref: ImageRef) -> str | None:
        return registry_for(ref, settings).manifest_digest(ref, ref.tag or "latest")

    resolved = resolve(found, lookup, _digest_cache(settings))
    state.bases = [{"image": image, "digest": digest} for image, digest in resolved.items()]


def hash_elsewhere(state: BuildState, settings: Settings) -> str:
    """Hash the request's source as the hash stage would, in a scratch copy removed after.

    For ``buildq hash`` and ``buildq kaniko-job``: no lock, no record, nothing queued.
    """
    spec = SourceSpec.from_dict(state.source)
    if spec.kind == "image":
        raise InputError("an image source needs no build, so it has no source hash.",
                         "Give a directory, archive or git URL.")
    with tempfile.TemporaryDirectory(prefix="buildq-hash-") as scratch:
        fetched = fetch_source(spec, Path(scratch), settings)
        try:
            return hash_tree(state, fetched.root, settings)
        finally:
            fetched.cleanup()


def hash_tree(state: BuildState, root: Path, settings: Settings) -> str:
    """Hash the fetched tree with the build's inputs; the state learns its hash and tag."""
    resolve_bases(state, root, settings)
    state.source_hash = source_hash(root, build_inputs(state, root))
    state.tag = image_tag(state.source_hash)
    if state.ref is not None:
        state.ref = state.ref.tagged(state.tag)
        state.image = str(state.ref)
    return state.source_hash


def _generate_dockerfile(state: BuildState, root: Path) -> None:
    """Write the Dockerfile of a project that has none into the state (not the tree)."""
    if state.generated_dockerfile is not None or state.generated is not None:
        return
    if not needs_plan(root, state.dockerfile):
        return  # before the options: a cache hit with a Dockerfile reads no config for them
    options = PythonOptions.create(config_from_mapping(state.config), entrypoint=state.entrypoint,
                                   python=state.python, gpu=state.gpu)
    found = plan(root, options)
    state.generated_dockerfile = found.text
    state.generated = found.to_dict()


def _ensure_tree(state: BuildState, settings: Settings) -> Path:
    """The fetched tree; fetched again (same commit) if this host never had it."""
    if state.workdir and Path(state.workdir).is_dir() and _fetched_here(state, settings):
        return Path(state.workdir)
    spec = SourceSpec.from_dict(state.source)
    if state.commit:
        spec = SourceSpec(spec.kind, spec.location, state.commit)
    check_roots(spec, settings)
    settings.workdir.mkdir(parents=True, exist_ok=True)
    fetched = fetch_source(spec, settings.workdir, settings)
    state.workdir, state.owned = str(fetched.root), fetched.owned
    return fetched.root


def _fetched_here(state: BuildState, settings: Settings) -> bool:
    """Whether the state's tree is one this host fetched for it: a scratch dir it owns, or
    the request's own directory source (within the source roots). Anything else the state
    names is not read: the source is fetched again."""
    assert state.workdir
    if state.owned:
        return in_scratch(state.workdir, settings.workdir)
    spec = SourceSpec.from_dict(state.source)
    if spec.kind != "directory" or Path(state.workdir).resolve() != Path(spec.location).resolve():
        return False
    check_roots(spec, settings)
    return True


def _drop_tree(state: BuildState) -> None:
    if state.owned and state.workdir and in_scratch(state.workdir, current_settings().workdir):
        shutil.rmtree(state.workdir, ignore_errors=True)
    state.workdir = None


#: What the hash's pending map keeps of a request: enough to restart it from fetch.
_PENDING_FIELDS = ("request_id", "source", "dockerfile", "build_args", "target", "platform",
                   "parent", "builder", "config", "created_at", "entrypoint", "python", "gpu",
                   "secrets", "base_policy", "force", "bases", "requester",
                   "requester_verified", "notify")


def pending_entry(state: BuildState) -> dict[str, Any]:
    """What the hash's pending map keeps of ``state`` (see ``_PENDING_FIELDS``).

    Every stage's lease renewal sends it, and it is only ever JSON-encoded, so it is read
    off the state rather than cut from ``to_dict``'s deep copy of all of it (launch config
    included) at each of a cache hit's stage boundaries.
    """
    entry = {k: getattr(state, k) for k in _PENDING_FIELDS}
    entry["ref"] = state.ref.to_dict() if state.ref else None
    return entry


def _tag_digest(ref: ImageRef, settings: Settings) -> str | None:
    """The digest the registry has under ``ref``'s tag, or None: the tag check itself."""
    assert ref.tag
    return registry_for(ref, settings).manifest_digest(ref, ref.tag)


#: The tag each (source, destination repository) hashed to last in this process, newest
#: last: what a hash stage expects the same source to hash to again (see _check_ahead).
_last_tags: collections.OrderedDict[tuple[str, str], str] = collections.OrderedDict()
_LAST_TAGS_KEPT = 256
#: The tag checks started ahead, by request: (the image checked, its digest to come).
_ahead: dict[str, tuple[str, Future[str | None]]] = {}
_AHEAD_KEPT = 32
#: This process's threads for the checks ahead, and the process they belong to (a forked
#: child starts its own).
_ahead_pool: tuple[int, ThreadPoolExecutor] | None = None


def _expected_key(state: BuildState) -> tuple[str, str] | None:
    location = state.source.get("location")
    if state.ref is None or not location:
        return None
    return str(location), state.ref.name


def _check_ahead(state: BuildState, settings: Settings) -> tuple[str, Future[str | None]] | None:
    """Start the tag check for the tag this source hashed to last, while it is hashed again.

    A cache hit's tag check (a registry ``HEAD``) then overlaps the stamp check instead of
    following it. Its answer is used only for the very image the hash names, and "absent"
    is asked again once the lock is ours (see :func:`exists`): another request may have
    pushed this hash meanwhile, and a stale "absent" would build it a second time.
    """
    global _ahead_pool
    key = _expected_key(state)
    tag = _last_tags.get(key) if key is not None else None
    if state.force or tag is None or state.ref is None:
        return None
    ref = state.ref.tagged(tag)
    if _ahead_pool is None or _ahead_pool[0] != os.getpid():
        _ahead_pool = (os.getpid(), ThreadPoolExecutor(2, thread_name_prefix="tag-check"))
    return str(ref), _ahead_pool[1].submit(_tag_digest, ref, settings)


def _remember_tag(state: BuildState) -> None:
    """Keep the tag just hashed, for the next hash of the same source (see _check_ahead)."""
    key = _expected_key(state)
    if key is not None and state.tag:
        _last_tags[key] = state.tag
        _last_tags.move_to_end(key)
        while len(_last_tags) > _LAST_TAGS_KEPT:
            _last_tags.popitem(last=False)


def _hand_ahead(state: BuildState, ahead: tuple[str, Future[str | None]] | None) -> None:
    """Leave the check started ahead for ``exists``, if it checked the image hashed."""
    if ahead is not None and ahead[0] == state.image:
        if len(_ahead) >= _AHEAD_KEPT:
            _ahead.clear()  # left by requests whose exists stage ran in another process
        _ahead[state.request_id] = ahead


def _digest_ahead(state: BuildState) -> str | None:
    """What the check started ahead found for this request's image (None: nothing found,
    or no check ahead for it); its error, if it failed, as the check would have raised it."""
    ahead = _ahead.pop(state.request_id, None)
    return ahead[1].result() if ahead is not None else None


def hash_source(state: BuildState, settings: Settings) -> str:
    client = _client(settings)
    ahead = _check_ahead(state, settings)
    try:
        hash_tree(state, _ensure_tree(state, settings), settings)
    except BaseException:
        _drop_tree(state)
        raise
    assert state.source_hash
    _remember_tag(state)
    # The state keeps the token only once the lock is ours, so a stage repeated after a
    # lost Redis connection never mistakes an unacquired token for a held lock.
    token = state.token or new_token()
    lease = Lease(client, state.source_hash, token, settings.lock_lease, state.request_id)
    # One round trip for the three and the stage events before them (a cache hit's hash
    # stage is a few milliseconds).
    pipe = client.pipeline(transaction=False)
    add_unsent(pipe, state.request_id)
    ours = len(pipe)
    remember_request(pipe, state.request_id, state.source_hash)
    add_event(pipe, state.request_id, "hashed", source_hash=state.source_hash, tag=state.tag,
              image=state.image)
    acquired = lease.add_acquire(pipe, pending_entry(state))
    replies = pipe.execute(raise_on_error=False)[ours:]
    for reply in replies[:-1]:
        if isinstance(reply, Exception):
            raise reply
    if not acquired(replies[-1]):
        # Another request is building this very hash: it will hand us its record.
        _drop_tree(state)
        emit(client, state.request_id, "attached", source_hash=state.source_hash)
        from celery.exceptions import Ignore

        raise Ignore()
    state.token = token
    _hand_ahead(state, ahead)
    return "exists"


def exists(state: BuildState, settings: Settings) -> str:
    assert state.ref and state.tag
    if state.force:
        return "upload"  # asked to build and push again, whatever the registry has
    digest = _digest_ahead(state) or _tag_digest(state.ref, settings)
    if digest:
        state.digest = digest
        state.status = "skipped"
        _drop_tree(state)
        return "record"
    return "upload"


#: A context's name in its store: the source hash, so a state can name no other object.
_CONTEXT_KEY = re.compile(r"^[0-9a-f]{64}\.tar\.gz$")


def context_key(state: BuildState) -> str:
    """The store key of this build's context, ``<source hash>.tar.gz``; a state that names
    another (sent straight to the broker) is refused rather than read or deleted."""
    key = state.context_key or f"{state.source_hash}.tar.gz"
    if not _CONTEXT_KEY.match(key) or key != f"{state.source_hash}.tar.gz":
        raise InputError(f"context {key[:80]!r} is not this build's context.",
                         "A build's context is named after its source hash.")
    return key


def context_store(state: BuildState, settings: Settings) -> ContextStore:
    url = state.context_store or settings.context_store
    return store_for_url(url, settings)


def check_buildable(platform: str | None, builder: str | None, settings: Settings) -> None:
    """Refuse a docker build for a platform no docker-pool host can build (natively or
    through a QEMU binfmt handler), rather than queue it where no worker listens.

    With no docker worker live (none advertised its platforms), the request waits for one,
    as any build does; the embedded mode asks this host's engine.
    """
    if builder != "docker" or not platform:
        return
    from workers.platforms import can_build, engine_platforms

    if settings.embedded:
        try:
            hosts = {"this host": engine_platforms()}
        except Exception:
            return  # no engine: the build stage says so in its own words
    else:
        from tasks.presence import platforms_of

        hosts = platforms_of(_client(settings), "docker")
    if not hosts or any(can_build(platform, found) for found in hosts.values()):
        return
    known = sorted({p for found in hosts.values() for p in found})
    raise BuildError(
        f"no docker-pool host can build {platform}: the live ones build "
        f"{', '.join(known) or 'no known platform'}.",
        "Register a QEMU binfmt handler for it on a build host (apt-get install "
        "qemu-user-static binfmt-support; update-binfmts --enable qemu-<arch>) and restart "
        "its docker worker, or add a host of that architecture.")


def upload(state: BuildState, settings: Settings) -> str:
    assert state.source_hash
    check_buildable(state.platform, state.builder, settings)
    store = context_store(state, settings)
    state.context_store = store.url
    key = context_key(state)
    try:
        if not store.exists(key):
            root = _ensure_tree(state, settings)
            with store.writer(key) as out:
                state.context_bytes = write_context(root, build_inputs(state, root), out)
        state.context_key = key
    finally:
        _drop_tree(state)
    return "build" if state.builder == "docker" else "kaniko"


def _docker_builder(settings: Settings) -> Builder:
    from workers.builders.docker import DockerBuilder

    return DockerBuilder(endpoints=settings.registry_endpoints,
                         frontend_image=settings.dockerfile_frontend)


def _build_request(state: BuildState, settings: Settings) -> BuildRequest:
    assert state.ref and state.context_key and state.source_hash
    store = context_store(state, settings)
    key = context_key(state)
    inputs = build_inputs(state)
    cache = cache_sources(state, settings)
    return BuildRequest(
        image=str(state.ref),
        open_context=lambda: store.reader(key),
        dockerfile=inputs.dockerfile,
        build_args=dict(inputs.build_args),
        target=inputs.target,
        platform=inputs.platform,
        labels={HASH_LABEL: state.source_hash},
        network_mode=settings.network_mode,
        timeout=settings.build_timeout,
        # Looked up here, on the host that builds; the state only ever holds the names.
        secrets=lookup(state.secrets, settings, "docker"),
        cache_from=[str(ref) for ref in cache],
        no_cache=state.force,
        registry_logins=_registry_logins([state.ref, *cache], settings),
        dockerfile_text=inputs.dockerfile_text,
        # Set when the request is cancelled while it builds: the builder stops the build.
        cancel=current_stop(),
    )


def cache_sources(state: BuildState, settings: Settings) -> list[ImageRef]:
    """Images whose layer cache the build imports: the destination's last image, and the
    last image (else ``latest``) of ``builder.cache-repo``. Their absence is only a warning."""
    assert state.ref
    client = _client(settings)
    found = []
    tag = last_tag(client, state.ref.name)
    if tag and tag != state.tag:
        found.append(state.ref.tagged(tag))
    cache_repo = config_from_mapping(state.config).builder.cache_repo
    if cache_repo:
        repo = parse_destination(cache_repo, "builder.cache-repo")
        found.append(repo.tagged(last_tag(client, repo.name) or "latest"))
    return found


def _registry_logins(refs: list[ImageRef], settings: Settings) -> dict[str, dict[str, str]]:
    logins: dict[str, dict[str, str]] = {}
    for ref in refs:
        if ref.registry in logins:
            continue
        # Without a login the build still runs: base images may be public, and a cache
        # image BuildKit cannot read is a warning in the log, never a failure.
        with contextlib.suppress(BuildqError):
            auth = registry_for(ref, settings).push_auth()
            if auth:
                logins[ref.registry] = dict(auth)
    return logins


def build(state: BuildState, settings: Settings) -> str:
    assert state.source_hash
    writer = LogWriter(_client(settings), state.source_hash)
    try:
        builder = _docker_builder(settings)
        builder.build(_build_request(state, settings), writer)
        state.frontend = builder.frontend
        state.dockerfile_frontend = builder.dockerfile_frontend
    finally:
        writer.flush()
    return "push"


def kaniko_request(state: BuildState, settings: Settings) -> KanikoRequest:
    """What the Kaniko Job of this hashed build is given (the dispatch and ``buildq kaniko-job``)."""
    from workers.builders.kaniko import KanikoRequest

    assert state.ref and state.ref.tag and state.source_hash
    key = context_key(state)
    return KanikoRequest(image=state.ref, context_uri=context_store(state, settings).uri(key),
                         source_hash=state.source_hash, inputs=build_inputs(state))


def kaniko(state: BuildState, settings: Settings) -> str:
    """Build and push with a Kaniko Job; the Job and its pods are gone when this returns."""
    from workers.builders.kaniko import KanikoDispatcher

    assert state.context_key and state.source_hash
    request = kaniko_request(state, settings)
    writer = LogWriter(_client(settings), state.source_hash)
    try:
        state.digest = KanikoDispatcher(config_from_mapping(state.config), settings).run(request, writer)
    finally:
        writer.flush()
    return "push"


def _verify_pushed(state: BuildState, settings: Settings) -> str:
    """Kaniko pushed the image itself: check the registry has it, with the digest it reported."""
    assert state.ref and state.tag
    found = registry_for(state.ref, settings).manifest_digest(state.ref, state.tag)
    if found is None:
        raise BuildError(f"the Kaniko Job finished but {state.image} is not in the registry.",
                         "Check the Job's log (buildq logs) for a push error.")
    if state.digest and found != state.digest:
        raise BuildError(f"the registry has {found} for {state.image}, not the {state.digest} "
                         "Kaniko reported.", "Another push raced this one; build again.")
    state.digest = found
    state.status = "built"
    return "record"


def push(state: BuildState, settings: Settings) -> str:
    assert state.image and state.ref and state.source_hash
    if state.builder == "kaniko":
        return _verify_pushed(state, settings)
    builder = _docker_builder(settings)
    writer = LogWriter(_client(settings), state.source_hash)
    try:
        if not builder.has_image(state.image):
            # Redelivered to a host that did not build it: build here first.
            builder.build(_build_request(state, settings), writer)
        auth = registry_for(state.ref, settings).push_auth()
        state.digest = builder.push(state.image, auth, writer)
    finally:
        writer.flush()
    state.status = "built"
    return "record"


def record(state: BuildState, settings: Settings) -> str:
    """Cleanup whatever the outcome; the record itself is written by the stage task."""
    _drop_tree(state)
    leftovers = []
    try:
        key: str | None = context_key(state) if state.source_hash else None
    except InputError:
        key = None  # a state naming another object: nothing of it is deleted
    if key and state.context_key and state.context_store:
        leftovers.append((state.context_store, key))
    elif key and state.builder in ("docker", "kaniko"):
        # Ended before its upload (skipped, failed): a holder killed after uploading may
        # have left this hash's context, and only the lock's current holder can remove it.
        leftovers.append((state.context_store or settings.context_store, key))
    leftovers += _shipped(state, settings)
    _delete(leftovers, settings)
    return ""


def discard(state: BuildState, settings: Settings) -> None:
    """Cleanup of a request that stops before the lock (cancelled): its fetched tree and
    the source archive the CLI shipped for it. The hash's context belongs to the lock."""
    _drop_tree(state)
    _delete(_shipped(state, settings), settings)


def _shipped(state: BuildState, settings: Settings) -> list[tuple[str, str]]:
    """The archive the CLI shipped for this request, when it lies in buildq's upload area
    (a state naming any other object deletes nothing)."""
    location = str(state.source.get("location") or "")
    if state.parent:
        return []  # the source of every platform: the multi-platform request deletes it
    if state.source.get("kind") == "archive" and is_shipped_source(location, settings):
        return [split_store_url(location)]
    return []


def _delete(leftovers: list[tuple[str, str]], settings: Settings) -> None:
    for store_url, key in leftovers:
        # A leftover object must not fail the record.
        with contextlib.suppress(Exception):
            store_for_url(store_url, settings).delete(key)


__all__ = ["current_settings"]
