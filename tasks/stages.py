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
import time
import traceback
from collections.abc import Callable
from typing import Any

from celery import Task
from celery.exceptions import Ignore, SoftTimeLimitExceeded
from celery.utils.nodenames import worker_direct

from config.errors import BuildqError
from config.settings import Settings
from tasks import operations
from tasks.app import app, settings
from tasks.connection import redis_client
from tasks.events import emit
from tasks.lock import Lease
from tasks.records import for_request, make_record, store_unhashed
from tasks.state import BuildState
from workers import metrics

log = logging.getLogger("buildq")

#: A stage body: does its work on the state and names the next stage ("" ends the chain).
StageBody = Callable[[BuildState, Settings], str]


def _backoff(settings: Settings, retries: int) -> float:
    # Exponential with full jitter, so N workers hitting one sick registry spread out.
    ceiling = settings.retry_base * (2 ** retries)
    return random.uniform(ceiling / 2, ceiling)


class StageTask(Task):
    """Runs a stage body with the lease renewed, timings, events, retries and failure capture."""

    acks_late = True
    reject_on_worker_lost = True
    stage_name = ""
    body: StageBody

    def run(self, state_data: dict[str, Any]) -> Any:
        return self.run_state(BuildState.from_dict(state_data))

    def run_state(self, state: BuildState) -> Any:
        cfg = settings()
        client = redis_client(cfg)
        lease: Lease | None = None
        if state.token and state.source_hash:
            lease = Lease(client, state.source_hash, state.token, cfg.lock_lease, state.request_id)
            if not lease.extend():
                # Someone else holds this hash now (we were redelivered after a takeover)
                # or the build already finished; that holder answers our request.
                log.info("stage %s dropped: lock for %s held elsewhere", self.stage_name,
                         state.source_hash[:12])
                raise Ignore()
        emit(client, state.request_id, "stage", stage=self.stage_name, state="started")
        started = time.monotonic()
        retries = self.request.retries or 0
        while True:
            try:
                next_stage = self._attempt(state, cfg, lease)
            except BuildqError as exc:
                if exc.transient and retries < cfg.max_retries:
                    countdown = _backoff(cfg, retries)
                    emit(client, state.request_id, "retry", stage=self.stage_name, error=str(exc),
                         countdown=f"{countdown:.1f}")
                    if lease is not None:
                        lease.extend(extra_seconds=countdown)
                    if self.request.is_eager:
                        # In-process there is no broker to carry a delayed retry: wait here.
                        time.sleep(countdown)
                        retries += 1
                        continue
                    raise self.retry(countdown=countdown, exc=exc) from None
                state.fail(str(exc), exc.kind)
                next_stage = "record"
            except SoftTimeLimitExceeded:
                state.fail(f"stage {self.stage_name} ran past its time limit and was stopped.",
                           "timeout")
                next_stage = "record"
            except (Ignore, self.MaxRetriesExceededError):
                raise
            except Exception as exc:
                log.error("internal error in stage %s:\n%s", self.stage_name, traceback.format_exc())
                state.fail(f"internal error in stage {self.stage_name}: {type(exc).__name__}: {exc}. "
                           "The worker's log has the details; please report it.", "internal")
                next_stage = "record"
            break
        elapsed = time.monotonic() - started
        state.stages[self.stage_name] = state.stages.get(self.stage_name, 0.0) + elapsed
        emit(client, state.request_id, "stage", stage=self.stage_name, state="done",
             seconds=f"{elapsed:.3f}", status=state.status or "")
        metrics.stage_finished(self.stage_name, elapsed, state, self.request.id)
        if not next_stage:
            return self.finish(state, client)
        signature = STAGES[next_stage].s(state.to_dict())
        # The chain keeps the request's task id, so Flower shows one row per request: name it
        # after the request and its current stage rather than the bare stage task.
        signature.set(shadow=f"buildq.build_image:{next_stage}")
        if next_stage == "push" and state.builder == "kaniko":
            # Kaniko pushed already; the in-cluster pool verifies, no engine needed.
            signature.set(queue="kaniko")
        elif next_stage in _SAME_HOST and self.request.hostname and not self.request.is_eager:
            # The fetched tree / built image lives on this host: keep the next stage here.
            signature.set(queue=worker_direct(self.request.hostname))
        return self.replace(signature)

    def _attempt(self, state: BuildState, cfg: Settings, lease: Lease | None) -> str:
        if state.done and self.stage_name != "record":
            return "record"
        if lease is None:
            return self.body(state, cfg)
        with lease.heartbeat():
            next_stage = self.body(state, cfg)
        if lease.lost.is_set():
            raise Ignore()
        return next_stage

    def finish(self, state: BuildState, client: Any) -> dict[str, Any]:
        """Write the record, answer every request waiting on this hash, release the lock."""
        own_id = self.request.id or state.request_id
        record = make_record(state, attached=own_id != state.request_id)
        if not state.source_hash or not state.token:
            store_unhashed(client, record)
            metrics.build_finished(state, None)
            return record
        lease = Lease(client, state.source_hash, state.token, settings().lock_lease,
                      state.request_id)
        waiting = lease.finish(make_record(state))
        if waiting is None:
            # A successor took the lock while we were stalled: its record stands.
            raise Ignore()
        metrics.build_finished(state, waiting)
        for request_id in waiting:
            if request_id != own_id:
                self.backend.store_result(
                    request_id, for_request(record, request_id, request_id != state.request_id),
                    "SUCCESS")
        emit(client, state.request_id, "done", status=record["status"])
        return for_request(record, own_id, own_id != state.request_id)


