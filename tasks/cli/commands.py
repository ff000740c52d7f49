"""The ``buildq`` command. Every user mistake ends here as a message and an exit code.

Exit codes: 0 built or skipped, 1 a failed build, 2 bad input (config, source,
options) or a service that cannot be reached.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click

from config.errors import BuildqError, InputError, ServiceError

#: Record error kinds that mean the user's input was wrong (exit 2).
INPUT_KINDS = {"input", "config", "source", "forbidden"}


def _fail(exc: BuildqError) -> NoReturn:
    click.secho(f"error: {exc.message}", fg="red", err=True)
    if exc.hint:
        click.echo(f"hint: {exc.hint}", err=True)
    sys.exit(2 if isinstance(exc, ServiceError) else exc.exit_code)


def _build_args(pairs: tuple[str, ...]) -> dict[str, str]:
    args: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InputError(f"--build-arg {pair!r} is not KEY=VALUE.",
                             "Write it as --build-arg NAME=value.")
        args[key] = value
    return args


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Turn source code into container images, tagged by source hash, built once."""


def _settings() -> Any:
    from config.settings import Settings

    return Settings.from_env()


build_options: list[Callable[[Any], Any]] = [
    click.option("--dockerfile", help="Dockerfile path inside the source (default: Dockerfile)."),
    click.option("--build-arg", "build_args", multiple=True, metavar="KEY=VALUE",
                 help="A build argument; repeatable."),
    click.option("--target", help="Multi-stage target to build."),
    click.option("--platform", help="Target platform, e.g. linux/amd64; several comma-separated "
                                    "(linux/amd64,linux/arm64) build one image each and an "
                                    "image index over them."),
    click.option("--base-policy", type=click.Choice(["digest", "tag"]),
                 help="digest (default): resolve each base image to its registry digest, hash "
                      "it and build from it; tag: hash the Dockerfile's text only "
                      "(builder.base-policy, BUILDQ_BASE_POLICY)."),
    click.option("--secret", "secrets", multiple=True, metavar="NAME",
                 help="A secret build arg, by name only; repeatable. Each worker that builds "
                      "reads its value from BUILDQ_SECRET_NAME or BUILDQ_SECRETS_DIR/NAME."),
]


#: Options of the Dockerfile generated for a Python project that has none.
python_options: list[Callable[[Any], Any]] = [
    click.option("--entrypoint", metavar="COMMAND",
                 help="For a project without a Dockerfile: the command its image runs."),
    click.option("--python", metavar="VERSION",
                 help="For a project without a Dockerfile: the Python version of its base image."),
    click.option("--gpu", is_flag=True,
                 help="For a project without a Dockerfile: build on builder.accelerator.base-image."),
    click.option("--config", "config_path", type=click.Path(dir_okay=False),
                 help="Launch-config YAML (default: $BUILDQ_CONFIG, then "
                      "~/.config/wandb/launch-config.yaml)."),
]


def with_build_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(build_options + python_options):
        fn = option(fn)
    return fn


def _described(source: str, ref: str | None, settings: Any, *, destination: str | None = None,
               dockerfile: str | None, build_args: tuple[str, ...], target: str | None,
               platform: str | None, secrets: tuple[str, ...], entrypoint: str | None,
               python: str | None, gpu: bool, config_path: str | None,
               base_policy: str | None) -> tuple[Any, Any]:
    """The request's state and config, as the chain would make them (without queueing)."""
    from tasks.operations import describe_request

    state, cfg, _ = describe_request(
        "local", source, settings, destination=destination, ref=ref, dockerfile=dockerfile,
        build_args=_build_args(build_args), target=target, platform=platform, config=config_path,
        entrypoint=entrypoint, python=python, gpu=gpu, secrets=secrets, base_policy=base_policy)
    return state, cfg


def _show_bases(state: Any) -> None:
    """What each base resolved to (on stderr, so stdout stays the tag or the manifest)."""
    if state.base_policy == "tag":
        click.echo("bases: hashed by their text (base policy tag)", err=True)
    for base in state.bases:
        click.echo(f"base: {base['image']} -> {base['digest']}", err=True)


@cli.command()
@click.argument("source")
@click.option("--destination", help="Registry repository to push to, without a tag.")
@click.option("--ref", help="Git branch, tag or commit.")
@with_build_options
@click.option("--builder", type=click.Choice(["docker", "kaniko", "noop"]),
              help="Override builder.type.")
