"""Following a Kaniko Job once created: its pod's status and log, its verdict, and
cancellation when the worker is told to stop.

:class:`JobFollower` watches the Job and its pod with the watch API (starting over
from a fresh list when its resourceVersion is too old), streams the pod's log into
the build log, and reads the digest kaniko wrote to the termination message.
:class:`CancelOnTerminate` turns Celery's SIGTERM into :class:`KanikoCancelledError`
so the dispatcher can delete the Job before the process ends.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

from config.errors import BuildError, BuildqError, TransientError
from workers.builders.kaniko.manifest import DEFAULT_ACTIVE_DEADLINE
from workers.kube import Kube, KubeApiError, KubeForbiddenError, KubeUnavailableError

#: Pod waiting reasons after which the container will never start by itself. A first
#: ErrImagePull is not among them: the kubelet retries, and a blip should not fail a build.
FATAL_WAITING = frozenset({"ImagePullBackOff", "InvalidImageName",
                           "ErrImageNeverPull", "CreateContainerConfigError"})
#: Lines of the log kept for the error message of a failed build.
LOG_TAIL = 25
#: Seconds beyond the Job's deadline we wait for the API server to report it.
DEADLINE_GRACE = 60.0
#: Seconds one watch request stays open before it is renewed.
WATCH_SECONDS = 50

_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


class KanikoCancelledError(BuildError):
    """The worker was told to stop this build (Celery's ``revoke(terminate=True)``)."""

    kind = "cancelled"


def leave_after_task() -> None:
    """Die by the deferred SIGTERM once the current Celery task has finished.

    The prefork pool marks a process it sends SIGTERM as terminating and reports its
    next death as that job's termination: a process that lived on would one day have
    an unrelated build reported as revoked (and never redelivered) when it dies. So
    after the failed record is written and the lock released, the process ends as
    asked. Outside a worker's pool (in-process builds, direct calls) nothing changes.
    """
    try:
        from celery import current_task
        from celery.signals import task_postrun
    except ImportError:
        return
    # A proxy: false when no task runs in this thread.
    if not current_task or current_task.request.is_eager or not current_task.request.id:
        return
    wanted = current_task.request.id

    def leave(task_id: str | None = None, **_: Any) -> None:
        if task_id == wanted:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    task_postrun.connect(leave, weak=False)


class CancelOnTerminate:
    """While armed, SIGTERM raises :class:`KanikoCancelledError` in the dispatching thread.

    Celery's ``revoke(terminate=True)`` sends SIGTERM to the pool process, whose default
    action would end it on the spot: the Job would run on and the uploaded context stay
    until the deadline and TTL. Raised as an exception instead, the dispatcher deletes
    the Job and the stage records a failed build, whose record stage deletes the context.
    Once disarmed (cleanup running) a SIGTERM is only remembered, and raised afterwards,
    so it cannot cut the deletion short. Either way the pool process then ends when the
    task is done (see :func:`leave_after_task`).
    """

    def __init__(self, where: str) -> None:
        self.where = where
        self.armed = False
        self.pending = False
        self._previous: Any = None
        self._installed = False

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        leave_after_task()
        if self.armed:
            self.armed = False
            raise self.error()
        self.pending = True

    def error(self) -> KanikoCancelledError:
        return KanikoCancelledError(
            f"the build was cancelled (SIGTERM) while the Kaniko Job {self.where} ran; "
            "the Job and its pods were deleted.")

    @contextlib.contextmanager
    def installed(self) -> Iterator[CancelOnTerminate]:
        # Signal handlers can only be set from the main thread (a prefork pool process);
        # elsewhere (threads, tests) the process's own SIGTERM handling stands.
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handler)
            self._installed = True
            self.armed = True
        try:
            yield self
        finally:
            self.armed = False
            if self._installed:
                signal.signal(signal.SIGTERM, self._previous)
                self._installed = False

    def disarm(self) -> None:
        self.armed = False


