"""The record: one JSON document per build, what ``.get()`` returns.

Stored by source hash (written atomically with the lock release, see
:mod:`tasks.lock`), with a history index and a map from each request id to its
hash so ``buildq status`` takes either.
"""

from __future__ import annotations

import fnmatch
import heapq
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import redis
from redis.client import Pipeline

from tasks.events import EVENTS_MAXLEN, STREAM_TTL
from tasks.keys import (
    HISTORY,
    REQUEST_HISTORY,
    answered_key,
    events_key,
    last_tag_key,
    log_key,
    record_key,
    request_hash_key,
    request_record_key,
)
from tasks.lock import HISTORY_SIZE
from tasks.scripts import add_script, script
from tasks.state import BuildState
from workers.sources.base import redact_credentials

#: How long request-id look-ups are kept.
REQUEST_TTL = 30 * 24 * 3600


#: What :func:`claim_answer` says.
OTHER, FIRST, AGAIN = 0, 1, 2


def claim_answer(client: redis.Redis, request_id: str, attempt: str,
                 done: str | None = None,
                 store: tuple[str | bytes, str | bytes, int] | None = None) -> int:
    """Whether ``attempt`` answers ``request_id``: FIRST once per request (with the request's
    ``done`` event when a status is given), AGAIN when that attempt repeats, else OTHER.

    ``store``: (key, value, lifetime in seconds) of the answer as the result backend keeps
    it (see :func:`backend_answer`), written with the claim when it is this attempt's.
    """
    return int(script(client, "answer")(*_claim_arguments(request_id, attempt, done, store)))


def add_claim(pipe: Pipeline, client: redis.Redis, request_id: str, attempt: str,
              done: str | None = None,
              store: tuple[str | bytes, str | bytes, int] | None = None) -> Callable[[Any], int]:
    """Queue :func:`claim_answer` on ``pipe``; returns what reads its reply."""
    read = add_script(pipe, client, "answer", *_claim_arguments(request_id, attempt, done, store))
    return lambda reply: int(read(reply))


def _claim_arguments(request_id: str, attempt: str, done: str | None,
                     store: tuple[str | bytes, str | bytes, int] | None,
                     ) -> tuple[list[str | bytes], list[str | bytes | int]]:
    keys: list[str | bytes] = [answered_key(request_id), events_key(request_id)]
    args: list[str | bytes | int] = [attempt, REQUEST_TTL, "1" if done is not None else "0",
                                     done or "", EVENTS_MAXLEN, STREAM_TTL]
    if store is not None:
        keys.append(store[0])
        args += [store[1], store[2]]
    return keys, args


def backend_answer(backend: Any, task_id: str, result: Any, state: str,
                   request: Any = None) -> tuple[str | bytes, str | bytes, int] | None:
    """The key, value and lifetime Celery's Redis result backend writes for ``result``
    (``store_result``'s own encoding), so :func:`claim_answer` can store it with the claim;
    None for another backend (the embedded mode's), which stores it itself.

    ``store_result`` would also read the key first, to keep a success already there: the
    claim is what keeps the first answer here, and that read was a round trip per answer.
    """
    from celery.backends.redis import RedisBackend

    if not isinstance(backend, RedisBackend):
        return None
    meta = backend._get_result_meta(result=backend.encode_result(result, state), state=state,
                                    traceback=None, request=request)
    meta["task_id"] = task_id
    lifetime = backend.failure_expires if state == "FAILURE" else backend.expires
    if not lifetime:
        return None  # kept forever: store_result's own SET, without a lifetime
    return backend.get_key_for_task(task_id), backend.encode(meta), int(lifetime)


def answered(client: redis.Redis, request_id: str) -> bool:
    return bool(client.exists(answered_key(request_id)))


def answered_by(client: redis.Redis, request_id: str) -> str | None:
    """The attempt that answered ``request_id``, or None."""
    found = client.get(answered_key(request_id))
    return str(found) if found is not None else None


def rebuilt_reason(notes: dict[str, str]) -> str | None:
    """Why a source was built more than once for one record, from its build notes
    (attempt → token; one token per lease epoch), or None when it was not."""
    if len(notes) < 2:
        return None
    epochs = len(set(notes.values()))
    if epochs > 1:
        return (f"built {len(notes)} times: the lock was lost while a build ran (its lease ran "
                "out: the holder stalled, or could not reach Redis for longer than "
                f"BUILDQ_LOCK_LEASE) and {epochs - 1} later lease(s) built it again")
    return (f"built {len(notes)} times under one lease: Redis lost the note of a running build "
            "(it crashed before its last writes reached the disk) and a redelivered stage "
            "built again")