@click.option("--force", is_flag=True,
              help="Build and push even when the tag exists (same hash, same tag).")
@click.option("--no-wait", "--detach", "no_wait", is_flag=True,
              help="Enqueue, print the request id and return at once (follow it with "
                   "buildq logs --follow ID).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="Stop waiting for the record after SECONDS (exit 2); the request goes on. "
                   "Default: wait as long as it takes.")
@click.option("--json", "as_json", is_flag=True, help="Print the record as JSON on the last line.")
@click.option("--notify", metavar="URL",
              help="POST the record to this http(s) URL when the request ends (besides "
                   "BUILDQ_NOTIFY_URL).")
def build(source: str, destination: str | None, ref: str | None, dockerfile: str | None,
          build_args: tuple[str, ...], target: str | None, platform: str | None,
          secrets: tuple[str, ...], base_policy: str | None, entrypoint: str | None,
          python: str | None, gpu: bool, config_path: str | None, builder: str | None,
          force: bool, no_wait: bool, timeout: float | None, as_json: bool,
          notify: str | None) -> None:
    """Build SOURCE (directory, .tar/.tar.gz, git URL) and push it, unless the tag exists.

    A Python project without a Dockerfile gets a generated one (see `buildq dockerfile`).
    """
    from config import load_config
    from tasks.connection import check_redis

    settings = _settings()
    if timeout is not None and no_wait:
        raise InputError("--timeout and --no-wait contradict each other: --no-wait does not wait.",
                         "Pass one of them.")
    if timeout is not None and settings.embedded:
        raise InputError("--timeout bounds the wait for workers, and with BUILDQ_REDIS_URL unset "
                         "the build runs in this process.",
                         "Set BUILDQ_REDIS_URL to build on workers, or drop --timeout.")
    cfg = load_config(config_path, env_path=settings.config_path,
                      destination_given=bool(destination))
    for warning in cfg.warnings:
        click.secho(f"warning: {warning}", fg="yellow", err=True)
    kwargs: dict[str, Any] = {
        "destination": destination, "ref": ref, "dockerfile": dockerfile,
        "build_args": _build_args(build_args), "target": target, "platform": platform,
        "builder": builder, "entrypoint": entrypoint, "python": python, "gpu": gpu,
        "secrets": list(secrets),
    }
    # Only options that were given travel, so a request reads as it did without them.
    if notify:
        from config.settings import check_notify_url

        kwargs["notify"] = check_notify_url(notify, "--notify")
    if base_policy:
        kwargs["base_policy"] = base_policy
    if force:
        kwargs["force"] = True
    if settings.embedded:
        kwargs["config"] = config_path
        _report(_run_embedded(source, kwargs, settings, as_json), as_json)
    _check_request(source, kwargs, cfg, settings)
    _check_bases(source, ref, dockerfile, kwargs["build_args"])
    check_redis(settings)
    kwargs["config"] = cfg.to_mapping()
    source = _ship_local_source(source, kwargs, settings)
    record = _run_remote(source, kwargs, settings, no_wait, as_json, timeout,
                         builder or cfg.builder.type)
    if record is not None:
        _report(record, as_json)


def _check_request(source: str, kwargs: dict[str, Any], cfg: Any, settings: Any) -> None:
    """Refuse what a worker would refuse (bad options, a source or destination outside the
    operator's rules) here, before anything is shipped or queued; the worker checks again."""
    from tasks.operations import check_kaniko_platforms, describe_request

    options = {k: v for k, v in kwargs.items() if k not in ("builder", "config")}
    # A local directory or archive is shipped to the upload area, which workers may read.
    state, _, _ = describe_request("local", source, settings, config=cfg.to_mapping(),
                                   for_workers=True, shipped=True, **options)
    if (kwargs.get("builder") or cfg.builder.type) == "kaniko":
        check_kaniko_platforms(state)


def _check_bases(source: str, ref: str | None, dockerfile: str | None,
                 build_args: dict[str, str]) -> None:
    """A malformed base image in a local Dockerfile is refused before anything is shipped."""
    from workers.bases import find_bases, parse_base
    from workers.sources import parse_source

    spec = parse_source(source, ref)
    if spec.kind != "directory" or "://" in spec.location:
        return
    path = Path(spec.location) / (dockerfile or "Dockerfile")
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return  # none (a generated one will come) or unreadable: the chain says which
    for base in find_bases(text, build_args):
        parse_base(base.image)


