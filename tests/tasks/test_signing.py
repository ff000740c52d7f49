"""Signed requests on real workers: only messages signed by a trusted key ever run.

The workers trust a certificates directory holding their own certificate and alice's;
mallory has a key and a certificate of her own that nobody put there. Messages are
published three ways: by buildq's own app (signed with alice's key, or mallory's), and
by hand with kombu (plain JSON, as anybody who can write to Redis could).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from config.settings import Settings
from tasks import build_image
from tests import services
from tests.tasks.conftest import Cluster, make_cluster, point_app_at


@dataclass
class Identity:
    key: Path
    cert: Path


@dataclass
class Signed:
    cluster: Cluster
    alice: Identity
    mallory: Identity
    apps: Path

    def as_(self, who: Identity) -> Settings:
        env = {**self.cluster.env, "BUILDQ_SIGNING_KEY": str(who.key),
               "BUILDQ_SIGNING_CERT": str(who.cert)}
        env.pop("BUILDQ_SIGNING_CERTS_DIR", None)
        return Settings.from_env(env)

    def app(self, base: str) -> Path:
        root = self.apps / f"app-{uuid.uuid4().hex[:8]}"
        root.mkdir(parents=True)
        (root / "Dockerfile").write_text(f"FROM {base}\nCOPY msg.txt /msg.txt\n")
        (root / "msg.txt").write_text(f"signed {uuid.uuid4()}\n")
        return root

    def dest(self) -> str:
        return f"{self.cluster.registry.host}/signed/{uuid.uuid4().hex[:8]}"

    def log(self) -> str:
        return "\n".join(p.read_text(errors="replace")
                         for p in sorted(self.cluster.root.glob("worker-*.log")))


def make_identity(directory: Path, name: str) -> Identity:
    """An RSA key and a self-signed certificate, as the README says to make them."""
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(key), "-out", str(cert), "-days", "2", "-subj", f"/O=buildq-tests/CN={name}"],
                   check=True, capture_output=True)
    return Identity(key, cert)


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory, docker_engine: str,
           registry: services.RegistryServer) -> Iterator[Signed]:
    from tasks import app as app_module

    root = tmp_path_factory.mktemp("signed")
    keys, trusted = root / "keys", root / "trusted"
    keys.mkdir()
    trusted.mkdir()
    worker = make_identity(keys, "worker")
    alice = make_identity(keys, "alice")
    mallory = make_identity(keys, "mallory")
    for who in (worker, alice):
        (trusted / who.cert.name).write_text(who.cert.read_text())
    (root / "cluster").mkdir()
    (root / "apps").mkdir()
    cluster = make_cluster(root / "cluster", registry, lease=6)
    cluster.env.update({"BUILDQ_SIGNING_KEY": str(worker.key), "BUILDQ_SIGNING_CERT": str(worker.cert),
                        "BUILDQ_SIGNING_CERTS_DIR": str(trusted)})
    previous = app_module._settings
    try:
        cluster.start_worker("control", concurrency=2)
        cluster.start_worker("docker")
        yield Signed(cluster, alice, mallory, root / "apps")
    finally:
        cluster.stop_all()
        cluster.redis.stop()
        if previous is not None:
            point_app_at(previous)


def _never_ran(signed: Signed, task_id: str, why: str, mark: str, before: int) -> None:
    """The workers logged the message as refused, and no stage of it ever started."""
    def refused() -> list[str]:
        return [line for line in signed.log().splitlines() if why in line and mark in line]

    services.wait_for(lambda: len(refused()) > before, 60, f"the workers' log to refuse {mark}")
    time.sleep(1)
    client = signed.cluster.client()
    assert not client.exists(f"buildq:events:{task_id}"), "a stage of the request ran"
    assert not client.exists(f"buildq:record:request:{task_id}")


def test_a_signed_request_runs_and_its_record_names_the_signer(
        signed: Signed, base_image: str) -> None:
    point_app_at(signed.as_(signed.alice))
    record = build_image.delay(str(signed.app(base_image)), destination=signed.dest()).get(
        timeout=180)
    assert record["status"] == "built", record
    assert record["requester"] == "O=buildq-tests,CN=alice" or \
        record["requester"] == "CN=alice,O=buildq-tests", record
    assert record["requester_verified"] is True, record


def test_an_unsigned_message_published_to_redis_never_runs(signed: Signed, base_image: str) -> None:
    from kombu import Connection

    task_id = str(uuid.uuid4())
    marker = signed.apps / f"never-{task_id}"
    args = [str(signed.app(base_image))]
    kwargs = {"destination": signed.dest(), "build_args": {"MARK": str(marker)}}
    headers = {"lang": "py", "task": "buildq.build_image", "id": task_id, "root_id": task_id,
               "parent_id": None, "group": None, "retries": 0, "eta": None, "expires": None,
               "argsrepr": repr(args), "kwargsrepr": repr(kwargs), "origin": "mallory@nowhere",
               "ignore_result": False}
    with Connection(signed.cluster.redis.url) as conn:
        conn.Producer().publish(json.dumps([args, kwargs, {}]), routing_key="control",
                                exchange="", headers=headers, content_type="application/json",
                                content_encoding="utf-8", delivery_mode=2)
    _never_ran(signed, task_id, "Refusing to deserialize untrusted content", "", 0)
    assert args[0] in signed.log()  # the refused body is logged (a path, never a secret)


def test_a_message_signed_by_an_untrusted_certificate_never_runs(
        signed: Signed, base_image: str) -> None:
    why = "rejected a task message not signed by a trusted key"
    before = signed.log().count(why)
    point_app_at(signed.as_(signed.mallory))
    result = build_image.delay(str(signed.app(base_image)), destination=signed.dest())
    _never_ran(signed, result.id, why, "Unknown certificate", before)


def test_a_process_signing_with_half_a_key_pair_is_refused(
        signed: Signed, tmp_path: Path, base_image: str) -> None:
    env = {**signed.cluster.env, "BUILDQ_SIGNING_KEY": str(signed.alice.key)}
    env.pop("BUILDQ_SIGNING_CERT")
    done = subprocess.run([*_buildq(), "build", str(signed.app(base_image)), "--destination",
                           signed.dest()], env=env, capture_output=True, text=True, timeout=60,
                          cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "BUILDQ_SIGNING_CERT" in done.stderr and "Traceback" not in done.stderr


def _buildq() -> list[str]:
    return [sys.executable, "-m", "tasks.cli"]


def test_a_signing_worker_without_trusted_certificates_does_not_start(
        signed: Signed, tmp_path: Path) -> None:
    env = {k: v for k, v in signed.cluster.env.items() if k != "BUILDQ_SIGNING_CERTS_DIR"}
    done = subprocess.run([*_buildq(), "worker", "control"], env=env, capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "BUILDQ_SIGNING_CERTS_DIR" in done.stderr and "Traceback" not in done.stderr
