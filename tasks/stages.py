"""One Celery task per stage of a build, and the entry ``build_image``.

fetch (``build_image``) → hash → exists → upload → build → push → record.
Each stage receives the :class:`~tasks.state.BuildState`, does its one thing
through ``workers/``, and replaces itself with the next stage, so the caller's
``AsyncResult`` ends up holding the record. A stage that fails, or finds the
work already done, jumps straight to ``record``, which always runs cleanup.
"""

from __future__ import annotations

import logging
import random
import shutil
import time
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

from celery import Task, states
from celery.exceptions import Ignore, SoftTimeLimitExceeded
from celery.result import AsyncResult
from celery.utils.nodenames import worker_direct

from config.errors import BuildqError
from config.settings import Settings
from tasks import broker, cancelling, inflight, multiplatform, operations, requester
from tasks.app import ROUTES, app, platform_queue, settings
from tasks.background import START_AFTER
from tasks.connection import REDIS_PATIENCE_LEASES, REDIS_TROUBLE, redis_client
from tasks.events import add_started, add_unsent, emit, emit_stages, unsent_stages
from tasks.failures import BuildCancelled, BuildFailed, failure_for
from tasks.keys import answered_key, cancel_key, lock_key
from tasks.lock import Lease, new_token
from tasks.notifications import announce
from tasks.records import (
    FIRST,
    OTHER,
    add_claim,
    answered_by,
    backend_answer,
    claim_answer,
    count_late_build,
    find,
    for_request,
    make_record,
    rebuilt_reason,
    remember_last_tag,
    store_unhashed,
)
from tasks.state import BuildState
from workers import metrics
from workers.sources.base import in_scratch

log = logging.getLogger("buildq")

#: A stage body: does its work on the state and names the next stage ("" ends the chain).
StageBody = Callable[[BuildState, Settings], str]


#: How soon after a boundary that went to Redis the next one may send nothing of its own:
#: the moment a stage may run before its companions (lease renewal, cancel watch) start.
QUICK_BOUNDARY = START_AFTER


def _backoff(settings: Settings, retries: int) -> float:
    # Exponential with full jitter, so N workers hitting one sick registry spread out.
    ceiling = settings.retry_base * (2 ** retries)
    return random.uniform(ceiling / 2, ceiling)