def _ship_local_source(source: str, kwargs: dict[str, Any], settings: Any) -> str:
    """Workers may sit on other hosts: pack a local directory into the context store."""
    from workers.context import BuildInputs, write_context
    from workers.sources import parse_source
    from workers.sources.roots import new_upload_key
    from workers.stores import store_for_url

    spec = parse_source(source, kwargs.get("ref"))
    if spec.kind not in ("directory", "archive") or "://" in spec.location:
        return source
    store = store_for_url(settings.context_store, settings)
    key = new_upload_key()
    if spec.kind == "directory":
        inputs = BuildInputs.create(kwargs["dockerfile"], kwargs["build_args"], kwargs["target"],
                                    kwargs["platform"])
        with store.writer(key) as out:
            # Without a named Dockerfile the worker may generate one: ship the bare source.
            size = write_context(Path(spec.location), inputs, out,
                                 require_dockerfile=bool(kwargs["dockerfile"]))
    else:
        with open(spec.location, "rb") as stream:
            size = store.upload(key, stream)
    click.echo(f"uploaded {spec.location} ({size / 1e6:.1f} MB) to {store.uri(key)}", err=True)
    return store.uri(key)


class Progress:
    """Stage lines and build log: a live spinner on a terminal, plain lines elsewhere."""

    def __init__(self, stream: Any) -> None:
        from rich.console import Console

        self.console = Console(file=stream, highlight=False, soft_wrap=True)
        self.tty = self.console.is_terminal
        self.spinner = self.console.status("waiting for a worker…") if self.tty else None
        if self.spinner:
            self.spinner.start()

    def line(self, text: str, style: str = "") -> None:
        if self.tty:
            self.console.print(text, style=style or None, markup=False)
        else:
            print(text, file=self.console.file, flush=True)

    def show(self, event: dict[str, str]) -> None:
        kind = event.get("kind")
        if kind == "log":
            self.line(f"  | {event['line']}", "dim")
        elif kind == "stage" and event.get("state") == "done":
            mark = "✓" if self.tty else "done"
            self.line(f"{mark} {event['stage']} ({float(event.get('seconds') or 0):.2f}s)", "green")
        elif kind == "stage":
            if self.spinner:
                self.spinner.update(f"{event['stage']}…")
            else:
                self.line(f"… {event['stage']}")
        elif kind == "hashed":
            self.line(f"  source hash {event['source_hash'][:16]}… → {event['image']}")
        elif kind == "attached":
            self.line("  an identical build is running: waiting for its result")
            if self.spinner:
                self.spinner.update("waiting for the identical build…")
        elif kind == "retry":
            self.line(f"  retrying {event['stage']} in {event['countdown']}s: {event['error']}",
                      "yellow")

    def close(self) -> None:
        if self.spinner:
            self.spinner.stop()


def _warn(text: str) -> None:
    click.secho(f"warning: {text}", fg="yellow", err=True)


def _watch(client: Any, request_id: str, since_ms: int, finished: Callable[[], bool],
           as_json: bool, block_ms: int | None = 300, lookout: Any = None) -> None:
    from tasks.events import follow

    def done() -> bool:
        # Called whenever the request's streams are quiet: the moment to ask whether
        # anybody is there to pick it up.
        if lookout is not None:
            lookout.tick()
            if lookout.expired:
                return True
        return finished()

    progress = Progress(sys.stderr if as_json else sys.stdout)
    try:
        for event in follow(client, request_id, since_ms, done, block_ms):
            progress.show(event)
            if lookout is not None:
                lookout.saw(event)
                if lookout.expired:
                    break
    finally:
        progress.close()


def _run_embedded(source: str, kwargs: dict[str, Any], settings: Any,
                  as_json: bool) -> dict[str, Any]:
    from tasks import requester
    from tasks.connection import redis_client
    from tasks.stages import build_image

    request_id = str(uuid.uuid4())
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["record"] = build_image.apply(args=[source], kwargs=kwargs,
                                                  task_id=request_id,
                                                  headers=requester.headers()).get()
        except BaseException as exc:
            outcome["error"] = exc

    since = int(time.time() * 1000)
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    _watch(redis_client(settings), request_id, since, lambda: not worker.is_alive(), as_json,
           block_ms=None)
    worker.join()
    if "error" in outcome:
        from tasks.failures import BuildFailed

        if isinstance(outcome["error"], BuildFailed):
            return outcome["error"].record
        raise outcome["error"]
    return dict(outcome["record"])


