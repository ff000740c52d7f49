"""A broker with a password, and with a password over TLS, as production runs it.

For each, real Redis (``requirepass`` in its config file; TLS on its only port with a
self-signed certificate the URL trusts through ``ssl_ca_certs``), a control and a docker
worker, and Flower, all started by ``buildq`` with ``BUILDQ_REDIS_URL`` in their
environment. The CLI builds through the pools and ``status`` answers; Flower shows the
workers and the request. The password is then looked for everywhere it could leak: every
process's command line, every log, the CLI's output, every key in Redis and Flower's
pages. A wrong password or an untrusted certificate is refused by the CLI, a worker and
Flower at start, in one paragraph with a hint, exit 2.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
import redis
import requests

from tests import services
from tests.tasks.conftest import REPO, Cluster

MODES = ("password", "tls")
FLOWER_LOGIN = ("ops", "flower-login-for-tests")


@dataclass
class Secured:
    mode: str
    server: services.SecureRedisServer
    cluster: Cluster
    flower_url: str
    flower: subprocess.Popen[bytes]
    #: ``buildq build --json`` of one app through the pools, run once per broker.
    build: subprocess.CompletedProcess[str]
    app: Path

    @property
    def password(self) -> str:
        return self.server.password

    def secrets(self) -> list[str]:
        """The password as it may be written: raw and percent-encoded."""
        return list({self.password, quote(self.password, safe="")})

    def record(self) -> dict[str, object]:
        assert self.build.returncode == 0, self.build.stderr
        record: dict[str, object] = json.loads(self.build.stdout.strip().splitlines()[-1])
        return record


def buildq(env: dict[str, str], *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tasks.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _flower(env: dict[str, str], root: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = services.free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tasks.cli", "flower", "--port", str(port), "--address", "127.0.0.1"],
        env={**env, "BUILDQ_FLOWER_BASIC_AUTH": ":".join(FLOWER_LOGIN)}, cwd=REPO,
        stdout=(root / "flower.log").open("ab"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    services.wait_for(lambda: requests.get(f"{url}/healthcheck", timeout=1).ok, 60, "flower")
    return proc, url


@pytest.fixture(scope="module", params=MODES)
def secured(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
            docker_engine: str, registry: services.RegistryServer) -> Iterator[Secured]:
    mode = request.param
    root = tmp_path_factory.mktemp(f"broker-{mode}")
    # A fresh secret per run, with characters a URL must percent-encode.
    password = f"bq-{secrets.token_hex(8)}/p@ss:{mode}"
    server = services.start_secure_redis(root, password, tls=mode == "tls")
    env = {**os.environ, "BUILDQ_REDIS_URL": server.url, "BUILDQ_LOCK_LEASE": "6",
           "BUILDQ_WORKDIR": str(root / "work"), "BUILDQ_CONTEXT_STORE": (root / "contexts").as_uri(),
           "BUILDQ_NETWORK_MODE": "none", "HOME": str(root / "home"), "PYTHONPATH": str(REPO),
           "BUILDQ_SOURCE_ROOTS": str(root.parent)}
    for name in ("BUILDQ_CONFIG", "BUILDQ_FLOWER_BASIC_AUTH"):
        env.pop(name, None)
    cluster = Cluster(server, registry, root, env)
    flower: subprocess.Popen[bytes] | None = None
    try:
        flower, flower_url = _flower(env, root)
        cluster.start_worker("control")
        cluster.start_worker("docker")
        app = root / "app"
        app.mkdir()
        (app / "Dockerfile").write_text(f"FROM {docker_engine}\nCOPY msg.txt /msg.txt\n")
        (app / "msg.txt").write_text(f"secured broker {mode} {uuid.uuid4()}\n")
        build = buildq(env, "build", str(app), "--destination",
                       f"{registry.host}/secured/{mode}", "--json")
        yield Secured(mode, server, cluster, flower_url, flower, build, app)
    finally:
        if flower is not None and flower.poll() is None:
            os.killpg(flower.pid, signal.SIGTERM)
            flower.wait(20)
        cluster.stop_all()
        server.stop()


def test_cli_builds_on_the_pools_and_status_answers(secured: Secured) -> None:
    record = secured.record()
    assert record["status"] == "built", record
    repository = f"secured/{secured.mode}"
    assert secured.cluster.registry.digest(repository, str(record["tag"])) == record["digest"]
    # Built by the pools, not in-process: the docker worker's log has the build stage.
    logs = "".join(p.read_text(errors="replace") for p in secured.cluster.root.glob("worker-docker-*.log"))
    assert str(record["id"]) in logs
    for ident in (str(record["id"]), str(record["tag"])):
        shown = buildq(secured.cluster.env, "status", ident, timeout=60)
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["digest"] == record["digest"]


def test_flower_answers_over_the_secured_broker(secured: Secured) -> None:
    def api(path: str) -> object:
        r = requests.get(f"{secured.flower_url}{path}", auth=FLOWER_LOGIN, timeout=30)
        r.raise_for_status()
        return r.json()

    record = secured.record()
    workers = api("/api/workers?refresh=1")
    assert isinstance(workers, dict)
    pools = {name.split("-")[0] for name in workers}
    assert {"control", "docker"} <= pools, workers
    services.wait_for(lambda: str(record["id"]) in api("/api/tasks"), 30,  # type: ignore[operator]
                      "the request in Flower")
    # The broker view opens its own connection (TLS options and all) to read the queues.
    broker = requests.get(f"{secured.flower_url}/broker", auth=FLOWER_LOGIN, timeout=30)
    assert broker.status_code == 200 and "control" in broker.text and "docker" in broker.text


def _cmdlines() -> dict[int, bytes]:
    found: dict[int, bytes] = {}
    for path in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            found[int(path.parent.name)] = path.read_bytes()
        except OSError:
            continue
    return found


def _redis_contents(client: redis.Redis) -> Iterator[str]:
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        yield str(key)
        if kind == b"string":
            yield str(client.get(key))
        elif kind == b"hash":
            yield str(client.hgetall(key))
        elif kind == b"list":
            yield str(client.lrange(key, 0, -1))
        elif kind == b"set":
            yield str(client.smembers(key))
        elif kind == b"zset":
            yield str(client.zrange(key, 0, -1, withscores=True))
        elif kind == b"stream":
            yield str(client.xrange(key))


def test_the_password_is_on_no_command_line_log_record_or_page(secured: Secured) -> None:
    record = secured.record()
    started = {proc.pid for _, proc in secured.cluster.workers.values()} | {secured.flower.pid}
    cmdlines = _cmdlines()
    assert started <= set(cmdlines), "a worker or Flower is not running"
    for pid, cmdline in cmdlines.items():
        for secret in secured.secrets():
            assert secret.encode() not in cmdline, (pid, cmdline)
    # The pools and Flower were given the URL through their environment (the only way in).
    assert all(b"redis" not in cmdlines[pid] for pid in started)

    texts = {"build stdout": secured.build.stdout, "build stderr": secured.build.stderr}
    for log in secured.cluster.root.glob("*.log"):
        texts[log.name] = log.read_text(errors="replace")
    assert any("worker-control" in name for name in texts) and "flower.log" in texts
    client = secured.cluster.client()
    texts["redis"] = "\n".join(_redis_contents(redis.Redis.from_url(secured.server.url)))
    assert str(record["id"]) in texts["redis"]  # the records are in there
    client.close()
    name = next(iter(requests.get(f"{secured.flower_url}/api/workers", auth=FLOWER_LOGIN,
                                  timeout=30).json()))
    for page in ("/", "/workers", "/tasks", "/broker", f"/worker/{name}", f"/task/{record['id']}",
                 "/api/workers", "/api/tasks", "/metrics"):
        r = requests.get(f"{secured.flower_url}{page}", auth=FLOWER_LOGIN, timeout=30)
        assert r.status_code == 200, (page, r.status_code)
        texts[f"flower {page}"] = r.text
    for where, text in texts.items():
        for secret in secured.secrets():
            assert secret not in text, where


def _refusals(secured: Secured) -> tuple[dict[str, str], str]:
    """An environment whose URL the server refuses (a wrong password, or for TLS an
    untrusted certificate), and what the refusal must say."""
    if secured.mode == "password":
        url = secured.server.url.replace(quote(secured.password, safe=""), "wrong-password")
        return {**secured.cluster.env, "BUILDQ_REDIS_URL": url}, "refused the login"
    stranger = secured.cluster.root / "stranger"
    stranger.mkdir(exist_ok=True)
    other_ca, _ = services.self_signed_cert(stranger)
    url = secured.server.url.replace(str(secured.server.ca_cert), str(other_ca))
    return {**secured.cluster.env, "BUILDQ_REDIS_URL": url}, "TLS certificate is not trusted"


@pytest.mark.parametrize("command", [
    ["build", "APP", "--destination", "REGISTRY/secured/refused"],
    ["status", "no-such-request"],
    ["worker", "control"],
    ["flower", "--port", "PORT", "--address", "127.0.0.1"],
], ids=["build", "status", "worker", "flower"])
def test_a_wrong_password_or_untrusted_certificate_is_one_paragraph_and_exit_2(
        secured: Secured, command: list[str]) -> None:
    env, says = _refusals(secured)
    env["BUILDQ_FLOWER_BASIC_AUTH"] = ":".join(FLOWER_LOGIN)
    args = [{"APP": str(secured.app), "PORT": str(services.free_port())}.get(a, a)
            .replace("REGISTRY", secured.cluster.registry.host) for a in command]
    queued = secured.cluster.client().llen("control")
    done = buildq(env, *args, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: "), \
        done.stderr
    assert says in lines[0] and "Traceback" not in done.stderr
    hint = lines[1]
    assert ("password" in hint) if secured.mode == "password" else ("ssl_ca_certs" in hint)
    for secret in [*secured.secrets(), "wrong-password"]:
        assert secret not in done.stdout + done.stderr
    assert secured.cluster.client().llen("control") == queued  # nothing was queued


def test_a_url_that_does_not_match_the_port_or_a_missing_ca_file_is_named(secured: Secured) -> None:
    url = secured.server.url
    if secured.mode == "password":
        # TLS spoken to a plain-text port.
        wrong = {url.replace("redis://", "rediss://"): "if that port does not speak TLS, use redis://"}
    else:
        wrong = {
            # Plain text spoken to the TLS port.
            url.replace("rediss://", "redis://").partition("?")[0]: "use rediss://",
            url.replace(str(secured.server.ca_cert), "/nonexistent/ca.pem"):
                "ssl_ca_certs=/nonexistent/ca.pem, which is not a readable file",
        }
    for bad, says in wrong.items():
        done = buildq({**secured.cluster.env, "BUILDQ_REDIS_URL": bad}, "status", "x", timeout=60)
        assert done.returncode == 2 and says in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 2 and "Traceback" not in done.stderr
        assert not any(secret in done.stderr for secret in secured.secrets())
