"""The kaniko dispatcher (create the Job, follow it, read the digest, delete it) on the real
control plane, with the real kaniko executor in the pod.

Each test has a fresh namespace; the dispatcher talks to kube-apiserver with the admin
credentials (tests/tasks/test_kaniko_chain.py runs the pool with only its
ServiceAccount's token). The context is a ``file://`` store the pod reads through the
hostPath volume buildq renders (one node: its directory is the node's), or S3 (moto);
the base is pulled from the test registry and the image pushed there.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import signal
import subprocess
import tarfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery.exceptions import SoftTimeLimitExceeded

from config import config_from_mapping
from config.errors import BuildError
from config.references import parse_image_ref
from config.schema import LaunchConfig
from config.settings import Settings
from tests import services
from tests.conftest import AWS_ENV
from tests.kube import kaniko as kaniko_build
from tests.kube.cluster import ControlPlane
from workers.builders.kaniko import KanikoDispatcher, KanikoRequest, render_job
from workers.context import BuildInputs
from workers.kube import KubeForbiddenError

#: The first test's fixture may pack the executor image (built by scripts/bootstrap).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

AWS_KEYS_SECRET = "aws-standin-keys"


@pytest.fixture(scope="module")
def images(kube: ControlPlane, registry: services.RegistryServer) -> tuple[str, str]:
    """(the kaniko executor image, the base image), both in the test registry."""
    executor = kaniko_build.push_image(registry.host, say=lambda _line: None)
    base = f"{registry.host}/kaniko-base/busybox:base"
    for args in (("tag", services.ensure_base_image(), base), ("push", base)):
        subprocess.run(["docker", *args], check=True, capture_output=True, timeout=120)
    return executor, base


@pytest.fixture
def api(kube: ControlPlane) -> Iterator[Any]:
    client = kube.api_client()
    yield client
    client.close()


@pytest.fixture
def store(tmp_path: Path) -> Path:
    root = tmp_path / "contexts"
    root.mkdir()
    return root


def _context(store: Path, dockerfile: str) -> tuple[str, str]:
    """A .tar.gz context in a file store; returns (source hash, object URI)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in (("Dockerfile", dockerfile.encode()), ("msg.txt", uuid.uuid4().bytes)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    digest = hashlib.sha256(buf.getvalue()).hexdigest()
    path = store / f"{digest}.tar.gz"
    path.write_bytes(buf.getvalue())
    return digest, path.as_uri()


def _setup(registry: services.RegistryServer, images: tuple[str, str], store: Path, steps: str = "",
           kaniko: dict[str, Any] | None = None, **builder: Any
           ) -> tuple[LaunchConfig, KanikoRequest]:
    executor, base = images
    digest, uri = _context(store, f"FROM {base}\nCOPY msg.txt /msg.txt\n{steps}")
    config = config_from_mapping({"builder": {
        "type": "kaniko", "destination": f"{registry.host}/kaniko/job",
        "build-context-store": store.as_uri(), "kaniko-image": executor,
        **({"kaniko-config": kaniko} if kaniko else {}), **builder}})
    return config, KanikoRequest(image=parse_image_ref(f"{registry.host}/kaniko/job:{digest[:24]}"),
                                 context_uri=uri, source_hash=digest, inputs=BuildInputs())


def _left(kube: ControlPlane, namespace: str) -> list[str]:
    found = []
    for kind in ("jobs", "pods"):
        shown = kube.kubectl("get", kind, "-n", namespace, "-o", "name")
        assert shown.returncode == 0, shown.stderr
        found += shown.stdout.split()
    return found


def _nothing_left(kube: ControlPlane, namespace: str) -> None:
    # Deleted with propagationPolicy Background: the real garbage collector takes the pod.
    services.wait_for(lambda: _left(kube, namespace) == [], 60,
                      f"no Job or pod left in {namespace}")


def _running_pod(kube: ControlPlane, namespace: str) -> bool:
    shown = kube.kubectl("get", "pods", "-n", namespace, "-o", "jsonpath={.items[*].status.phase}")
    return "Running" in shown.stdout.split()


def test_success_returns_registry_digest_and_the_server_keeps_the_rendered_job(
        kube: ControlPlane, kube_namespace: str, api: Any, registry: services.RegistryServer,
        images: tuple[str, str], store: Path) -> None:
    config, req = _setup(registry, images, store, "RUN echo built-by-kaniko\n")
    settings = Settings(kube_namespace=kube_namespace)
    manifest = render_job(req, config, settings)
    seen: list[dict[str, Any]] = []

    def keep_job(line: str) -> None:
        lines.append(line)
        if not seen:
            shown = kube.kubectl("get", "job", manifest["metadata"]["name"], "-n", kube_namespace,
                                 "-o", "json")
            if shown.returncode == 0:
                seen.append(json.loads(shown.stdout))

    lines: list[str] = []
    digest = KanikoDispatcher(config, settings, api).run(req, keep_job)
    assert digest == registry.digest("kaniko/job", req.image.tag or "")
    assert "built-by-kaniko" in " ".join(lines)  # the pod log, API server → kubelet, streamed live
    _nothing_left(kube, kube_namespace)
    # The API server accepted the Job as rendered (server-side validation), args and env intact.
    (job,) = seen
    ours, theirs = manifest["spec"]["template"]["spec"], job["spec"]["template"]["spec"]
    assert theirs["containers"][0]["args"] == ours["containers"][0]["args"]
    assert theirs["volumes"] == ours["volumes"]  # the file store's hostPath, as rendered


def test_failing_build_reports_exit_code_and_log_tail(
        kube: ControlPlane, kube_namespace: str, api: Any, registry: services.RegistryServer,
        images: tuple[str, str], store: Path) -> None:
    config, req = _setup(registry, images, store, "RUN echo about-to-fail && false\n")
    with pytest.raises(BuildError) as err:
        KanikoDispatcher(config, Settings(kube_namespace=kube_namespace), api).run(req, lambda _: None)
    assert "kaniko exited with code 1" in err.value.message
    assert "about-to-fail" in err.value.message
    _nothing_left(kube, kube_namespace)


def test_deadline_exceeded_by_the_job_controller(
        kube: ControlPlane, kube_namespace: str, api: Any, registry: services.RegistryServer,
        images: tuple[str, str], store: Path) -> None:
    config, req = _setup(registry, images, store, "RUN sleep 600\n",
                         kaniko={"spec": {"activeDeadlineSeconds": 15}})
    with pytest.raises(BuildError, match=r"deadline of 15s \(DeadlineExceeded\)"):
        KanikoDispatcher(config, Settings(kube_namespace=kube_namespace), api).run(req, lambda _: None)
    _nothing_left(kube, kube_namespace)


def test_oom_killed_under_a_real_memory_limit(
        kube: ControlPlane, kube_namespace: str, api: Any, registry: services.RegistryServer,
        images: tuple[str, str], store: Path) -> None:
    kaniko = {"spec": {"template": {"spec": {"containers": [
        {"resources": {"limits": {"memory": "64Mi"}}}]}}}}
    config, req = _setup(registry, images, store, "RUN dd if=/dev/zero of=/dev/null bs=256M count=1\n",
                         kaniko=kaniko)
    with pytest.raises(BuildError, match=r"OOMKilled, limit 64Mi"):
        KanikoDispatcher(config, Settings(kube_namespace=kube_namespace), api).run(req, lambda _: None)
    _nothing_left(kube, kube_namespace)


def test_image_pull_backoff(kube: ControlPlane, kube_namespace: str, api: Any,
                            registry: services.RegistryServer, images: tuple[str, str],
                            store: Path) -> None:
    config, req = _setup(registry, images, store,
                         **{"kaniko-image": f"{registry.host}/no-such/kaniko:v0.0.0"})
    with pytest.raises(BuildError, match="ImagePullBackOff"):
        KanikoDispatcher(config, Settings(kube_namespace=kube_namespace), api).run(req, lambda _: None)
    _nothing_left(kube, kube_namespace)


def test_conflict_adopts_the_existing_job(
        kube: ControlPlane, kube_namespace: str, api: Any, registry: services.RegistryServer,
        images: tuple[str, str], store: Path) -> None:
    config, req = _setup(registry, images, store, "RUN echo adopted-build\n")
    settings = Settings(kube_namespace=kube_namespace)
    # An earlier attempt (a worker that died) created the same Job.
    created = kube.kubectl("create", "-f", "-", stdin=json.dumps(render_job(req, config, settings)))
    assert created.returncode == 0, created.stderr
    lines: list[str] = []
    digest = KanikoDispatcher(config, settings, api).run(req, lines.append)
    assert digest == registry.digest("kaniko/job", req.image.tag or "")
    assert any("adopted the existing Job" in line for line in lines)
    _nothing_left(kube, kube_namespace)


def test_forbidden_names_the_rbac_verb(kube: ControlPlane, kube_namespace: str,
                                       registry: services.RegistryServer, images: tuple[str, str],
                                       store: Path, tmp_path: Path) -> None:
    """The namespace's ``default`` ServiceAccount has no Role: the real RBAC authorizer says no."""
    from kubernetes import config as kube_config

    kubeconfig = kube.token_kubeconfig(tmp_path / "default.kubeconfig", kube_namespace, "default")
    api = kube_config.new_client_from_config(config_file=str(kubeconfig))
    config, req = _setup(registry, images, store)
    try:
        with pytest.raises(KubeForbiddenError) as err:
            KanikoDispatcher(config, Settings(kube_namespace=kube_namespace), api).run(req, lambda _: None)
    finally:
        api.close()
    assert f"may not create jobs.batch in namespace {kube_namespace!r}" in str(err.value)
    assert "verbs [create]" in str(err.value)
    _nothing_left(kube, kube_namespace)


def test_soft_time_limit_still_deletes_the_job(
        kube: ControlPlane, kube_namespace: str, api: Any, registry: services.RegistryServer,
        images: tuple[str, str], store: Path) -> None:
    config, req = _setup(registry, images, store, "RUN sleep 600\n")

    def soft_limit(signum: int, frame: object) -> None:
        raise SoftTimeLimitExceeded()

    # Celery raises SoftTimeLimitExceeded from a signal handler in the worker's main thread.
    previous = signal.signal(signal.SIGUSR1, soft_limit)

    def fire_once_running() -> None:
        services.wait_for(lambda: _running_pod(kube, kube_namespace), 300, "the kaniko pod")
        os.kill(os.getpid(), signal.SIGUSR1)

    timer = threading.Thread(target=fire_once_running, daemon=True)
    timer.start()
    try:
        with pytest.raises(SoftTimeLimitExceeded):
            KanikoDispatcher(config, Settings(kube_namespace=kube_namespace), api).run(req, lambda _: None)
    finally:
        timer.join(30)
        signal.signal(signal.SIGUSR1, previous)
    _nothing_left(kube, kube_namespace)


def test_sigterm_cancels_the_build_and_deletes_the_job(
        kube: ControlPlane, kube_namespace: str, api: Any, registry: services.RegistryServer,
        images: tuple[str, str], store: Path) -> None:
    """Celery's revoke(terminate=True) is a SIGTERM to the pool process running the stage."""
    from workers.builders.kaniko import KanikoCancelledError

    config, req = _setup(registry, images, store, "RUN sleep 600\n")
    # Stands in for the prefork child's default SIGTERM action, which would end the process.
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def terminate_once_running() -> None:
        services.wait_for(lambda: _running_pod(kube, kube_namespace), 300, "the kaniko pod")
        os.kill(os.getpid(), signal.SIGTERM)

    timer = threading.Thread(target=terminate_once_running, daemon=True)
    timer.start()
    lines: list[str] = []
    try:
        with pytest.raises(KanikoCancelledError) as err:
            KanikoDispatcher(config, Settings(kube_namespace=kube_namespace), api).run(req, lines.append)
        # Only while the Job runs: afterwards SIGTERM is the process's own business again.
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        timer.join(30)
        signal.signal(signal.SIGTERM, previous)
    assert err.value.kind == "cancelled" and "cancelled (SIGTERM)" in err.value.message
    assert any("cancelled" in line for line in lines)
    _nothing_left(kube, kube_namespace)


def test_value_less_build_arg_takes_the_container_env(
        kube: ControlPlane, kube_namespace: str, api: Any, registry: services.RegistryServer,
        images: tuple[str, str], store: Path) -> None:
    """As kaniko does: ``--build-arg=NAME`` reads NAME from the container's environment."""
    kaniko = {"spec": {"template": {"spec": {"containers": [{
        "env": [{"name": "GREETING", "value": "from-the-env"}],
        "args": ["--build-arg=GREETING"]}]}}}}
    config, req = _setup(registry, images, store,
                         'ARG GREETING\nRUN test "$GREETING" = from-the-env\n', kaniko)
    digest = KanikoDispatcher(config, Settings(kube_namespace=kube_namespace), api).run(req, lambda _: None)
    assert digest == registry.digest("kaniko/job", req.image.tag or "")
    _nothing_left(kube, kube_namespace)


def test_s3_context_read_with_the_pods_endpoint_env(
        kube: ControlPlane, kube_namespace: str, api: Any, registry: services.RegistryServer,
        images: tuple[str, str], moto_server: services.StandIn, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Kaniko reads s3:// only through the S3_ENDPOINT/S3_FORCE_PATH_STYLE/AWS_REGION the
    Job carries; the keys come from a Secret, as a workload identity would give them."""
    import boto3

    from workers.stores.s3 import S3Store

    keys = {k: AWS_ENV[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    for key, value in {**keys, "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": AWS_KEYS_SECRET},
              "data": {k: base64.b64encode(v.encode()).decode() for k, v in keys.items()}}
    created = kube.kubectl("apply", "-n", kube_namespace, "-f", "-", stdin=json.dumps(secret))
    assert created.returncode == 0, created.stderr
    bucket = f"kaniko-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_server.endpoint).create_bucket(Bucket=bucket)
    settings = Settings(s3_endpoint_url=moto_server.endpoint, kube_namespace=kube_namespace)
    s3 = S3Store(f"s3://{bucket}/ctx", settings)
    local = tmp_path / "local"
    local.mkdir()
    executor, base = images
    digest, _ = _context(local, f"FROM {base}\nCOPY msg.txt /msg.txt\n")
    with s3.writer(f"{digest}.tar.gz") as out:
        out.write((local / f"{digest}.tar.gz").read_bytes())
    config = config_from_mapping({"builder": {
        "type": "kaniko", "destination": f"{registry.host}/kaniko/s3", "build-context-store": s3.url,
        "kaniko-image": executor, "kaniko-config": {"spec": {"template": {"spec": {"containers": [
            {"envFrom": [{"secretRef": {"name": AWS_KEYS_SECRET}}]}]}}}}}})
    req = KanikoRequest(image=parse_image_ref(f"{registry.host}/kaniko/s3:{digest[:24]}"),
                        context_uri=s3.uri(f"{digest}.tar.gz"), source_hash=digest, inputs=BuildInputs())
    result = KanikoDispatcher(config, settings, api).run(req, lambda _: None)
    assert result == registry.digest("kaniko/s3", digest[:24])
    s3.delete(f"{digest}.tar.gz")
    _nothing_left(kube, kube_namespace)