def _run_remote(source: str, kwargs: dict[str, Any], settings: Any, no_wait: bool,
                as_json: bool, timeout: float | None = None,
                builder: str | None = None) -> dict[str, Any] | None:
    from tasks import requester
    from tasks.cli.lookout import Lookout, pool_notice
    from tasks.connection import redis_client
    from tasks.stages import build_image

    client = redis_client(settings)
    since = int(time.time() * 1000)
    result = build_image.apply_async(args=[source], kwargs=kwargs, headers=requester.headers())
    if no_wait:
        click.echo(result.id)
        notice = pool_notice(client, "control")
        if notice:
            _warn(f"{notice}; the request waits in the queue until one does.")
        return None
    click.echo(f"request {result.id}", err=True)
    lookout = Lookout(client, builder, timeout, _warn)
    _watch(client, result.id, since, result.ready, as_json, lookout=lookout)
    if lookout.expired and not result.ready():
        raise ServiceError(*lookout.gave_up(result.id))
    from tasks.failures import outcome

    return outcome(result)


def _report(record: dict[str, Any], as_json: bool) -> NoReturn:
    status = record.get("status")
    out = sys.stderr if as_json else sys.stdout
    if status in ("built", "skipped"):
        note = " (attached to an identical build)" if record.get("attached") else ""
        click.echo(f"{status}{note}: {record['image']}@{record['digest']}", file=out)
        code = 0
    else:
        label = "cancelled" if status == "cancelled" else "failed"
        click.secho(f"{label}: {record.get('error')}", fg="red", file=out)
        code = 2 if record.get("error_kind") in INPUT_KINDS else 1
    if as_json:
        click.echo(json.dumps(record, sort_keys=True))
    sys.exit(code)


@cli.command("hash")
@click.argument("source")
@click.option("--ref", help="Git branch, tag or commit.")
@with_build_options
@click.option("--full", is_flag=True, help="Print the full source hash, not the tag.")
def hash_command(source: str, ref: str | None, dockerfile: str | None,
                 build_args: tuple[str, ...], target: str | None, platform: str | None,
                 secrets: tuple[str, ...], base_policy: str | None, entrypoint: str | None,
                 python: str | None, gpu: bool, config_path: str | None, full: bool) -> None:
    """Print the tag SOURCE would get (the same options as build give the same tag)."""
    from tasks.operations import hash_elsewhere
    from workers.context import image_tag

    settings = _settings()
    state, _ = _described(source, ref, settings, dockerfile=dockerfile, build_args=build_args,
                          target=target, platform=platform, secrets=secrets, entrypoint=entrypoint,
                          python=python, gpu=gpu, config_path=config_path, base_policy=base_policy)
    if state.platforms:
        # One image per platform, each with its own hash, and the index's tag over them.
        import dataclasses

        from tasks.multiplatform import index_tag

        hashes = []
        for one in state.platforms:
            single = dataclasses.replace(state, platform=one, platforms=[])
            hashes.append(hash_elsewhere(single, settings))
            click.echo(f"{one} {hashes[-1] if full else image_tag(hashes[-1])}")
        _show_bases(single)
        click.echo(f"index {index_tag(hashes)}")
        return
    digest = hash_elsewhere(state, settings)
    _show_bases(state)
    click.echo(digest if full else image_tag(digest))


@cli.command()
@click.argument("pool", type=click.Choice(["control", "docker", "kaniko"]))
@click.option("--concurrency", "-c", type=click.IntRange(min=1), help="Worker processes.")
@click.option("--loglevel", "-l", default="INFO", show_default=True)
@click.option("--hostname", "-n", metavar="NAME@HOST",
              help="Celery node name (%h = host name), unique per worker; default POOL-PID-RANDOM@HOST.")
@click.option("--metrics-port", metavar="[ADDRESS:]PORT",
              help="Serve Prometheus metrics (and /healthz) here; no metrics without it.")
@click.option("--json-logs", is_flag=True, help="One JSON object per log line (default: plain lines).")
def worker(pool: str, concurrency: int | None, loglevel: str, hostname: str | None,
           metrics_port: str | None, json_logs: bool) -> None:
    """Start a worker of POOL (needs BUILDQ_REDIS_URL)."""
    from tasks.cli.pools import run_worker

    run_worker(pool, _settings(), concurrency, loglevel, metrics_port=metrics_port,
               json_logs=json_logs, hostname=hostname)


