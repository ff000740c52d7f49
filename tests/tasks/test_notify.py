"""Notifications: a real HTTP server receives one signed POST of the record per ended request,
5xx answers are retried, a receiver that is down never holds up the build's answer, and the
README's verification example tells a good signature from a bad one."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from config.errors import ConfigError
from tasks import build_image, cancel, outcome
from tests import services
from tests.tasks.conftest import REPO, Cluster, make_cluster, tiny_app, use_cluster

SECRET = "notify-test-secret"


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """An HTTP server that records every POST and answers each path from a plan."""

    server: ThreadingHTTPServer
    posts: list[Received] = field(default_factory=list)
    #: path -> statuses to answer, in order (then 200).
    plan: dict[str, list[int]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def for_request(self, request_id: str, path: str | None = None) -> list[Received]:
        return [p for p in self.posts if (path is None or p.path == path)
                and json.loads(p.body).get("id") == request_id]


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    holder: list[Receiver] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            r = holder[0]
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            r.posts.append(Received(self.path, {k.lower(): v for k, v in self.headers.items()},
                                    body))
            planned = r.plan.get(self.path) or []
            status = planned.pop(0) if planned else 200
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    holder.append(Receiver(server))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield holder[0]
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def notified(tmp_path_factory: pytest.TempPathFactory, docker_engine: str,
             registry: services.RegistryServer, receiver: Receiver) -> Iterator[Cluster]:
    c = make_cluster(tmp_path_factory.mktemp("notify"), registry, lease=6)
    # The secret lives in the workers' settings only: never in a task's arguments.
    c.env.update(BUILDQ_NOTIFY_URL=f"{receiver.url}/all", BUILDQ_NOTIFY_SECRET=SECRET,
                 BUILDQ_NOTIFY_RETRIES="3")
    c.start_worker("control", concurrency=2)
    c.start_worker("docker", concurrency=1)
    # This process (the script) has neither: requests name their own receiver with notify=.
    env = {k: v for k, v in c.env.items() if not k.startswith("BUILDQ_NOTIFY")}
    use_cluster(Cluster(c.redis, c.registry, c.root, env))
    yield c
    c.stop_all()
    c.redis.stop()


def _verify() -> Any:
    """The README's verification example, as a receiver would paste it."""
    readme = (REPO / "README.md").read_text()
    (code,) = [block for block in re.findall(r"```python\n(.*?)```", readme, re.S)
               if "def verify(" in block]
    space: dict[str, Any] = {}
    exec(code, space)
    return space["verify"]


def _app(tmp_path: Path, base: str, name: str, step: str = "") -> Path:
    return tiny_app(tmp_path, base, name, step)


def _wait_posts(receiver: Receiver, request_id: str, path: str, count: int) -> list[Received]:
    services.wait_for(lambda: len(receiver.for_request(request_id, path)) >= count, 60,
                      f"{count} POST(s) of {request_id} to {path}")
    return receiver.for_request(request_id, path)


def test_every_ended_request_is_posted_once_signed(
        notified: Cluster, receiver: Receiver, tmp_path: Path, base_image: str) -> None:
    verify = _verify()
    dest = f"{notified.registry.host}/notify/app"
    app = _app(tmp_path, base_image, "app")
    built = build_image.delay(str(app), destination=dest).get(timeout=180)
    skipped = build_image.delay(str(app), destination=dest).get(timeout=180)
    failed = outcome(build_image.delay(str(_app(tmp_path, base_image, "bad", "RUN false\n")),
                                       destination=dest), timeout=180)
    until = int(time.time()) + 60
    long_app = _app(tmp_path, base_image, "long",
                    f"RUN echo go && while [ $(date +%s) -lt {until} ]; do sleep 0.2; done\n")
    running = build_image.delay(str(long_app), destination=dest)
    services.wait_for(lambda: notified.client().exists(f"buildq:request:{running.id}"), 60,
                      "the long build to be hashed")
    cancelled = cancel(running.id).record

    for record in (built, skipped, failed, cancelled):
        (post,) = _wait_posts(receiver, record["id"], "/all", 1)
        body = json.loads(post.body)
        assert body["status"] == record["status"] and body["id"] == record["id"]
        assert body["digest"] == record["digest"] and body["source_hash"] == record["source_hash"]
        assert post.headers["content-type"] == "application/json"
        assert re.fullmatch(r"[0-9a-f-]{36}", post.headers["x-buildq-delivery"])
        assert verify(post.body, post.headers["x-buildq-signature"], SECRET.encode())
        assert not verify(post.body, post.headers["x-buildq-signature"], b"wrong-secret")
        assert not verify(post.body + b" ", post.headers["x-buildq-signature"], SECRET.encode())
        assert SECRET not in post.body.decode()
    assert [r["status"] for r in (built, skipped, failed, cancelled)] == \
        ["built", "skipped", "failed", "cancelled"]
    # Exactly one each, a moment later too.
    time.sleep(2)
    for record in (built, skipped, failed, cancelled):
        assert len(receiver.for_request(record["id"], "/all")) == 1
    # The secret never travelled in a task's arguments (Flower shows those).
    client = notified.client()
    for key in client.scan_iter(match="celery-task-meta-*"):
        assert SECRET not in str(client.get(key))


