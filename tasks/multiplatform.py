"""A multi-platform request: one ordinary build per platform, then an image index over them.

``build_image(..., platform=["linux/amd64", "linux/arm64"])`` fans out into one
single-platform request per platform, each a chain of its own (fetch → hash → … →
record) with its own inputs, hash, tag, lock and skip check: a platform whose image
exists is not built again, and two overlapping requests build a shared platform once,
because the per-hash lock sees to it. The platforms' chains run in parallel across the
pools: on the docker pool a build for a platform goes only to a host that can build it
(see ``tasks.app.platform_queue``); on the kaniko pool every platform's build is a Job of
its own (the ``kaniko`` queue), whose node selector picks a node of the platform's
architecture (workers/builders/kaniko/manifest.py ``platform_node_selector``).

The request's own task becomes ``assemble`` (queue ``control``), which looks at the
platforms' answers and hands itself back to the broker with a short countdown while
any is missing, so no worker slot waits on another. Once all are answered it pushes an
image index naming each platform's manifest under a tag derived from the sorted
per-platform hashes (``Registry.push_index``: an OCI image index, or a Docker manifest
list where the registry refuses that). One failed platform fails the request, naming the platform; no index is
pushed, and the platforms that were built stay pushed under their own tags, so a retry
reuses them.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
import uuid
from dataclasses import replace
from typing import Any

from celery import Task
from celery.exceptions import Ignore

from config.errors import BuildqError
from config.names import platform_fields
from config.settings import Settings
from tasks import inflight, operations
from tasks.app import app, settings
from tasks.cancelling import cancel
from tasks.connection import REDIS_PATIENCE_LEASES, REDIS_TROUBLE, redis_client
from tasks.events import emit
from tasks.failures import BuildFailed, failure_for, record_of
from tasks.keys import events_key
from tasks.notifications import announce
from tasks.records import OTHER, answered, claim_answer, find, make_record, store_unhashed
from tasks.state import BuildState
from workers import metrics
from workers.context import image_tag
from workers.registries import registry_for

log = logging.getLogger("buildq")

#: Seconds one look of ``assemble`` waits on the platforms' events for their answers
#: (holding its worker slot): a request whose platforms all exist is answered as soon as
#: they are, rather than at the next look.
LOOK_SECONDS = 1.0
#: Looks that wait so: the first ones, when platforms whose images exist answer. Later
#: ones (platforms are building) only look, so no worker slot waits on a long build.
BLOCKING_LOOKS = 3
#: Seconds between two looks, handed back to the broker (no slot held): the first wait,
#: growing by half each time up to the longest.
FIRST_LOOK = 0.25
LONGEST_WAIT = 3.0


def start(task: Task, state: BuildState) -> Any:
    """Fan ``state`` (a multi-platform request) out into its platforms' requests and make
    the task ``assemble``; a refusal before that becomes the request's failed record."""
    cfg = settings()
    client = redis_client(cfg)
    # A worker has the request: the watchdog must not send it again as lost. It is not
    # registered in flight either: a restart from fetch would build no platform at all.
    inflight.taken(client, state.request_id)
    emit(client, state.request_id, "stage", stage="platforms", state="started")
    try:
        for platform in state.platforms:
            operations.check_buildable(platform, state.builder, cfg)
        children = [_send(client, state, platform, cfg) for platform in state.platforms]
    except BuildqError as exc:
        state.fail(str(exc), exc.kind)
        return _answer(state, [], client, None)
    except Exception as exc:
        log.exception("internal error sending the platforms of %s", state.request_id)
        state.fail(f"internal error sending the platforms: {type(exc).__name__}: {exc}. The "
                   "worker's log has the details; please report it.", "internal")
        return _answer(state, [], client, None)
    data = {"state": state.to_dict(), "children": children, "looks": 0, "started": time.time()}
    return task.replace(assemble.s(data).set(shadow="buildq.build_image:platforms"))


def _send(client: Any, parent: BuildState, platform: str, cfg: Settings) -> dict[str, str]:
    """Send the single-platform request of ``platform`` (from fetch, as the watchdog
    restarts a request); its id and platform."""
    child = replace(BuildState.from_dict(parent.to_dict()), request_id=str(uuid.uuid4()),
                    platform=platform, platforms=[], parent=parent.request_id, notify=None,
                    created_at=time.time())
    # Restartable should its message be lost before a worker takes it.
    inflight.register(client, child, cfg.lock_lease)
    resume = app.tasks["buildq.resume"]
    signature = resume.s(child.to_dict()).set(task_id=child.request_id,
                                              shadow=f"buildq.build_image:{platform}")
    # Names the platform's own request, whose build log and events are its own.
    emit(client, parent.request_id, "stage", stage=f"build {platform}", state="started",
         platform_request=child.request_id)
    # In-process (embedded) the platform is built right here, and its failure raises.
    with contextlib.suppress(BuildFailed):
        signature.apply_async()
    return {"platform": platform, "request_id": child.request_id}