@cli.command(context_settings={"ignore_unknown_options": True})
@click.option("--port", default=5555, show_default=True, type=click.IntRange(1, 65535))
@click.option("--address", help="Interface to listen on (default 0.0.0.0; 127.0.0.1 with --no-auth).")
@click.option("--basic-auth", metavar="USER:PASSWORD[,USER:PASSWORD]",
              help="Login(s) for the UI and API; default: $BUILDQ_FLOWER_BASIC_AUTH.")
@click.option("--no-auth", is_flag=True, help="No login, reachable from this host only.")
@click.argument("flower_args", nargs=-1, type=click.UNPROCESSED)
def flower(port: int, address: str | None, basic_auth: str | None, no_auth: bool,
           flower_args: tuple[str, ...]) -> None:
    """Start Flower for buildq's workers; further arguments go to Flower (e.g. --url-prefix=x)."""
    from tasks.cli.flower import run_flower

    run_flower(_settings(), port=port, address=address, basic_auth=basic_auth, no_auth=no_auth,
               extra=list(flower_args))


def _redis() -> Any:
    from tasks.connection import check_redis, redis_client

    settings = _settings()
    if settings.embedded:
        raise ServiceError("records live in Redis, and BUILDQ_REDIS_URL is not set.",
                           "Set BUILDQ_REDIS_URL to the Redis your workers use.")
    check_redis(settings)
    return redis_client(settings)


@cli.command()
@click.argument("ident")
def status(ident: str) -> None:
    """Show the record of a request id or source hash (or tag); a request still queued or
    running shows where it stands."""
    from tasks.cli.lookout import pool_notice
    from tasks.events import progress_of
    from tasks.queued import find_queued
    from tasks.records import find

    client = _redis()
    found = find(client, ident)
    queued = find_queued(client, ident) if found is None else None
    if queued is not None:
        notice = pool_notice(client, queued.pool)
        if notice:
            _warn(notice)
        found = queued.as_dict(ident)
    elif found is None:
        # Taken by a worker, not answered yet: its events say how far it got.
        found = progress_of(client, ident)
    if found is None:
        raise InputError(f"no record for {ident!r}.",
                         "Give a request id printed by `buildq build`, a source hash or a tag.")
    click.echo(json.dumps(found, indent=2, sort_keys=True))


@cli.command()
@click.option("-n", "limit", default=20, show_default=True, type=click.IntRange(min=1))
@click.option("--status", "statuses", multiple=True,
              type=click.Choice(["built", "skipped", "failed", "cancelled"]),
              help="Only records with this status; repeatable.")
@click.option("--repository", metavar="REGISTRY/REPOSITORY",
              help="Only images of this repository (as builds name their destination).")
@click.option("--since", metavar="AGE|DATE",
              help="Only records written since then: an age (90s, 30m, 12h, 30d, 4w) or a "
                   "UTC date/time (2026-11-30, 2026-11-30T12:00).")
@click.option("--before", type=float, metavar="CURSOR",
              help="The next page: the cursor the previous page printed.")
@click.option("--requester", metavar="USER@HOST",
              help="Only builds this requester asked for (a glob, e.g. 'alice@*'); a claimed "
                   "user@host, or a certificate subject with signing on.")
@click.option("--json", "as_json", is_flag=True, help="Print the records as a JSON list.")
def history(limit: int, statuses: tuple[str, ...], repository: str | None, since: str | None,
            before: float | None, requester: str | None, as_json: bool) -> None:
    """The latest records, newest first (each source hash's last build, and requests that
    ended before a hash: refused or cancelled)."""
    from tasks.records import search

    rows, more = search(_redis(), limit, status=statuses, repository=repository,
                        since=_since(since) if since else None, before=before,
                        requester=requester)
    if as_json:
        click.echo(json.dumps(rows))
    else:
        for row in rows:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row.get("finished_at", 0)))
            who = row.get("requester") or "-"
            if row.get("requester") and not row.get("requester_verified"):
                who += " (unverified)"
            click.echo(f"{when}  {row.get('status', '?'):9} {row.get('tag') or '-':24} "
                       f"{row.get('image') or row.get('error') or ''}  {who}")
    if more is not None:
        click.echo(f"more: add --before {more!r} for the next page", err=True)