class StageTask(Task):
    """Runs a stage body with the lease renewed, timings, events, retries and failure capture."""

    acks_late = True
    reject_on_worker_lost = True
    #: A failed build ends its task in FAILURE (see tasks/failures.py): expected, so the
    #: worker logs it as a build outcome, not as a task that crashed.
    throws = (BuildFailed,)
    #: How much of the answer Celery's log and Flower show: its leading fields (id,
    #: status, image, digest, tag, hash) fit. Celery builds this text for every task it
    #: runs, so a cache hit paid for 1,024 characters of a record no one reads there.
    resultrepr_maxsize = 512
    stage_name = ""
    body: StageBody

    def run(self, state_data: dict[str, Any]) -> Any:
        return self.run_state(BuildState.from_dict(state_data))

    def run_state(self, state: BuildState) -> Any:
        """Run this task's stage, then every following stage this worker's pool serves.

        A hop through the broker costs a queue round trip, so the chain only hops when
        the next stage belongs to another pool (control → docker or kaniko) or must wait
        out a retry; ``record`` runs wherever the chain ends.
        """
        cfg = settings()
        client = redis_client(cfg)
        stage = self.stage_name
        # A stage handed over for a retry carries its count in the state.
        retries = state.retries
        redis_waits = 0
        waited = 0.0
        # This run of the task, as the lock's notes and the answers name it: the same run
        # repeating a stage after a lost Redis reply is known as itself, a second delivery
        # of the same message is not.
        attempt = new_token()
        at: list[Any] = [stage, retries, []]
        while True:
            try:
                return self._run_from(at, state, cfg, client, attempt)
            except REDIS_TROUBLE as exc:
                # Redis is the broker too, so nothing can be handed over while it is away:
                # wait here and repeat the stage (each stage may run again). Look again at
                # least every third of a lease: once Redis is back, the lease must be renewed
                # before the watchdog gives the build to someone else.
                if waited >= max(_retry_budget(cfg), REDIS_PATIENCE_LEASES * cfg.lock_lease):
                    raise
                countdown = min(_backoff(cfg, redis_waits), cfg.lock_lease / 3)
                log.warning("stage %s: Redis unreachable (%s); trying again in %.1fs",
                            at[0], exc, countdown)
                time.sleep(countdown)
                waited += countdown
                redis_waits += 1

    def _run_from(self, at: list[Any], state: BuildState, cfg: Settings, client: Any,
                  attempt: str) -> Any:
        """The stage loop from ``at`` = [stage, retries, the stage events not yet sent],
        kept current for a resume."""
        stage, retries, unsent = at
        # When this run's last boundary went to Redis: one within a moment of it (the
        # stage between was quick) needs no round trip of its own (see _enter).
        sent_at: float | None = None
        while True:
            # A copy: the round trip that sends them takes them from ``unsent``, and a
            # resume after it failed must send them still.
            at[:] = [stage, retries, list(unsent)]
            quick = (sent_at is not None and retries == 0
                     and time.monotonic() - sent_at < QUICK_BOUNDARY)
            entered, lease = self._enter(stage, state, cfg, client, unsent,
                                         look=stage != "record" and not state.done, quick=quick)
            if not unsent:
                sent_at = time.monotonic()
            if entered != stage:
                stage, retries = entered, 0  # cancelled, and nobody else waits for this build
            # A resume enters this stage again, with a started event of its own.
            at[:] = [stage, retries, [e for e in unsent if e["stage"] != stage]]
            started = time.monotonic()
            try:
                next_stage = self._attempt(stage, state, cfg, lease, attempt, unsent)
            except BuildqError as exc:
                if retries >= cfg.max_retries:
                    state.fail(str(exc), exc.kind)
                    next_stage = "record"
                    unsent.append(self._add_time(stage, state, started))
                    stage, retries = next_stage, 0
                    continue
                countdown = _backoff(cfg, retries)
                emit_stages(client, state.request_id, unsent,
                            ("retry", {"stage": stage, "error": str(exc),
                                       "countdown": f"{countdown:.1f}"}))
                if lease is not None:
                    lease.extend(extra_seconds=countdown)
                self._add_time(stage, state, started, retries=True)
                if self.request.is_eager:
                    # In-process there is no broker to carry a delayed retry: wait here.
                    time.sleep(countdown)
                    retries += 1
                    continue
                if lease is not None and stage in BUILD_STAGES:
                    # The failed build is not one: the retry (another run) may build.
                    lease.forget_build(attempt)
                # A broker-side retry frees this worker slot for the wait; the state carries
                # the count, and the stages already done in this task are not repeated.
                state.retries = retries + 1
                return self._hand_over(stage, state, countdown=countdown)
            unsent.append(self._add_time(stage, state, started))
            if not next_stage:
                return self.finish(state, client, attempt, unsent)
            if not self._runs_here(stage, next_stage, state):
                emit_stages(client, state.request_id, unsent)
                state.retries = 0
                return self._hand_over(next_stage, state)
            stage, retries = next_stage, 0

    def _enter(self, stage: str, state: BuildState, cfg: Settings, client: Any,
               unsent: list[dict[str, str]], look: bool = True,
               quick: bool = False) -> tuple[str, Lease | None]:
        """The way into ``stage``, in one transaction (a cache hit crosses four boundaries,
        and this was four round trips each): send the stage events not yet sent
        (taken from ``unsent``), look for a cancel (``look``), renew the lease or register a
        request that holds no lock yet, and send the stage's started event if it is to run.
        Returns the stage to run (``record`` for a request cancelled meanwhile) and the
        lease, if the lock is held.

        ``quick``: the last boundary of this run went to Redis a moment ago
        (:data:`QUICK_BOUNDARY`), so this one sends nothing and only adds the started event
        to ``unsent``, for the next round trip to carry. Within that moment the lease
        renewed then cannot have run out, the in-flight registration stands, and a cancel
        is as good as one sent a moment later: it is seen at the next boundary that goes
        to Redis, or by the stage's cancel watch once the stage outlives a moment.
        """
        lease = None
        if state.token and state.source_hash:
            lease = Lease(client, state.source_hash, state.token, cfg.lock_lease,
                          state.request_id, operations.pending_entry(state))
        if quick and stage != "fetch":
            unsent.append({"stage": stage, "state": "started"})
            return stage, lease
        pipe = client.pipeline(transaction=True)
        add_unsent(pipe, state.request_id, unsent)
        ours = len(pipe)
        if look:
            pipe.get(cancel_key(state.request_id))
        # The first stage of a restarted copy of a request answered meanwhile: it stops.
        first = stage == "fetch"
        if first:
            pipe.exists(answered_key(state.request_id))
        if lease is not None:
            extended = lease.add_extend(pipe)
        elif not (state.source_hash or state.done or self.request.is_eager):
            # Before the lock only the broker knows this request: register it first.
            inflight.add_register(pipe, state, cfg.lock_lease)
        started = add_started(pipe, client, state.request_id, stage, look=look,
                              lock=lock_key(lease.source_hash) if lease else "",
                              token=lease.token if lease else "")
        replies = pipe.execute(raise_on_error=False)[ours:]
        flag = replies.pop(0) if look else None
        answered_already = replies.pop(0) if first else 0
        held = extended(replies.pop(0)) if lease is not None else True
        sent = started(replies.pop())
        for reply in (flag, answered_already, *replies):
            if isinstance(reply, Exception):
                raise reply
        # A flag is rare: only then is it read again with the pending map.
        stop = cancelling.abandoned(client, state) if flag is not None else None
        if stop is not None:
            # Cancelled, and nobody else waits for this build: stop here.
            stage = self._stop_cancelled(state, cfg, client, stop)
            return self._enter(stage, state, cfg, client, unsent, look=False)
        if answered_already:
            # Its answer stands; the registration sent alongside must not restart it again.
            inflight.forget(client, state.request_id)
            raise Ignore()
        if lease is not None and not held:
            # Someone else holds this hash now (we were redelivered after a takeover)
            # or the build already finished; that holder answers our request.
            log.info("stage %s dropped: lock for %s held elsewhere", stage, lease.source_hash[:12])
            _drop_tree(state)
            raise Ignore()
        if not sent:
            # Cancelled, but other requests wait for this build: it goes on for them.
            emit(client, state.request_id, "stage", stage=stage, state="started")
        return stage, lease

    def _add_time(self, stage: str, state: BuildState, started: float,
                  retries: bool = False) -> dict[str, str]:
        """Count the stage's time; returns its done event, for the next round trip to send
        (none for a stage to be tried again)."""
        elapsed = time.monotonic() - started
        state.stages[stage] = state.stages.get(stage, 0.0) + elapsed
        if retries:
            return {}
        metrics.stage_finished(stage, elapsed, state, self.request.id)
        return {"stage": stage, "state": "done", "seconds": f"{elapsed:.3f}",
                "status": state.status or ""}

    def _runs_here(self, stage: str, next_stage: str, state: BuildState) -> bool:
        if self.request.is_eager or next_stage == "record":
            return True
        return _queue_of(next_stage, state) == _queue_of(stage, state)

    def _hand_over(self, next_stage: str, state: BuildState, countdown: float = 0.0) -> Any:
        """Replace this task with ``next_stage`` (same task id, so the caller keeps waiting)."""
        task = resume if next_stage == "fetch" else STAGES[next_stage]
        signature = task.s(state.to_dict())
        # The chain keeps the request's task id, so Flower shows one row per request: name it
        # after the request and its current stage rather than the bare stage task.
        signature.set(shadow=f"buildq.build_image:{next_stage}")
        if countdown:
            signature.set(countdown=countdown)
        queue = _queue_of(next_stage, state)
        if next_stage in _SAME_HOST and self.request.hostname:
            # The fetched tree / built image lives on this host: keep the stage here.
            signature.set(queue=worker_direct(self.request.hostname))
        elif queue != ROUTES[STAGES[next_stage].name]:
            signature.set(queue=queue)
        return self.replace(signature)

    def _stop_cancelled(self, state: BuildState, cfg: Settings, client: Any,
                        flag: dict[str, Any]) -> str:
        """End a chain whose request was cancelled: before the lock, drop what it fetched and
        end the task; holding it, go to ``record`` as cancelled (cleanup, lock released)."""
        if not state.token:
            inflight.forget(client, state.request_id)
            operations.discard(state, cfg)
            raise self._ended_elsewhere(client, state.request_id)
        state.cancel(str(flag.get("by")), float(flag.get("at") or time.time()))
        return "record"

    def _ended_elsewhere(self, client: Any, request_id: str) -> BaseException:
        """How a task whose request was answered by someone else ends: as that answer when
        it was a cancel (so Flower shows the task failed), else ignored."""
        if (self.request.id or request_id) == request_id and cancelling.cancelled(client, request_id):
            found = find(client, request_id)
            if found is not None and found.get("status") == "cancelled":
                return BuildCancelled(found)
        return Ignore()

    def _attempt(self, stage: str, state: BuildState, cfg: Settings, lease: Lease | None,
                 attempt: str, unsent: list[dict[str, str]]) -> str:
        """One stage body, watched for a cancel of its request; a body that outlives a
        moment first sends the stage events a quick boundary left in ``unsent`` (its own
        started event among them), so a watcher sees long work begin."""
        client = redis_client(cfg)

        def send_unsent() -> None:
            # On the watcher's thread, where this context's variables are not set.
            emit_stages(client, state.request_id, unsent)

        token = unsent_stages.set(unsent)
        try:
            with cancelling.watch(client, state, on_start=send_unsent) as watched:
                next_stage = self._attempt_body(stage, state, cfg, lease, attempt)
        finally:
            unsent_stages.reset(token)
        if watched.flag is not None and stage != "record":
            return self._stop_cancelled(state, cfg, client, watched.flag)
        return next_stage

    def _attempt_body(self, stage: str, state: BuildState, cfg: Settings, lease: Lease | None,
                      attempt: str) -> str:
        """One stage body; a user-facing error or a crash becomes a failed state."""
        try:
            if state.done and stage != "record":
                return "record"
            body = STAGES[stage].body
            if lease is None:
                if state.source_hash or state.done or self.request.is_eager:
                    return body(state, cfg)
                # Fetch and hash, before the lock: restartable should this worker die.
                # _enter registered the request as this stage began (same condition).
                with inflight.tracked(redis_client(cfg), state, cfg.lock_lease, registered=True):
                    return body(state, cfg)
            building = stage in BUILD_STAGES
            if building and not lease.note_build(attempt, started=True):
                # This lease's build runs or ran elsewhere (the stage was delivered twice),
                # or the lock is gone: building here would be a second, unreported build.
                log.warning("stage %s dropped: %s is built under this lease already, or the "
                            "lock is gone", stage, state.source_hash)
                raise Ignore()
            try:
                with lease.heartbeat():
                    next_stage = body(state, cfg)
            finally:
                if building:
                    _note_built(lease, attempt)
            if lease.lost.is_set():
                raise Ignore()
            return next_stage
        except BuildqError as exc:
            if exc.transient:
                raise
            state.fail(str(exc), exc.kind)
        except SoftTimeLimitExceeded:
            state.fail(f"stage {stage} ran past its time limit and was stopped.", "timeout")
        except (Ignore, *REDIS_TROUBLE):
            raise
        except Exception as exc:
            log.error("internal error in stage %s:\n%s", stage, traceback.format_exc())
            state.fail(f"internal error in stage {stage}: {type(exc).__name__}: {exc}. "
                       "The worker's log has the details; please report it.", "internal")
        return "record"

    def finish(self, state: BuildState, client: Any, attempt: str,
               unsent: list[dict[str, str]] | None = None) -> dict[str, Any]:
        """Write the record, answer every request waiting on this hash, release the lock;
        ``unsent``, the stage events not yet sent (the record stage's done event among them),
        go with the first round trip (with the destination's newest tag, see
        :func:`remember_last_tag`).

        One answer per request, and the first stands: a request restarted while it was
        alive after all (its worker lost Redis, not its life), a stage delivered twice, or
        this very call repeated after a lost reply may all reach here; each answer is
        claimed by one attempt (:func:`claim_answer`) before it is stored.
        """
        own_id = self.request.id or state.request_id
        if not state.source_hash or not state.token:
            emit_stages(client, state.request_id, unsent or [])
            if claim_answer(client, state.request_id, attempt) == OTHER:
                raise self._ended_elsewhere(client, state.request_id)
            record = make_record(state, attached=own_id != state.request_id)
            store_unhashed(client, record)
            metrics.build_finished(state, None)
            announce(record, state.notify, settings())
            return _answer(record)
        lease = Lease(client, state.source_hash, state.token, settings().lock_lease,
                      state.request_id)
        pipe = client.pipeline(transaction=False)
        add_unsent(pipe, state.request_id, unsent or [])
        remember_last_tag(pipe, state)
        waiting, notes, ours_by = lease.survey(pipe)
        if waiting and all((ours_by if r == state.request_id else answered_by(client, r))
                           not in (None, attempt) for r in waiting):
            # A copy of requests that others answered (restarted while alive), or a request
            # cancelled meanwhile: that answer stands; only the lock is left to release.
            lease.release(waiting)
            raise self._ended_elsewhere(client, own_id)
        while True:
            written = lease.write_record(
                make_record(state, builds=len(notes), rebuilt=rebuilt_reason(notes)),
                attempt, len(notes))
            if written != "recount":
                break
            notes = lease.build_notes()
        if written is None or isinstance(written, str):
            # A successor took the lock while we were stalled, or another copy of this
            # chain answers: that record stands.
            raise Ignore()
        record, pending = written
        requests = {*pending, state.request_id}
        # Each answer is stored here, the chain's own request's too, as Celery would store
        # the return value: once the lock is released nothing could store a lost answer.
        # With Celery's Redis backend it is stored by the claim itself, and the claims and
        # the release go in one round trip (release.lua releases only behind every claim).
        answers = []
        for request_id in requests:
            answer = for_request(record, request_id, request_id != state.request_id,
                                 pending.get(request_id))
            failure = failure_for(answer)
            stored = (request_id, answer if failure is None else failure,
                      states.SUCCESS if failure is None else states.FAILURE,
                      self.request if request_id == own_id else None)
            answers.append((stored, backend_answer(self.backend, *stored)))
        pipe = client.pipeline(transaction=False)
        claimed = {stored[0]: add_claim(
            pipe, client, stored[0], attempt, store=entry,
            done=record["status"] if stored[0] == state.request_id else None)
            for stored, entry in answers}
        # A backend the claim cannot store for (the embedded mode's) stores after the claims
        # and before the release, which then goes on its own.
        together = all(entry is not None for _, entry in answers)
        released = lease.add_release(pipe, requests) if together else None
        replies = pipe.execute(raise_on_error=False)
        claims = {r: read(reply) for (r, read), reply in zip(claimed.items(), replies, strict=False)}
        ours = {r for r, claim in claims.items() if claim != OTHER}
        for stored, entry in answers:
            if entry is None and stored[0] in ours:
                request_id, result, status, request = stored
                self.backend.store_result(request_id, result, status, request=request)
        if released is not None:
            released(replies[-1])
        else:
            lease.release(requests)
        metrics.build_finished(state, {r: pending.get(r, {}) for r, c in claims.items()
                                       if c == FIRST and r in pending})
        for request_id, claim in claims.items():
            # After the answers and the release: a receiver never holds up the build.
            if claim == FIRST:
                url = state.notify if request_id == state.request_id else \
                    pending.get(request_id, {}).get("notify")
                announce(for_request(record, request_id, request_id != state.request_id,
                                     pending.get(request_id)), url, settings())
        if own_id in requests and own_id not in ours:
            raise self._ended_elsewhere(client, own_id)
        if own_id in ours:
            # Stored above: Celery's own store of the return value would only read it back
            # (it keeps the first success), a round trip for nothing.
            self.request.ignore_result = True
        return _answer(for_request(record, own_id, own_id != state.request_id))