def count_late_build(client: redis.Redis, source_hash: str) -> dict[str, Any] | None:
    """Add a build to the hash's record written without it; returns the amended record.

    A build whose start note a crashed Redis lost, and that ended after another lease's
    chain wrote the record, would otherwise go unreported.
    """
    key = record_key(source_hash)
    amended: dict[str, Any] = {}

    def amend(pipe: Any) -> None:
        raw = pipe.get(key)
        if not raw:
            return
        record = json.loads(str(raw))
        record["builds"] = int(record.get("builds") or 0) + 1
        record["rebuilt"] = (f"built {record['builds']} times: a build whose lock was lost "
                             "(Redis lost its last writes in a crash) ended after this record "
                             "was written")
        pipe.multi()
        pipe.set(key, json.dumps(record))
        amended.update(record)

    client.transaction(amend, key)
    return amended or None


def make_record(state: BuildState, *, attached: bool = False, builds: int = 0,
                rebuilt: str | None = None) -> dict[str, Any]:
    source = dict(state.source)
    if isinstance(source.get("location"), str):
        # A refused source may still hold the token the user pasted into its URL.
        source["location"] = redact_credentials(source["location"])
    if state.commit:
        source["commit"] = state.commit
    return {
        "id": state.request_id,
        "status": state.status,
        "image": state.image,
        "digest": state.digest,
        "tag": state.tag,
        "source_hash": state.source_hash,
        "source": source,
        "destination": state.destination,
        "builder": state.builder,
        # For a generated build: whether the image got a lock's exact pins, which lock, and
        # the W&B job description it followed.
        "dependencies": (state.generated or {}).get("dependencies"),
        "lock": (state.generated or {}).get("lock"),
        "job": (state.generated or {}).get("job"),
        "frontend": state.frontend,
        "dockerfile_frontend": state.dockerfile_frontend,
        # The base images the hash covered and the digest each resolved to (empty with
        # the tag policy, which the record names), and whether the build was forced.
        "bases": list(state.bases),
        "base_policy": state.base_policy,
        "forced": state.force,
        # What was asked, so an image can be built again as it was (buildq stale --rebuild).
        "request": request_of(state),
        # Who asked: a verified certificate subject with signing on, else a claim.
        "requester": state.requester,
        "requester_verified": state.requester_verified,
        "attached": attached,
        # How many times the source was built for this record (0: the image existed), and
        # why when more than once: a second build is reported, never silent.
        "builds": builds,
        "rebuilt": rebuilt,
        "stages": {k: round(v, 4) for k, v in state.stages.items()},
        "log": f"redis:{log_key(state.source_hash)}" if state.source_hash else None,
        "error": state.error,
        "error_kind": state.error_kind,
        # Only a cancelled record says who cancelled it and when.
        **({"cancelled_by": state.cancelled_by, "cancelled_at": state.cancelled_at}
           if state.status == "cancelled" else {}),
        "created_at": state.created_at,
        "finished_at": time.time(),
        # One platform's build of a multi-platform request names that request.
        **({"parent": state.parent} if state.parent else {}),
    }


#: The fields of a state that describe what was asked (not how far it got).
REQUEST_FIELDS = ("source", "destination", "dockerfile", "build_args", "secrets", "target",
                  "platform", "builder", "config", "entrypoint", "python", "gpu", "base_policy")


def request_of(state: BuildState) -> dict[str, Any]:
    """The request as ``build_image`` takes it; secret names only, never their values."""
    asked: dict[str, Any] = {name: getattr(state, name) for name in REQUEST_FIELDS}
    if state.platforms:
        asked["platform"] = list(state.platforms)
    source = dict(state.source)
    asked["source"] = redact_credentials(str(source.get("location") or ""))
    asked["ref"] = state.commit or source.get("ref")
    return asked


def for_request(record: dict[str, Any], request_id: str, attached: bool,
                entry: dict[str, Any] | None = None) -> dict[str, Any]:
    """The same build, as the answer to another request (``entry``: its pending entry,
    which names who asked it)."""
    answer = {**record, "id": request_id, "attached": attached}
    if entry is not None and attached:
        answer["requester"] = entry.get("requester")
        answer["requester_verified"] = bool(entry.get("requester_verified"))
    return answer


def remember_request(client: redis.Redis | Pipeline, request_id: str, source_hash: str) -> None:
    client.set(request_hash_key(request_id), source_hash, ex=REQUEST_TTL)