class JobFollower:
    """Watches one Job and its pod until a verdict, streaming the pod's log meanwhile."""

    def __init__(self, kube: Kube, namespace: str, job: dict[str, Any], manifest: dict[str, Any],
                 say: Callable[[str], None]) -> None:
        self.kube = kube
        self.namespace = namespace
        self.job = job
        self.name = job["metadata"]["name"]
        self.uid = job["metadata"].get("uid", "")
        pod_spec = manifest["spec"]["template"]["spec"]
        self.container = pod_spec["containers"][0]["name"]
        self.deadline_seconds = float(manifest["spec"].get("activeDeadlineSeconds")
                                      or DEFAULT_ACTIVE_DEADLINE)
        self.say = say
        self.events: queue.Queue[tuple[str, str, Any]] = queue.Queue()
        self.stop = threading.Event()
        self.tail: deque[str] = deque(maxlen=LOG_TAIL)
        self.pod: dict[str, Any] | None = None
        #: The scheduler's last word on a pod no node took yet (said once in the build log).
        self.unscheduled: str | None = None
        self.log_thread: threading.Thread | None = None
        self.log_response: Any = None
        self.log_lock = threading.Lock()
        self.threads: list[threading.Thread] = []

    # -- watchers (background threads) ------------------------------------------------

    def _watch(self, kind: str, **selectors: str) -> None:
        rv: str | None = self.job["metadata"].get("resourceVersion") if kind == "jobs" else None
        failures = 0
        while not self.stop.is_set():
            try:
                for event in self.kube.watch(kind, self.namespace, rv,
                                             timeout_seconds=WATCH_SECONDS, **selectors):
                    failures = 0
                    obj = event.get("object") or {}
                    rv = (obj.get("metadata") or {}).get("resourceVersion") or rv
                    if event.get("type") != "BOOKMARK":
                        self.events.put((kind, str(event.get("type")), obj))
                    if self.stop.is_set():
                        return
            except KubeForbiddenError as exc:
                if not failures:
                    self.events.put(("error", "", exc))
                    return
                # An API server that has just come back serves requests before its RBAC
                # cache has synced, and answers 403 to what it allowed a moment ago: retry
                # within the same budget as the outage itself.
                failures += 1
                if failures >= 5:
                    self.events.put(("error", "", exc))
                    return
                self.stop.wait(min(5.0, 0.2 * 2 ** failures))
            except KubeUnavailableError as exc:
                failures += 1
                if failures >= 5:
                    self.events.put(("error", "", exc))
                    return
                self.stop.wait(min(5.0, 0.2 * 2 ** failures))
            except KubeApiError as exc:
                if exc.status == 410:
                    # Our resourceVersion is too old: start over from the current state.
                    self.say(f"[kaniko: the {kind} watch's resourceVersion is gone (410); "
                             "following again from the current state]")
                    rv = None
                    continue
                self.events.put(("error", "", exc))
                return
            except Exception as exc:  # a bug must still end the build, not hang it
                self.events.put(("error", "", exc))
                return

    def _stream_log(self, pod_name: str) -> None:
        try:
            resp = self.kube.follow_log(self.namespace, pod_name, self.container,
                                        self.deadline_seconds + DEADLINE_GRACE)
        except Exception as exc:
            # The build goes on without live output; its verdict does not depend on it.
            self.say(f"[kaniko log unavailable: {getattr(exc, 'message', None) or exc}]")
            return
        with self.log_lock:
            self.log_response = resp
        pending = b""
        try:
            for chunk in resp.stream(8192, decode_content=False):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    self._line(line)
            if pending:
                self._line(pending)
        except Exception as exc:
            if not self.stop.is_set():
                self.say(f"[kaniko log stream ended early: {type(exc).__name__}]")
        finally:
            with contextlib.suppress(Exception):
                resp.release_conn()

    def _line(self, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").rstrip("\r")
        self.tail.append(text)
        self.say(text)

    def _start(self, target: Callable[..., None], *args: Any, **kwargs: Any) -> threading.Thread:
        thread = threading.Thread(target=target, args=args, kwargs=kwargs, daemon=True,
                                  name=f"kaniko-{target.__name__}")
        thread.start()
        self.threads.append(thread)
        return thread

    # -- the verdict (caller's thread) --------------------------------------------------

    def run(self) -> str:
        self._start(self._watch, "jobs", field_selector=f"metadata.name={self.name}")
        self._start(self._watch, "pods", label_selector=f"controller-uid={self.uid}")
        started = time.monotonic()
        try:
            verdict = self._judge_job(self.job)
            while verdict is None:
                if time.monotonic() - started > self.deadline_seconds + DEADLINE_GRACE:
                    raise BuildError(
                        f"the Kaniko Job {self.namespace}/{self.name} gave no verdict within its "
                        f"deadline of {self.deadline_seconds:.0f}s.",
                        "Check the cluster's Job controller; the Job has been deleted.")
                try:
                    kind, kind_type, obj = self.events.get(timeout=0.5)
                except queue.Empty:
                    continue
                if kind == "error":
                    raise obj
                if kind == "pods":
                    self._on_pod(kind_type, obj)
                elif kind == "jobs":
                    if kind_type == "DELETED":
                        raise TransientError(
                            f"the Kaniko Job {self.namespace}/{self.name} was deleted before it "
                            "finished.", "The build is retried.")
                    self.job = obj
                    verdict = self._judge_job(obj)
            return self._conclude(verdict)
        finally:
            self.stop.set()
            with self.log_lock:
                if self.log_response is not None:
                    abort_stream(self.log_response)

    def _on_pod(self, kind_type: str, pod: dict[str, Any]) -> None:
        if kind_type == "DELETED":
            return
        self.pod = pod
        self._note_unscheduled(pod)
        state = self._container_state(pod)
        if self.log_thread is None and ("running" in state or "terminated" in state):
            self.log_thread = self._start(self._stream_log, pod["metadata"]["name"])
        waiting = state.get("waiting") or {}
        if waiting.get("reason") in FATAL_WAITING:
            image = pod["spec"]["containers"][0].get("image", "?")
            raise BuildError(
                f"the kaniko pod cannot start: {waiting['reason']} for image {image}"
                + (f" ({waiting['message']})" if waiting.get("message") else "") + ".",
                "Check builder.kaniko-image and the imagePullSecrets in kaniko-config."
                if "Image" in waiting["reason"] else
                "Check that every Secret the Job refers to exists in its namespace.")

    def _note_unscheduled(self, pod: dict[str, Any]) -> None:
        """Say in the build log why the pod waits for a node (once per message): a Job for
        a platform no node of the cluster has waits for one (an autoscaler may add it)."""
        if (pod.get("spec") or {}).get("nodeName"):
            return
        for cond in (pod.get("status") or {}).get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
                message = str(cond.get("message") or cond.get("reason") or "not scheduled")
                if message != self.unscheduled:
                    self.unscheduled = message
                    selector = (pod.get("spec") or {}).get("nodeSelector") or {}
                    self.say(f"[kaniko: the pod waits for a node: {message}; node selector "
                             f"{_labels(selector)}]")

    def _container_state(self, pod: dict[str, Any] | None) -> dict[str, Any]:
        statuses = ((pod or {}).get("status") or {}).get("containerStatuses") or []
        for status in statuses:
            if status.get("name") == self.container:
                return dict(status.get("state") or {})
        return {}

    @staticmethod
    def _judge_job(job: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
        for cond in (job.get("status") or {}).get("conditions") or []:
            if cond.get("status") == "True" and cond.get("type") in ("Complete", "Failed"):
                return str(cond["type"]), cond
        return None

    def _final_pod(self) -> dict[str, Any] | None:
        """The pod as it ended: read again, since its last event may still be in flight."""
        try:
            pods = self.kube.list_pods(self.namespace, f"controller-uid={self.uid}")
        except KanikoCancelledError:
            raise
        except BuildqError:
            pods = []
        ended = [p for p in pods if "terminated" in self._container_state(p)]
        if ended:
            return sorted(ended, key=lambda p: p["metadata"].get("creationTimestamp") or "")[-1]
        return self.pod

    def _conclude(self, verdict: tuple[str, dict[str, Any]]) -> str:
        kind, cond = verdict
        pod = self._final_pod()
        if self.log_thread is None and pod is not None:
            # The build ran before we looked (an adopted Job): fetch what it printed.
            self.log_thread = self._start(self._stream_log, pod["metadata"]["name"])
        if self.log_thread is not None:
            self.log_thread.join(timeout=15)
        terminated = self._container_state(pod).get("terminated") or {}
        where = f"{self.namespace}/{self.name}"
        if kind == "Complete":
            digest = str(terminated.get("message") or "").strip()
            if not _DIGEST_RE.match(digest):
                raise BuildError(f"the Kaniko Job {where} completed but left no image digest in its "
                                 f"termination message (found {digest[:80]!r}).",
                                 "Keep --digest-file=/dev/termination-log in the kaniko args.")
            return digest
        reason = cond.get("reason") or ""
        tail = "\n".join(self.tail) or str(terminated.get("message") or "").strip()
        tail_text = f"\nLast lines of the log:\n{tail}" if tail else ""
        if reason == "DeadlineExceeded" and pod is not None \
                and not (pod.get("spec") or {}).get("nodeName"):
            selector = (pod.get("spec") or {}).get("nodeSelector") or {}
            raise BuildError(
                f"the Kaniko Job {where} ran past its deadline of {self.deadline_seconds:.0f}s "
                "(DeadlineExceeded) with its pod never scheduled"
                + (f": {self.unscheduled}" if self.unscheduled else "")
                + f" (node selector {_labels(selector)}).",
                "Add a node those labels select (a platform's Job selects kubernetes.io/os and "
                "kubernetes.io/arch), or set spec.template.spec.nodeSelector in "
                "builder.kaniko-config (its labels win; null drops buildq's).")
        if reason == "DeadlineExceeded":
            raise BuildError(
                f"the Kaniko Job {where} ran past its deadline of {self.deadline_seconds:.0f}s "
                "(DeadlineExceeded) and was stopped." + tail_text,
                "Raise spec.activeDeadlineSeconds in builder.kaniko-config, or speed the build up.")
        if terminated.get("reason") == "OOMKilled":
            limit = (((pod or {}).get("spec") or {}).get("containers") or [{}])[0]
            memory = ((limit.get("resources") or {}).get("limits") or {}).get("memory")
            raise BuildError(
                f"the kaniko container of Job {where} ran out of memory (OOMKilled"
                + (f", limit {memory}" if memory else "") + ")." + tail_text,
                "Raise spec.template.spec.containers[0].resources.limits.memory in "
                "builder.kaniko-config.")
        code = terminated.get("exitCode")
        if code not in (None, 0):
            raise BuildError(f"kaniko exited with code {code} in Job {where}." + tail_text,
                             "Fix the Dockerfile step the log shows.")
        raise BuildError(f"the Kaniko Job {where} failed ({reason or 'no reason given'}: "
                         f"{cond.get('message') or ''})." + tail_text)


def _labels(selector: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(selector.items())) or "none"


def abort_stream(resp: Any) -> None:
    """End a streaming response another thread is reading.

    ``close()`` would wait for the reader's lock (a deadlock while it blocks in recv);
    shutting the socket down makes that recv return at once.
    """
    sock = getattr(getattr(resp, "connection", None), "sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