def _answer(record: dict[str, Any]) -> dict[str, Any]:
    """The chain's return value: the record of a request with an image; a failed or
    cancelled one raises it inside :class:`BuildFailed`, so its task ends in FAILURE."""
    failure = failure_for(record)
    if failure is not None:
        raise failure
    return record


#: Stages whose body builds the image, noted under the lease (see tasks/lock.py). The
#: kaniko stage is not: its Job's name is the hash's, so a second dispatch adopts the Job.
BUILD_STAGES = {"build"}


def _retry_budget(cfg: Settings) -> float:
    return sum(cfg.retry_base * 2 ** n for n in range(max(cfg.max_retries, 5)))


def _drop_tree(state: BuildState) -> None:
    """Remove this host's copy of the source of a chain that stops here (only ever a
    scratch dir under BUILDQ_WORKDIR, whatever the state says)."""
    if state.owned and state.workdir and in_scratch(state.workdir, settings().workdir):
        shutil.rmtree(state.workdir, ignore_errors=True)
        state.workdir = None


def _note_built(lease: Lease, attempt: str) -> None:
    """Note the build again once it ran; report it if the record was written without it.

    The note made at the start may be among the last writes of a Redis that crashed since:
    this one waits for Redis rather than leave the build uncounted (repeating the stage
    would build again).
    """
    pause = lease.lease_seconds / 3
    deadline = time.monotonic() + REDIS_PATIENCE_LEASES * lease.lease_seconds
    while True:
        try:
            # First the lock back, should Redis have lost it: the note goes with the lock.
            lease.extend()
            if not lease.note_build(attempt, started=False):
                log.warning("a build of %s ended after its record was written without it; "
                            "counting it in the record", lease.source_hash)
                count_late_build(lease.client, lease.source_hash)
            return
        except REDIS_TROUBLE:
            if time.monotonic() + pause > deadline:
                log.warning("could not note the end of the build of %s", lease.source_hash)
                return
            time.sleep(pause)


