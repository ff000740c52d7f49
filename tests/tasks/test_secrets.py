"""Registry secrets live only in worker memory.

Two full builds on real workers: one to a registry behind htpasswd with a distinctive
password (BUILDQ_REGISTRY_PASSWORD), one to the Artifact Registry stand-in with
distinctive Google access tokens (minted by google-auth from a service-account key in
the worker). Afterwards neither secret — nor its Basic-auth encoding — appears in any
Redis key (broker messages, results, records, event and log streams), the build logs,
the workers' logs, or Flower's task API.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from tests import services
from tests.conftest import GAR_HOST
from tests.tasks.conftest import Cluster, make_cluster

REPO = Path(__file__).resolve().parents[2]
USER = "ci-bot"


def every_value(client: redis.Redis) -> Iterator[tuple[bytes, bytes]]:
    """(key, serialized contents) of every key, whatever its type."""
    for key in client.scan_iter(count=500):
        kind = client.type(key)
        if kind == b"string":
            value: Any = client.get(key)
        elif kind == b"list":
            value = client.lrange(key, 0, -1)
        elif kind == b"hash":
            value = client.hgetall(key)
        elif kind == b"set":
            value = client.smembers(key)
        elif kind == b"zset":
            value = client.zrange(key, 0, -1, withscores=True)
        elif kind == b"stream":
            value = client.xrange(key)
        else:
            value = b""
        yield key, repr(value).encode()


def leaks(blob: bytes, secrets: list[bytes]) -> list[bytes]:
    return [s for s in secrets if s in blob]


@pytest.fixture
def cluster_with_secrets(tmp_path: Path, docker_engine: str, google: services.GoogleStandIn,
                         gar_registry: services.RegistryServer) -> Iterator[tuple[Cluster, str,
                                                                               services.RegistryServer]]:
    password = f"Pw-{uuid.uuid4().hex}-never-shown"
    registry = services.start_htpasswd_registry(tmp_path / "registry", {USER: password})
    (tmp_path / "cluster").mkdir()
    cluster = make_cluster(tmp_path / "cluster", registry, lease=6)
    cluster.env.update({
        "BUILDQ_REGISTRY_USERNAME": USER, "BUILDQ_REGISTRY_PASSWORD": password,
        "GOOGLE_APPLICATION_CREDENTIALS": str(google.service_account_file(tmp_path / "key.json")),
        "BUILDQ_REGISTRY_ENDPOINTS": f"{GAR_HOST}={gar_registry.host}",
    })
    try:
        yield cluster, password, registry
    finally:
        cluster.stop_all()
        cluster.redis.stop()
        registry.stop()


def test_registry_password_and_tokens_appear_nowhere_after_full_builds(
        cluster_with_secrets: tuple[Cluster, str, services.RegistryServer], tmp_path: Path,
        base_image: str, google: services.GoogleStandIn) -> None:
    cluster, password, registry = cluster_with_secrets
    marker = f"ya29.SECRET{uuid.uuid4().hex[:12]}-"
    google.token_prefix = marker

    flower_port = services.free_port()
    flower_login = ("watcher", f"flower-{uuid.uuid4().hex[:8]}")
    flower_log = open(tmp_path / "flower.log", "wb")  # noqa: SIM115 - closed below
    flower = subprocess.Popen(
        [sys.executable, "-m", "tasks.cli", "flower", "--port", str(flower_port), "--address",
         "127.0.0.1"], env={**cluster.env, "BUILDQ_FLOWER_BASIC_AUTH": ":".join(flower_login)},
        cwd=REPO, stdout=flower_log, stderr=subprocess.STDOUT, start_new_session=True)
    flower_url = f"http://127.0.0.1:{flower_port}"
    try:
        services.wait_for(lambda: requests.get(f"{flower_url}/healthcheck", timeout=1).ok, 30,
                          "flower")
        cluster.start_worker("control")
        cluster.start_worker("docker")

        # The client side needs no registry secret at all: only the workers hold them.
        client_env = {k: v for k, v in cluster.env.items()
                      if k not in ("BUILDQ_REGISTRY_PASSWORD", "GOOGLE_APPLICATION_CREDENTIALS")}
        records = []
        for dest in (f"{registry.host}/team/secret", f"{GAR_HOST}/my-proj/images/secret"):
            app = tmp_path / f"app-{len(records)}"
            app.mkdir()
            (app / "Dockerfile").write_text(f"FROM {base_image}\nCOPY msg.txt /msg.txt\n")
            (app / "msg.txt").write_text(f"secret test {uuid.uuid4()}\n")
            done = subprocess.run([sys.executable, "-m", "tasks.cli", "build", str(app),
                                   "--destination", dest, "--builder", "docker", "--json"],
                                  env=client_env, cwd=REPO, capture_output=True, timeout=240)
            assert done.returncode == 0, done.stdout + done.stderr
            record = json.loads(done.stdout.strip().splitlines()[-1])
            assert record["status"] == "built", record
            records.append((record, done.stdout + done.stderr))

        # The secrets were really used: the push went through, with the minted tokens.
        tokens = [t for t in google.registry_logins if t.startswith(marker)]
        assert tokens, "the worker never logged in to the Artifact Registry stand-in"

        def flower_tasks() -> dict[str, Any]:
            r = requests.get(f"{flower_url}/api/tasks", auth=flower_login, timeout=5)
            r.raise_for_status()
            return dict(r.json())

        services.wait_for(lambda: len(flower_tasks()) >= 2, 30, "flower task list")
        flower_text = requests.get(f"{flower_url}/api/tasks", auth=flower_login, timeout=5).content
    finally:
        os.killpg(flower.pid, 15)
        flower.wait(15)
        flower_log.close()

    secrets = [password.encode(), marker.encode(),
               base64.b64encode(f"{USER}:{password}".encode()),
               *[t.encode() for t in tokens],
               *[base64.b64encode(f"oauth2accesstoken:{t}".encode()) for t in tokens]]

    found = {key: leaks(value, secrets) for key, value in every_value(
        redis.Redis.from_url(cluster.redis.url))}
    assert not {k: v for k, v in found.items() if v}, "secret in Redis"
    assert any(k.startswith(b"buildq:log:") for k in found), "no build log was scanned"

    for log in [*sorted(cluster.root.glob("worker-*.log")), tmp_path / "flower.log"]:
        assert not leaks(log.read_bytes(), secrets), f"secret in {log.name}"
    for _, output in records:
        assert not leaks(output, secrets), "secret in the CLI's output"
    assert not leaks(flower_text, secrets), "secret in Flower's task API"
    for pid in os.listdir("/proc"):
        # No process got a secret on its command line (the env is where workers read it).
        if pid.isdigit():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            assert not leaks(cmdline, secrets)