#: Stages that must run on the host of the stage before them.
_SAME_HOST = {"hash", "exists", "upload", "push"}

STAGES: dict[str, StageTask] = {}


def _stage(name: str, body: StageBody, base: type[StageTask] = StageTask,
           task_name: str | None = None) -> StageTask:
    task_name = task_name or f"buildq.{name}"
    cls = type(f"{task_name.rpartition('.')[2].title()}Stage", (base,), {
        "name": task_name, "stage_name": name, "body": staticmethod(body),
        "__module__": __name__,
    })
    task: StageTask = app.register_task(cls())
    STAGES.setdefault(name, task)
    return task


class _BuildImage(StageTask):
    """The entry: validates the request, then fetches the source (the chain's first stage)."""

    def run(  # type: ignore[override]
            self, source: str, *, destination: str | None = None, ref: str | None = None,
            dockerfile: str | None = None, build_args: dict[str, str] | None = None,
            target: str | None = None, platform: str | None = None, builder: str | None = None,
            config: str | dict[str, Any] | None = None, entrypoint: str | list[str] | None = None,
            python: str | None = None, gpu: bool = False) -> Any:
        state = operations.new_request(
            self.request.id or operations.new_request_id(), source, settings(),
            destination=destination, ref=ref, dockerfile=dockerfile, build_args=build_args,
            target=target, platform=platform, builder=builder, config=config,
            entrypoint=entrypoint, python=python, gpu=gpu)
        return self.run_state(state)


#: ``build_image(source, *, destination, ref, dockerfile, build_args, target, platform,
#: builder, config, entrypoint, python, gpu)``: ``.delay(...)`` returns an AsyncResult whose
#: ``.get()`` is the record. The last three shape the Dockerfile generated for a Python
#: project that has none (see workers/dockerfile.py).
build_image = _stage("fetch", operations.fetch, _BuildImage, "buildq.build_image")
#: The same first stage for a prepared state: how the watchdog restarts an orphaned build.
resume = _stage("fetch", operations.fetch, task_name="buildq.resume")
hash_source = _stage("hash", operations.hash_source)
exists = _stage("exists", operations.exists)
upload = _stage("upload", operations.upload)
build = _stage("build", operations.build)
push = _stage("push", operations.push)
kaniko = _stage("kaniko", operations.kaniko)
record = _stage("record", operations.record)