#: Stages that must run on the host of the stage before them.
_SAME_HOST = {"hash", "exists", "upload", "push"}


def _queue_of(stage: str, state: BuildState) -> str:
    if stage == "push" and state.builder == "kaniko":
        # Kaniko pushed already; the in-cluster pool verifies, no engine needed.
        return "kaniko"
    queue = ROUTES[STAGES[stage].name]
    if queue == "docker" and state.platform:
        # Only a host whose engine builds this platform takes it (see tasks/cli/pools.py).
        return platform_queue(state.platform)
    return queue

STAGES: dict[str, StageTask] = {}

_Task = TypeVar("_Task", bound=StageTask)


def _register(base: type[_Task], name: str, body: StageBody, task_name: str) -> _Task:
    """A task of class ``base`` (subclassed per stage, as Celery names tasks by class)."""
    cls = type(f"{task_name.rpartition('.')[2].title()}Stage", (base,), {
        "name": task_name, "stage_name": name, "body": staticmethod(body),
        "__module__": __name__,
    })
    task: _Task = app.register_task(cls())
    STAGES.setdefault(name, task)
    return task


def _stage(name: str, body: StageBody, task_name: str | None = None) -> StageTask:
    return _register(StageTask, name, body, task_name or f"buildq.{name}")


class BuildImageTask(StageTask):
    """The entry: validates the request, then fetches the source (the chain's first stage).

    ``build_image.delay(source, destination=..., ...)`` returns an AsyncResult whose
    ``.get()`` is the record. ``entrypoint``, ``python`` and ``gpu`` shape the Dockerfile
    generated for a Python project that has none (see workers/dockerfile/); ``secrets``
    names secret build args, whose values the building worker looks up (see
    workers/secrets.py); ``base_policy`` is ``digest`` (base images resolved, hashed and
    pinned) or ``tag``; ``force`` builds and pushes even when the tag exists; ``notify`` is an
    http(s) URL that receives the record when the request ends (see tasks/notifications.py).
    ``platform`` is one platform, or several (a list, or comma-separated): one image per
    platform and an image index over them (see tasks/multiplatform.py).
    """

    def run(  # type: ignore[override]
            self, source: str, *, destination: str | None = None, ref: str | None = None,
            dockerfile: str | None = None, build_args: dict[str, str] | None = None,
            target: str | None = None, platform: str | list[str] | None = None,
            builder: str | None = None,
            config: str | dict[str, Any] | None = None, entrypoint: str | list[str] | None = None,
            python: str | None = None, gpu: bool = False, secrets: list[str] | None = None,
            base_policy: str | None = None, force: bool = False,
            notify: str | None = None) -> Any:
        state = operations.new_request(
            self.request.id or operations.new_request_id(), source, settings(),
            destination=destination, ref=ref, dockerfile=dockerfile, build_args=build_args,
            target=target, platform=platform, builder=builder, config=config,
            entrypoint=entrypoint, python=python, gpu=gpu, secrets=secrets,
            base_policy=base_policy, force=force, notify=notify)
        state.requester, state.requester_verified = requester.of_task(
            self.request, settings().signing and not self.request.is_eager)
        if state.platforms and not state.done:
            # Several platforms: one ordinary build each, then their index.
            return multiplatform.start(self, state)
        return self.run_state(state)

    def delay(
            self, source: str, *, destination: str | None = None, ref: str | None = None,
            dockerfile: str | None = None, build_args: dict[str, str] | None = None,
            target: str | None = None, platform: str | list[str] | None = None,
            builder: str | None = None,
            config: str | dict[str, Any] | None = None, entrypoint: str | list[str] | None = None,
            python: str | None = None, gpu: bool = False,
            secrets: list[str] | None = None, base_policy: str | None = None,
            force: bool = False, notify: str | None = None) -> AsyncResult:
        """Queue a build of ``source``; the same parameters as :meth:`run`."""
        given = {"destination": destination, "ref": ref, "dockerfile": dockerfile,
                 "build_args": build_args, "target": target, "platform": platform,
                 "builder": builder, "config": config, "entrypoint": entrypoint,
                 "python": python, "gpu": gpu, "secrets": secrets, "base_policy": base_policy,
                 "force": force, "notify": notify}
        # Only what the caller set travels: the message (and Flower's view of it) stays as
        # short as an untyped ``delay(source, **options)`` made it.
        options = {k: v for k, v in given.items() if v is not None and v is not False}
        current = settings()
        if not current.embedded:
            # What the workers would refuse is refused here, before anything is queued
            # (they check again). A config path is the workers' to read, not this host's.
            operations.describe_request(
                "local", source, current, destination=destination, ref=ref,
                dockerfile=dockerfile, build_args=build_args, target=target, platform=platform,
                config=config if not isinstance(config, str) else {}, entrypoint=entrypoint,
                python=python, gpu=gpu, secrets=secrets, base_policy=base_policy, force=force,
                notify=notify, for_workers=True, here=False)
        return self.apply_async(args=[source], kwargs=options, headers=requester.headers())

    def apply_async(self, args: Any = None, kwargs: Any = None, task_id: str | None = None,
                    *more: Any, **options: Any) -> AsyncResult:
        cfg = settings()
        if (cfg.embedded or app.conf.task_always_eager) or not args:
            return super().apply_async(args, kwargs, task_id, *more, **options)
        task_id = task_id or operations.new_request_id()
        note = inflight.submission(task_id, str(args[0]), dict(kwargs or {}),
                                   dict(options.get("headers") or {}), cfg.lock_lease)
        # The note, the message and its task-sent event: one round trip, in that order.
        with app.producer_or_acquire(options.pop("producer", None)) as producer, \
                producer.batch(), broker.riding(note):
            return super().apply_async(args, kwargs, task_id, *more, producer=producer, **options)


#: The entry task: ``from tasks import build_image``.
build_image = _register(BuildImageTask, "fetch", operations.fetch, "buildq.build_image")
#: The same first stage for a prepared state: how the watchdog restarts an orphaned build.
resume = _stage("fetch", operations.fetch, "buildq.resume")
hash_source = _stage("hash", operations.hash_source)
exists = _stage("exists", operations.exists)
upload = _stage("upload", operations.upload)
build = _stage("build", operations.build)
push = _stage("push", operations.push)
kaniko = _stage("kaniko", operations.kaniko)
record = _stage("record", operations.record)