def test_a_request_receiver_answering_500_twice_gets_the_record_on_the_third_try(
        notified: Cluster, receiver: Receiver, tmp_path: Path, base_image: str) -> None:
    receiver.plan["/mine"] = [500, 503]
    record = build_image.delay(str(_app(tmp_path, base_image, "flaky")),
                               destination=f"{notified.registry.host}/notify/flaky",
                               notify=f"{receiver.url}/mine").get(timeout=180)
    posts = _wait_posts(receiver, record["id"], "/mine", 3)
    assert len(posts) == 3 and json.loads(posts[2].body)["digest"] == record["digest"]
    # One delivery, tried three times: the same id each time.
    assert len({p.headers["x-buildq-delivery"] for p in posts}) == 1
    assert len(_wait_posts(receiver, record["id"], "/all", 1)) == 1
    time.sleep(2)
    assert len(receiver.for_request(record["id"], "/mine")) == 3


def test_a_receiver_that_is_down_never_holds_up_the_answer(
        notified: Cluster, receiver: Receiver, tmp_path: Path, base_image: str) -> None:
    down = f"http://127.0.0.1:{services.free_port()}/gone"
    result = build_image.delay(str(_app(tmp_path, base_image, "down")),
                               destination=f"{notified.registry.host}/notify/down", notify=down)
    record = result.get(timeout=180)
    assert record["status"] == "built"
    # The answer came while the deliveries to the dead receiver were still being tried
    # (3 retries, backoff 0.5 + 1 + 2 s); they end logged, after it.
    logs = lambda: "".join(p.read_text() for p in notified.root.glob("worker-control-*.log"))  # noqa: E731
    assert f"{record['id']} to {down} given up" not in logs()
    services.wait_for(lambda: f"{record['id']} to {down} given up" in logs(), 60,
                      "the dead receiver's delivery to be given up")
    assert len(_wait_posts(receiver, record["id"], "/all", 1)) == 1


def test_bad_notify_urls_are_refused_with_the_accepted_form(
        notified: Cluster, tmp_path: Path, base_image: str) -> None:
    app = _app(tmp_path, base_image, "refused")
    for url in ("ftp://example.com/hook", "example.com/hook", "http://"):
        run = subprocess.run([sys.executable, "-m", "tasks.cli", "build", str(app), "--destination",
                              f"{notified.registry.host}/notify/refused", "--notify", url],
                             cwd=REPO, env=notified.env, capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 2, run.stderr
        assert "http:// or https:// URL" in run.stderr and "Traceback" not in run.stderr
    # A script is refused before anything is queued; a message sent as anybody could is
    # refused by the worker, with a record.
    with pytest.raises(ConfigError, match="http:// or https:// URL"):
        build_image.delay(str(app), notify="ftp://example.com/hook",
                          destination=f"{notified.registry.host}/notify/refused")
    record = outcome(build_image.apply_async(args=[str(app)], kwargs={
        "notify": "ftp://example.com/hook",
        "destination": f"{notified.registry.host}/notify/refused"}), timeout=60)
    assert record["status"] == "failed" and record["error_kind"] == "config", record


def test_an_in_process_build_notifies_too(receiver: Receiver, registry: services.RegistryServer,
                                           tmp_path: Path, base_image: str) -> None:
    from tests.tasks.test_embedded import embedded_env, run_buildq

    env = embedded_env(tmp_path, BUILDQ_NOTIFY_URL=f"{receiver.url}/embedded",
                       BUILDQ_NOTIFY_SECRET=SECRET)
    app = _app(tmp_path, base_image, "embedded")
    run = run_buildq(["build", str(app), "--destination", f"{registry.host}/notify/embedded",
                      "--json"], env)
    assert run.code == 0, run
    record = run.record()
    # The CLI delivered before it exited.
    (post,) = receiver.for_request(record["id"], "/embedded")
    assert json.loads(post.body)["digest"] == record["digest"]
    assert _verify()(post.body, post.headers["x-buildq-signature"], SECRET.encode())