def _since(text: str) -> float:
    from datetime import UTC, datetime

    from tasks.retention import parse_age

    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return time.time() - parse_age(text, "--since")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


@cli.command()
@click.option("--repository", metavar="REGISTRY/REPOSITORY",
              help="Only images of this repository (as builds name their destination).")
@click.option("--rebuild", is_flag=True, help="Queue a build of each stale image, as first asked.")
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
def stale(repository: str | None, rebuild: bool, as_json: bool) -> None:
    """List recorded images whose base images have moved since they were built."""
    from tasks import build_image
    from tasks.stale import rebuild_arguments, stale_images

    found = stale_images(_redis(), _settings(), repository)
    if rebuild:
        for entry in found:
            try:
                source, options = rebuild_arguments(entry)
            except ValueError as exc:
                _warn(f"{exc}; skipped.")
                continue
            try:
                entry["rebuild"] = build_image.delay(source, **options).id
            except BuildqError as exc:
                _warn(f"{entry.get('image')}: {exc.message}; skipped.")
    if as_json:
        click.echo(json.dumps(found, indent=2, sort_keys=True))
        return
    if not found:
        click.echo("no recorded image has a moved base.")
    for entry in found:
        for base in entry["moved"]:
            now = base["now"] or "gone (or its registry did not answer)"
            click.echo(f"{entry['image']}: base {base['image']} moved {base['built_with']} -> {now}")
        if entry.get("rebuild"):
            click.echo(f"  rebuilding: request {entry['rebuild']}")


@cli.command()
@click.argument("ident", required=False)
@click.option("--all", "everyone", is_flag=True,
              help="Also cancel every request attached to the same build.")
def cancel(ident: str | None, everyone: bool) -> None:
    """Cancel a request (id), or the build of a source hash or tag, wherever it is."""
    from tasks.cancelling import cancel as cancel_request
    from tasks.cancelling import requests_of

    if not ident:
        raise InputError("cancel needs the request to stop.",
                         "buildq cancel <request-id | source-hash | tag> [--all]")
    client = _redis()
    for request_id in requests_of(client, ident, everyone):
        done = cancel_request(request_id)
        if done.finished:
            click.echo(f"{request_id}: already finished ({done.record.get('status')}); "
                       "nothing to cancel")
        else:
            click.echo(f"{request_id}: cancelled")


@cli.command()
@click.option("--repository", required=True, metavar="REGISTRY/REPOSITORY",
              help="The repository to clean, as builds name their destination.")
@click.option("--keep", type=click.IntRange(min=0), metavar="N",
              help="Keep the N newest of buildq's tags.")
@click.option("--older-than", "older_than", metavar="AGE",
              help="Delete only images older than AGE (90s, 30m, 12h, 30d, 4w).")
@click.option("--dry-run", is_flag=True, help="List what would go; delete nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the verdicts as JSON.")
def gc(repository: str, keep: int | None, older_than: str | None, dry_run: bool,
       as_json: bool) -> None:
    """Delete tags buildq made in a repository beyond the N newest or older than an age."""
    from tasks.retention import collect, parse_age, plan

    age = parse_age(older_than) if older_than is not None else None
    settings = _settings()
    found = plan(_redis(), settings, repository, keep, age)
    doomed = [t for t in found if t.verdict == "delete"]
    if not dry_run:
        collect(settings, repository, doomed)
    if as_json:
        click.echo(json.dumps([t.to_dict() for t in found], indent=2))
        return
    verb = "would delete" if dry_run else "deleted"
    for t in found:
        when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(t.created))
        action = verb if t.verdict == "delete" else f"kept ({t.verdict})"
        click.echo(f"{action:24} {t.tag}  {when}  {t.digest}")
    click.echo(f"{len(doomed)} of {len(found)} buildq tag(s) {verb}.", err=True)


@cli.command()
@click.argument("ident")
@click.option("--follow", "-f", is_flag=True,
              help="Stream the stages and the build log live until the request ends, then "
                   "print its status line and exit as `buildq build` would.")
def logs(ident: str, follow: bool) -> None:
    """Print the build log of a request id, source hash or tag."""
    from tasks.keys import log_key
    from tasks.records import find

    client = _redis()
    if follow:
        _follow(client, ident)
    found = find(client, ident)
    source_hash = (found or {}).get("source_hash") or ident
    for _, fields in client.xrange(log_key(source_hash)):
        click.echo(fields.get("line", ""))


