"""The real kaniko executor (tests/kube/kaniko) as a Job's container on the test node: what
the kaniko pool's tests stand on once they move to the real control plane."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from tests import services
from tests.kube.cluster import ControlPlane, wait_for

#: The `kaniko_image` fixture may be the executor's cold build (about 9 minutes, see
#: tests/kube/README.md), which pytest-timeout's 600 s would count.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


@pytest.fixture
def base_in_registry(registry: services.RegistryServer, docker_engine: str) -> Iterator[str]:
    """The busybox base, in the session registry only (kaniko pulls its base, never the Engine)."""
    engine = docker.DockerClient(base_url=f"unix://{services.DOCKER_SOCKET}")
    ref = f"{registry.host}/node-kaniko/busybox:base"
    engine.api.tag(docker_engine, ref)
    for item in engine.api.push(ref, stream=True, decode=True):
        assert "error" not in item, item
    engine.api.remove_image(ref)
    yield ref


def test_a_kaniko_job_on_the_node_pushes_and_reports_the_registrys_digest(
        kube: ControlPlane, kube_namespace: str, kaniko_image: str, registry: services.RegistryServer,
        base_in_registry: str, tmp_path: Path) -> None:
    from kubernetes import client

    (tmp_path / "Dockerfile").write_text(f"FROM {base_in_registry}\nRUN echo built by kaniko > /hello\n")
    destination = f"{registry.host}/node-kaniko/app:1"
    api = kube.api_client()
    batch: Any = client.BatchV1Api(api)
    core: Any = client.CoreV1Api(api)
    batch.create_namespaced_job(kube_namespace, {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "kaniko"},
        "spec": {"backoffLimit": 0, "template": {"spec": {"restartPolicy": "Never", "containers": [{
            "name": "kaniko", "image": kaniko_image,
            "args": ["--context=dir:///context", f"--destination={destination}",
                     "--digest-file=/dev/termination-log"],
            "terminationMessagePolicy": "FallbackToLogsOnError",
            "volumeMounts": [{"name": "context", "mountPath": "/context", "readOnly": True}]}],
            "volumes": [{"name": "context", "hostPath": {"path": str(tmp_path)}}]}}}})

    def pod() -> dict[str, Any]:
        items = json.loads(core.list_namespaced_pod(kube_namespace, label_selector="job-name=kaniko",
                                                    _preload_content=False).data)["items"]
        return dict(items[0]) if items else {}

    wait_for(lambda: (pod().get("status") or {}).get("phase") in ("Succeeded", "Failed"), 300,
             "the kaniko pod finished")
    finished = pod()
    api.close()
    terminated = finished["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["reason"], terminated["exitCode"]) == ("Completed", 0), terminated
    assert terminated["message"] == registry.digest("node-kaniko/app", "1")