def store_unhashed(client: redis.Redis, record: dict[str, Any]) -> None:
    """A record for a request that never reached the lock (bad input, noop builder) or
    was cancelled; indexed for ``buildq history`` (the newest HISTORY_SIZE, REQUEST_TTL)."""
    pipe = client.pipeline(transaction=True)
    pipe.set(request_record_key(record["id"]), json.dumps(record), ex=REQUEST_TTL)
    pipe.zadd(REQUEST_HISTORY, {record["id"]: float(record.get("finished_at") or time.time())})
    pipe.zremrangebyrank(REQUEST_HISTORY, 0, -HISTORY_SIZE - 1)
    pipe.execute()


def find(client: redis.Redis, ident: str) -> dict[str, Any] | None:
    """A record by request id, by full source hash, or by tag (a hash prefix)."""
    raw = client.get(request_record_key(ident))
    if raw:
        return dict(json.loads(str(raw)))
    source_hash = client.get(request_hash_key(ident))
    if source_hash:
        raw = client.get(record_key(str(source_hash)))
        return dict(json.loads(str(raw))) if raw else None
    raw = client.get(record_key(ident))
    if raw:
        return dict(json.loads(str(raw)))
    if len(ident) >= 8:
        for candidate in client.zrevrange(HISTORY, 0, -1):
            if str(candidate).startswith(ident):
                raw = client.get(record_key(str(candidate)))
                return dict(json.loads(str(raw))) if raw else None
    return None


def history(client: redis.Redis, limit: int) -> list[dict[str, Any]]:
    """The newest ``limit`` records by source hash."""
    hashes = client.zrevrange(HISTORY, 0, limit - 1)
    raws = client.mget([record_key(str(h)) for h in hashes]) if hashes else []
    return [json.loads(str(r)) for r in raws if r]


#: Records read per round trip while ``search`` filters.
SEARCH_BATCH = 200


def _newest_first(client: redis.Redis, index: str, key_of: Callable[[str], str], since: float,
                  before: float | None) -> Iterator[tuple[float, dict[str, Any]]]:
    top: str = f"({before}" if before is not None else "+inf"
    start = 0
    while True:
        batch: list[tuple[str, float]] = client.zrevrangebyscore(  # type: ignore[assignment]
            index, top, since, start=start, num=SEARCH_BATCH, withscores=True)
        if not batch:
            return
        start += len(batch)
        raws = client.mget([key_of(str(member)) for member, _ in batch])
        for (_, score), raw in zip(batch, raws, strict=True):
            if raw:  # a request's record may have expired before its index entry
                yield float(score), dict(json.loads(str(raw)))


def search(client: redis.Redis, limit: int, *, status: tuple[str, ...] = (),
           repository: str | None = None, since: float | None = None,
           before: float | None = None,
           requester: str | None = None) -> tuple[list[dict[str, Any]], float | None]:
    """Records newest first: each hash's last build and each record kept by request,
    filtered (``requester`` is a glob: ``alice@*``); and the cursor of the next page
    (``before``), or None when this is the last."""
    merged = heapq.merge(
        _newest_first(client, HISTORY, record_key, since or 0.0, before),
        _newest_first(client, REQUEST_HISTORY, request_record_key, since or 0.0, before),
        key=lambda pair: -pair[0])
    rows: list[dict[str, Any]] = []
    last = None
    seen: set[str] = set()
    for score, record in merged:
        # A request cancelled while it held the lock is in both indexes: once is enough.
        if record.get("id") in seen:
            continue
        seen.add(str(record.get("id")))
        if status and record.get("status") not in status:
            continue
        if repository and record.get("destination") != repository:
            continue
        if requester and not fnmatch.fnmatchcase(str(record.get("requester") or ""), requester):
            continue
        if len(rows) == limit:
            return rows, last
        rows.append(record)
        last = score
    return rows, None


def remember_last_tag(client: redis.Redis | Pipeline, state: BuildState) -> None:
    """Note the destination's newest image: the next build there imports its layer cache."""
    if state.status in ("built", "skipped") and state.source_hash and state.ref and state.tag:
        client.set(last_tag_key(state.ref.name), state.tag, ex=REQUEST_TTL)


def last_tag(client: redis.Redis, repository: str) -> str | None:
    """The tag :func:`remember_last_tag` noted for ``registry/repository``, if any."""
    tag = client.get(last_tag_key(repository))
    return tag.decode() if isinstance(tag, bytes) else tag