def _follow(client: Any, ident: str) -> NoReturn:
    """``logs --follow``: blocking reads of the request's streams (XREAD BLOCK) until it is
    answered; Ctrl-C stops following, never the build."""
    from celery.exceptions import TimeoutError as CeleryTimeout

    from tasks.app import app
    from tasks.cancelling import requests_of
    from tasks.failures import outcome
    from tasks.records import answered, find

    request_id = requests_of(client, ident)[0]
    try:
        _watch(client, request_id, 0, lambda: answered(client, request_id), False, block_ms=1000)
    except KeyboardInterrupt:
        click.echo(f"stopped following; request {request_id} goes on "
                   f"(buildq logs --follow {request_id} picks it up again).", err=True)
        sys.exit(130)
    # The request's own answer while Celery keeps it (result_expires), else its record.
    try:
        # Stored a moment after the request is marked answered.
        record: dict[str, Any] | None = outcome(app.AsyncResult(request_id), timeout=5)
    except CeleryTimeout:
        record = find(client, request_id)
    if record is None:
        raise ServiceError(f"request {request_id} ended, but its record is no longer kept.",
                           f"buildq history lists what is kept; buildq logs {request_id} "
                           "prints its build log while that is kept.")
    _report(record, False)


@cli.group("config")
def config_group() -> None:
    """Inspect the launch-config."""


@config_group.command("check")
@click.option("--config", "config_path", type=click.Path(dir_okay=False))
def config_check(config_path: str | None) -> None:
    """Validate the launch-config and print it resolved."""
    import yaml

    from config import load_config

    cfg = load_config(config_path, env_path=_settings().config_path)
    for warning in cfg.warnings:
        click.secho(f"warning: {warning}", fg="yellow", err=True)
    click.echo(f"# {cfg.origin}: valid")
    dest = cfg.destination()
    if dest:
        click.echo(f"# images go to {dest.name}:<source-hash>")
    click.echo(yaml.safe_dump(cfg.to_mapping(), sort_keys=False).rstrip() or "{}")


@cli.command("kaniko-job")
@click.argument("source")
@click.option("--destination", help="Registry repository to push to, without a tag.")
@click.option("--ref", help="Git branch, tag or commit.")
@with_build_options
def kaniko_job(source: str, destination: str | None, ref: str | None, dockerfile: str | None,
               build_args: tuple[str, ...], target: str | None, platform: str | None,
               secrets: tuple[str, ...], base_policy: str | None, entrypoint: str | None,
               python: str | None, gpu: bool, config_path: str | None) -> None:
    """Print the Kaniko Job manifest (YAML) SOURCE would get, without creating it: one
    document per platform when several are asked for (one Job each)."""
    import dataclasses

    import yaml

    from tasks.operations import (
        check_kaniko_platforms,
        hash_elsewhere,
        kaniko_request,
        kaniko_store,
    )
    from workers.builders.kaniko import render_job

    settings = _settings()
    state, cfg = _described(source, ref, settings, destination=destination, dockerfile=dockerfile,
                            build_args=build_args, target=target, platform=platform,
                            secrets=secrets, entrypoint=entrypoint, python=python, gpu=gpu,
                            config_path=config_path, base_policy=base_policy)
    check_kaniko_platforms(state)
    if state.ref is None or not cfg.builder.build_context_store:
        raise InputError("a kaniko Job needs builder.destination and builder.build-context-store.",
                         "Set both in the launch-config (or pass --destination).")
    state.context_store = kaniko_store(cfg)
    singles = ([dataclasses.replace(state, platform=one, platforms=[]) for one in state.platforms]
               or [state])
    jobs = []
    for single in singles:
        hash_elsewhere(single, settings)
        jobs.append(render_job(kaniko_request(single, settings), cfg, settings))
    _show_bases(singles[-1])
    click.echo(yaml.safe_dump_all(jobs, sort_keys=False).rstrip())


@cli.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="Launch-config YAML (default: $BUILDQ_CONFIG, then ~/.config/wandb/launch-config.yaml).")
def doctor(config_path: str | None) -> None:
    """Check config, credentials, registry, context store and builder; exit 1 if any fails."""
    from tasks.cli.doctor import run_doctor

    sys.exit(run_doctor(_settings(), config_path, sys.stdout))