class AssembleTask(Task):
    """Waits for the platforms of a multi-platform request, then pushes their index."""

    name = "buildq.assemble"
    acks_late = True
    reject_on_worker_lost = True
    throws = (BuildFailed,)

    def run(self, data: dict[str, Any]) -> Any:
        waited = 0.0
        while True:
            try:
                return self._look(data)
            except REDIS_TROUBLE as exc:
                # Redis is the broker too: wait here and look again (a look may repeat).
                cfg = settings()
                if waited >= REDIS_PATIENCE_LEASES * cfg.lock_lease:
                    raise
                log.warning("assembling %s: Redis unreachable (%s); trying again",
                            data["state"].get("request_id"), exc)
                time.sleep(cfg.lock_lease / 3)
                waited += cfg.lock_lease / 3
            except (Ignore, BuildFailed):
                raise
            except Exception as exc:
                return self._crashed(data, exc)

    def _crashed(self, data: dict[str, Any], exc: Exception) -> Any:
        # A crash must still answer the request (the platforms keep their own answers).
        log.error("internal error assembling %s", data["state"].get("request_id"),
                  exc_info=exc)
        state = BuildState.from_dict(data["state"])
        state.fail(f"internal error assembling the platforms: {type(exc).__name__}: {exc}. "
                   "The worker's log has the details; please report it.", "internal")
        return _answer(state, [], redis_client(settings()), None)

    def _look(self, data: dict[str, Any]) -> Any:
        cfg = settings()
        client = redis_client(cfg)
        state = BuildState.from_dict(data["state"])
        children: list[dict[str, str]] = data["children"]
        if answered(client, state.request_id):
            # Cancelled (or answered by another copy of this task): stop what still runs.
            for child in children:
                if not answered(client, child["request_id"]):
                    cancel(child["request_id"], by=f"the multi-platform request {state.request_id}")
            raise Ignore()
        looks = int(data.get("looks") or 0)
        if looks < BLOCKING_LOOKS and not self.request.is_eager:
            _wait_for_answers(client, [c["request_id"] for c in children], LOOK_SECONDS)
        records = {c["request_id"]: _answer_of(client, c["request_id"])
                   for c in children if answered(client, c["request_id"])}
        for child in children:
            found = records.get(child["request_id"])
            if found is not None and not child.get("reported"):
                child["reported"] = "1"
                emit(client, state.request_id, "stage", stage=f"build {child['platform']}",
                     state="done", seconds=f"{time.time() - data['started']:.3f}",
                     status=str(found.get("status") or ""))
        if len(records) < len(children) or any(r is None for r in records.values()):
            wait = min(FIRST_LOOK * 1.5 ** looks, LONGEST_WAIT)
            data = {**data, "children": children, "looks": looks + 1}
            if self.request.is_eager:
                time.sleep(wait)
                return self._look(data)
            return self.replace(assemble.s(data).set(
                countdown=wait, shadow="buildq.build_image:platforms"))
        started = time.monotonic()
        platforms = [_platform_entry(c, records[c["request_id"]] or {}) for c in children]
        media_type = None
        try:
            media_type = _conclude(state, platforms, cfg)
        except BuildqError as exc:
            if exc.transient and int(data.get("tries") or 0) < cfg.max_retries:
                tries = int(data.get("tries") or 0)
                countdown = cfg.retry_base * 2 ** tries
                emit(client, state.request_id, "retry", stage="index", error=str(exc),
                     countdown=f"{countdown:.1f}")
                if self.request.is_eager:
                    time.sleep(countdown)
                    return self._look({**data, "tries": tries + 1})
                return self.replace(assemble.s({**data, "tries": tries + 1}).set(
                    countdown=countdown, shadow="buildq.build_image:platforms"))
            state.fail(str(exc), exc.kind)
        state.stages["index"] = time.monotonic() - started
        return _answer(state, platforms, client, media_type)


def _wait_for_answers(client: Any, request_ids: list[str], seconds: float) -> None:
    """Return once every request is answered, or after ``seconds``: blocking reads of their
    event streams, where each answer writes its ``done`` (see tasks/records.py)."""
    deadline = time.monotonic() + seconds
    while True:
        # Each stream's newest entry before looking at the answers, so that an answer
        # written after the look wakes the read below.
        cursors = {}
        for request_id in request_ids:
            newest = client.xrevrange(events_key(request_id), count=1)
            cursors[events_key(request_id)] = newest[0][0] if newest else "0-0"
        waiting = [r for r in request_ids if not answered(client, r)]
        left = deadline - time.monotonic()
        if not waiting or left <= 0:
            return
        client.xread({events_key(r): cursors[events_key(r)] for r in waiting},
                     block=max(1, int(left * 1000)))


def _answer_of(client: Any, request_id: str) -> dict[str, Any] | None:
    """The answer of an answered platform request: as stored for its caller (it says
    whether it was attached to another request's build), else its record."""
    result = app.AsyncResult(request_id)
    with contextlib.suppress(Exception):
        if result.ready():
            return record_of(result.get(propagate=False, disable_sync_subtasks=False))
    return find(client, request_id)


def _platform_entry(child: dict[str, str], found: dict[str, Any]) -> dict[str, Any]:
    """What the request's record says of one platform."""
    entry = {"platform": child["platform"], "request_id": child["request_id"],
             "status": found.get("status") or "unknown", "tag": found.get("tag"),
             "attached": bool(found.get("attached")),
             "image": found.get("image"), "digest": found.get("digest"),
             "source_hash": found.get("source_hash"), "builds": found.get("builds") or 0,
             "commit": (found.get("source") or {}).get("commit"), "bases": found.get("bases")}
    if entry["status"] not in ("built", "skipped"):
        entry["error"] = found.get("error") or "it ended without an image."
        entry["error_kind"] = found.get("error_kind") or "build"
    return entry


def index_tag(source_hashes: list[str]) -> str:
    """The tag of the index over images of these source hashes: the same platforms built
    from the same inputs always get the same tag, in whatever order they were asked."""
    return image_tag(hashlib.sha256("\n".join(sorted(source_hashes)).encode()).hexdigest())


def _conclude(state: BuildState, platforms: list[dict[str, Any]], cfg: Settings) -> str | None:
    """Fill ``state`` with the request's outcome: failed naming each failed platform, or
    the index over the platforms' images, pushed unless the registry has it already; the
    index's media type (None when there is none)."""
    failed = [p for p in platforms if p["status"] not in ("built", "skipped")]
    if failed:
        state.fail("; ".join(f"{p['platform']} failed: {p['error']}" for p in failed)
                   + " No image index was pushed; the other platforms' images stay under "
                   "their own tags.", str(failed[0]["error_kind"]))
        return None
    commits = {p["commit"] for p in platforms}
    if len(commits) > 1:
        state.fail("the platforms were built from different commits (the branch moved "
                   f"while they were fetched: {', '.join(sorted(map(str, commits)))}); no "
                   "image index was pushed.", "source")
        return None
    assert state.ref is not None
    state.commit = commits.pop()
    state.bases = list(platforms[0]["bases"] or [])
    state.tag = index_tag([str(p["source_hash"]) for p in platforms])
    state.ref = state.ref.tagged(state.tag)
    state.image = str(state.ref)
    registry = registry_for(state.ref, cfg)
    existing = None if state.force else registry.manifest(state.ref, state.tag)
    if existing is not None and all(p["status"] == "skipped" for p in platforms):
        state.digest = existing[2]
        state.status = "skipped"
        return existing[0]
    digest, media_type = registry.push_index(
        state.ref, state.tag,
        [(str(p["digest"]), platform_fields(p["platform"])) for p in platforms])
    state.digest = digest
    state.status = "built"
    return media_type


def _answer(state: BuildState, platforms: list[dict[str, Any]], client: Any,
            media_type: str | None) -> dict[str, Any]:
    """Write the request's record and answer it (once), then clean up."""
    cfg = settings()
    record = make_record(state, builds=sum(int(p.get("builds") or 0) for p in platforms))
    record.update({
        "platforms": [{k: v for k, v in p.items() if k not in ("bases", "commit")}
                      for p in platforms],
        "index": None if media_type is None else {
            "media_type": media_type,
            "format": "oci" if "oci" in media_type else "docker"},
        # The request holds no lock and has no build log of its own: each platform has.
        "source_hash": None,
        "log": None,
    })
    operations.discard(state, cfg)
    attempt = f"assemble:{uuid.uuid4().hex}"
    if claim_answer(client, state.request_id, attempt, done=str(state.status)) == OTHER:
        raise Ignore()  # cancelled meanwhile: that answer stands
    store_unhashed(client, record)
    metrics.build_finished(state, None)
    announce(record, state.notify, cfg)
    failure = failure_for(record)
    if failure is not None:
        raise failure
    return record


assemble = app.register_task(AssembleTask())