@cli.command("dockerfile")
@click.argument("source")
@click.option("--ref", help="Git branch, tag or commit.")
@click.option("--entrypoint", metavar="COMMAND", help="The command the image runs.")
@click.option("--python", metavar="VERSION",
              help="Python version of the base image (default: a W&B job's runtime, the project's "
                   ".python-version, runtime.txt, Pipfile, requires-python or Poetry's python, "
                   "else 3.12).")
@click.option("--gpu", is_flag=True, help="Build on builder.accelerator.base-image.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="Launch-config YAML (default: $BUILDQ_CONFIG, then ~/.config/wandb/launch-config.yaml).")
@click.option("--save", is_flag=True,
              help="Write it into SOURCE (a directory) as Dockerfile instead of printing it.")
def dockerfile_command(source: str, ref: str | None, entrypoint: str | None, python: str | None,
                       gpu: bool, config_path: str | None, save: bool) -> None:
    """Print the Dockerfile a build of SOURCE would use (generated when it has none)."""
    import tempfile

    from config import load_config
    from workers.dockerfile import DOCKERFILE, PythonOptions, has_dockerfile, plan
    from workers.sources import fetch_source, parse_source

    settings = _settings()
    cfg = load_config(config_path, env_path=settings.config_path)
    options = PythonOptions.create(cfg, entrypoint=entrypoint, python=python, gpu=gpu)
    spec = parse_source(source, ref)
    if spec.kind == "image":
        raise InputError("an image source needs no build, so it has no Dockerfile.",
                         "Give a directory, archive or git URL.")
    if save and spec.kind != "directory":
        raise InputError(f"--save writes into a local directory, and {source} is a {spec.kind}.",
                         "Run it on a checkout of the project, or drop --save and redirect the output.")
    with tempfile.TemporaryDirectory(prefix="buildq-dockerfile-") as scratch:
        fetched = fetch_source(spec, Path(scratch), settings)
        try:
            root = fetched.root
            if has_dockerfile(root):
                if save:
                    raise InputError(f"{source} already has a Dockerfile; buildq never overwrites it.",
                                     "Builds use that Dockerfile as it is; delete it first to "
                                     "save a generated one.")
                click.echo(f"# {source} has its own Dockerfile; builds use it unchanged.", err=True)
                click.echo((root / DOCKERFILE).read_text(encoding="utf-8", errors="replace"), nl=False)
                return
            found = plan(root, options)
            for warning in found.warnings:
                click.echo(f"warning: {warning}", err=True)
            if found.text is None:
                named = f"{found.context}/{found.dockerfile}" if found.context else found.dockerfile
                if save:
                    raise InputError(f"{source} is a W&B job that names its own Dockerfile ({named}).",
                                     "Builds use that Dockerfile; there is nothing to save.")
                click.echo(f"# {source} is a W&B job naming its own Dockerfile ({named}); builds "
                           "use it unchanged.", err=True)
                click.echo((root / str(named)).read_text(encoding="utf-8", errors="replace"), nl=False)
                return
            text = found.text
            if not save:
                click.echo(text, nl=False)
                return
            try:
                # "x": created only if still absent, so a racing editor's file is never replaced.
                with open(root / DOCKERFILE, "x", encoding="utf-8", newline="\n") as f:
                    f.write(text)
            except FileExistsError:
                raise InputError(f"{source} already has a Dockerfile; buildq never overwrites it.",
                                 "Delete it first to save a generated one.") from None
            click.echo(f"wrote {root / DOCKERFILE}", err=True)
            if found.ignore and not (root / ".dockerignore").exists():
                # The saved Dockerfile is built with the project's own ignore file from now
                # on: write the default one, so the build sees what it saw before.
                (root / ".dockerignore").write_text("\n".join(found.ignore) + "\n", encoding="utf-8")
                click.echo(f"wrote {root / '.dockerignore'}", err=True)
        finally:
            fetched.cleanup()


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except BuildqError as exc:
        _fail(exc)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.UsageError as exc:
        # The same two lines as every other refusal: what is wrong, then how to fix it
        # (click's own form puts the usage first and the problem after a blank line).
        command = exc.ctx.command_path if exc.ctx else "buildq"
        click.secho(f"error: {exc.format_message()}", fg="red", err=True)
        click.echo(f"hint: see '{command} --help' for the options and arguments.", err=True)
        sys.exit(2)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)

