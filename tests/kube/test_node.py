"""The test cluster's node: pods created through the real API server run on the Docker Engine
and report what a kubelet reports (tests/kube/kubelet.py), and the real controllers act on them."""

from __future__ import annotations

import base64
import contextlib
import json
import re
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from tests import services
from tests.kube import kubelet
from tests.kube.cluster import NODE_NAME, REPO, ControlPlane, wait_for

pytestmark = pytest.mark.slow

#: Waiting for a state is not a timing assertion: these only bound a hang.
SETTLE_SECONDS = 120


@pytest.fixture
def core(kube: ControlPlane) -> Iterator[Any]:
    from kubernetes import client

    api = kube.api_client()
    yield client.CoreV1Api(api)
    api.close()


def pod_manifest(name: str, command: list[str], *, container: dict[str, Any] | None = None,
                 **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 1, **spec,
                     "containers": [{"name": "main", "image": services.BASE_IMAGE, "command": command,
                                     **(container or {})}]}}


def read_pod(core: Any, namespace: str, name: str) -> dict[str, Any]:
    return json.loads(core.read_namespaced_pod(name, namespace, _preload_content=False).data)


def wait_pod(core: Any, namespace: str, name: str, check: Callable[[dict[str, Any]], bool],
             what: str) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    def ready() -> bool:
        seen.update(read_pod(core, namespace, name))
        return check(seen)

    wait_for(ready, SETTLE_SECONDS, f"pod {namespace}/{name}: {what}")
    return seen


def finished(pod: dict[str, Any]) -> bool:
    return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")


def backing_off(pod: dict[str, Any]) -> bool:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return any(s["state"].get("waiting", {}).get("reason") == "ImagePullBackOff" for s in statuses)


def state_of(pod: dict[str, Any]) -> dict[str, Any]:
    return dict(pod["status"]["containerStatuses"][0]["state"])


def run_pod(core: Any, namespace: str, manifest: dict[str, Any]) -> dict[str, Any]:
    core.create_namespaced_pod(namespace, manifest)
    return wait_pod(core, namespace, manifest["metadata"]["name"], finished, "finished")


def engine_containers(uid: str) -> list[Any]:
    client = docker.DockerClient(base_url=kubelet.DOCKER_URL)
    return list(client.containers.list(all=True, filters={"label": f"{kubelet.UID_LABEL}={uid}"}))


def test_pod_gets_env_from_a_secret_a_configmap_and_the_downward_api(
        kube: ControlPlane, kube_namespace: str, core: Any) -> None:
    from kubernetes import client

    core.create_namespaced_secret(kube_namespace, {"metadata": {"name": "creds"},
                                                   "stringData": {"password": "s3cr3t-value"}})
    core.create_namespaced_config_map(kube_namespace, {"metadata": {"name": "settings"},
                                                       "data": {"mode": "fast"}})
    env = [{"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}},
           {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "mode"}}},
           {"name": "GREETING", "value": "mode is $(MODE)"}]
    env += [{"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}} for name, path in (
        ("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace"), ("POD_UID", "metadata.uid"),
        ("NODE_NAME", "spec.nodeName"), ("ACCOUNT", "spec.serviceAccountName"), ("POD_IP", "status.podIP"))]
    names = ("PASSWORD", "MODE", "GREETING", "POD_NAME", "POD_NAMESPACE", "POD_UID", "NODE_NAME", "ACCOUNT",
             "POD_IP")
    # Backquotes, not $(...): the kubelet expands $(NAME) in a command as Kubernetes does.
    script = "".join(f"echo {name}=${name}; " for name in names) + (
        "echo file=`cat /creds/password`; echo label=`cat /creds/team`; "
        "echo namespace-file=`cat /var/run/secrets/kubernetes.io/serviceaccount/namespace`; "
        "echo pwd=`pwd`; echo token=`cat /creds/token`")
    script += ("; echo secret-volume=`cat /secret/renamed`; echo mode=`stat -c %a /secret/renamed`"
               "; echo configmap-volume=`cat /settings/mode`")
    manifest = pod_manifest("envs", ["sh", "-c", script], container={
        "env": env, "workingDir": "/scratch",
        "volumeMounts": [{"name": "creds", "mountPath": "/creds", "readOnly": True},
                         {"name": "secret", "mountPath": "/secret", "readOnly": True},
                         {"name": "settings", "mountPath": "/settings"},
                         {"name": "scratch", "mountPath": "/scratch"}]}, volumes=[
        {"name": "secret", "secret": {"secretName": "creds", "defaultMode": 0o400,
                                      "items": [{"key": "password", "path": "renamed"}]}},
        {"name": "settings", "configMap": {"name": "settings"}},
        {"name": "creds", "projected": {"sources": [
            {"secret": {"name": "creds"}},
            {"downwardAPI": {"items": [
                {"path": "team", "fieldRef": {"fieldPath": "metadata.labels['team']"}}]}},
            {"serviceAccountToken": {"path": "token", "expirationSeconds": 600}}]}},
        {"name": "scratch", "emptyDir": {}}])
    manifest["metadata"]["labels"] = {"team": "builders"}
    pod = run_pod(core, kube_namespace, manifest)

    assert pod["status"]["phase"] == "Succeeded", pod["status"]
    printed = core.read_namespaced_pod_log("envs", kube_namespace)
    lines = dict(line.split("=", 1) for line in printed.splitlines())
    token = lines.pop("token")
    assert lines == {
        "PASSWORD": "s3cr3t-value", "MODE": "fast", "GREETING": "mode is fast", "POD_NAME": "envs",
        "POD_NAMESPACE": kube_namespace, "POD_UID": pod["metadata"]["uid"], "NODE_NAME": "buildq-node",
        "ACCOUNT": "default", "POD_IP": "127.0.0.1", "file": "s3cr3t-value", "label": "builders",
        "namespace-file": kube_namespace, "pwd": "/scratch", "secret-volume": "s3cr3t-value", "mode": "400",
        "configmap-volume": "fast"}
    # The projected token came from the TokenRequest API: the API server authenticates it.
    authentication: Any = client.AuthenticationV1Api(core.api_client)
    review = authentication.create_token_review(
        {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token}})
    assert review.status.authenticated
    assert review.status.user.username == f"system:serviceaccount:{kube_namespace}:default"


def test_init_container_runs_first_and_shares_an_empty_dir(kube_namespace: str, core: Any) -> None:
    manifest = pod_manifest("init", ["cat", "/shared/from-init"], container={
        "volumeMounts": [{"name": "shared", "mountPath": "/shared"}]},
        initContainers=[{"name": "prepare", "image": services.BASE_IMAGE,
                         "command": ["sh", "-c", "echo prepared > /shared/from-init"],
                         "volumeMounts": [{"name": "shared", "mountPath": "/shared"}]}],
        volumes=[{"name": "shared", "emptyDir": {}}])
    pod = run_pod(core, kube_namespace, manifest)

    assert pod["status"]["phase"] == "Succeeded"
    assert pod["status"]["initContainerStatuses"][0]["state"]["terminated"]["reason"] == "Completed"
    assert core.read_namespaced_pod_log("init", kube_namespace) == "prepared\n"


def test_a_process_over_its_memory_limit_is_oom_killed(kube_namespace: str, core: Any) -> None:
    # dd's 64 MiB buffer does not fit in 16 MiB: the kernel kills it, the Engine says OOMKilled.
    manifest = pod_manifest("oom", ["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"],
                            container={"resources": {"limits": {"memory": "16Mi"}}})
    pod = run_pod(core, kube_namespace, manifest)

    assert pod["status"]["phase"] == "Failed"
    terminated = state_of(pod)["terminated"]
    assert (terminated["reason"], terminated["exitCode"]) == ("OOMKilled", 137)


def test_an_image_that_cannot_be_pulled_backs_off(kube_namespace: str, core: Any,
                                                  registry: services.RegistryServer) -> None:
    image = f"{registry.host}/buildq/never-pushed:v1"
    core.create_namespaced_pod(kube_namespace, pod_manifest("missing", ["true"], container={"image": image}))
    pod = wait_pod(core, kube_namespace, "missing", backing_off, "ImagePullBackOff")

    waiting = state_of(pod)["waiting"]
    assert waiting["reason"] == "ImagePullBackOff"
    assert image in waiting["message"] and "not found" in waiting["message"].lower()
    assert pod["status"]["phase"] == "Pending"
    # Its log, asked of the API server, is the kubelet's answer for a container not started.
    from kubernetes.client.exceptions import ApiException

    with pytest.raises(ApiException) as refused:
        core.read_namespaced_pod_log("missing", kube_namespace)
    assert refused.value.status == 400
    assert 'container \\"main\\" in pod \\"missing\\" is waiting to start: ImagePullBackOff' in str(
        refused.value.body)


def test_an_image_from_a_private_registry_is_pulled_with_the_pods_pull_secret(
        kube_namespace: str, core: Any, tmp_path: Path) -> None:
    user, password = "puller", "pull-secret-password"
    server = services.start_htpasswd_registry(tmp_path / "registry", {user: password})
    try:
        image = f"{server.host}/team/private:v1"
        engine = docker.DockerClient(base_url=kubelet.DOCKER_URL)
        engine.api.tag(services.BASE_IMAGE, image)
        for item in engine.api.push(image, auth_config={"username": user, "password": password},
                                    stream=True, decode=True):
            assert "error" not in item, item
        engine.api.remove_image(image)  # only the registry has it: the kubelet must pull it
        auth = base64.b64encode(f"{user}:{password}".encode()).decode()
        core.create_namespaced_secret(kube_namespace, {
            "metadata": {"name": "pull"}, "type": "kubernetes.io/dockerconfigjson",
            "data": {".dockerconfigjson": base64.b64encode(json.dumps(
                {"auths": {server.host: {"auth": auth}}}).encode()).decode()}})

        without = pod_manifest("without", ["true"], container={"image": image})
        core.create_namespaced_pod(kube_namespace, without)
        refused = wait_pod(core, kube_namespace, "without", backing_off, "ImagePullBackOff")
        pulled = run_pod(core, kube_namespace, pod_manifest(
            "with", ["echo", "pulled"], container={"image": image}, imagePullSecrets=[{"name": "pull"}]))
    finally:
        server.stop()
        with contextlib.suppress(docker.errors.ImageNotFound):
            engine.api.remove_image(image)

    assert "no basic auth credentials" in state_of(refused)["waiting"]["message"]
    assert pulled["status"]["phase"] == "Succeeded"
    assert core.read_namespaced_pod_log("with", kube_namespace) == "pulled\n"


def test_exit_1_is_an_error_with_the_termination_message(kube_namespace: str, core: Any) -> None:
    written = run_pod(core, kube_namespace, pod_manifest(
        "written", ["sh", "-c", "echo 'the build failed: no space' > /dev/termination-log; exit 1"]))
    custom = run_pod(core, kube_namespace, pod_manifest(
        "custom-path", ["sh", "-c", "echo digest-sha256 > /tmp/result; exit 0"],
        container={"terminationMessagePath": "/tmp/result"}))
    from_logs = run_pod(core, kube_namespace, pod_manifest(
        "from-logs", ["sh", "-c", "echo last words; exit 3"],
        container={"terminationMessagePolicy": "FallbackToLogsOnError"}))

    assert written["status"]["phase"] == "Failed"
    terminated = state_of(written)["terminated"]
    assert (terminated["reason"], terminated["exitCode"]) == ("Error", 1)
    assert terminated["message"] == "the build failed: no space\n"
    assert custom["status"]["phase"] == "Succeeded"
    assert state_of(custom)["terminated"]["reason"] == "Completed"
    assert state_of(custom)["terminated"]["message"] == "digest-sha256\n"
    assert state_of(from_logs)["terminated"]["exitCode"] == 3
    assert state_of(from_logs)["terminated"]["message"] == "last words\n"


def test_a_pod_with_two_containers_fails_if_one_does(kube_namespace: str, core: Any) -> None:
    manifest = pod_manifest("pair", ["sh", "-c", "echo fine"])
    manifest["spec"]["containers"].append(
        {"name": "second", "image": services.BASE_IMAGE, "command": ["sh", "-c", "exit 2"]})
    pod = run_pod(core, kube_namespace, manifest)

    assert pod["status"]["phase"] == "Failed"
    ends = {s["name"]: s["state"]["terminated"] for s in pod["status"]["containerStatuses"]}
    assert {name: (end["exitCode"], end["reason"]) for name, end in ends.items()} == {
        "main": (0, "Completed"), "second": (2, "Error")}
    assert core.read_namespaced_pod_log("pair", kube_namespace, container="main") == "fine\n"


def test_a_job_runs_and_a_background_delete_removes_its_pod(kube: ControlPlane, kube_namespace: str,
                                                            core: Any) -> None:
    from kubernetes import client

    batch: Any = client.BatchV1Api(core.api_client)
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "hello"},
           "spec": {"backoffLimit": 0, "template": {"spec": {
               "restartPolicy": "Never", "containers": [
                   {"name": "main", "image": services.BASE_IMAGE,
                    "command": ["echo", "hello from a Job"]}]}}}}
    batch.create_namespaced_job(kube_namespace, job)
    wait_for(lambda: any(c.type == "Complete" and c.status == "True"
                         for c in batch.read_namespaced_job("hello", kube_namespace).status.conditions or []),
             SETTLE_SECONDS, "the Job Complete")
    pods = core.list_namespaced_pod(kube_namespace, label_selector="job-name=hello").items
    assert [p.status.phase for p in pods] == ["Succeeded"]
    assert core.read_namespaced_pod_log(pods[0].metadata.name, kube_namespace) == "hello from a Job\n"
    uid = pods[0].metadata.uid
    assert engine_containers(uid)

    batch.delete_namespaced_job("hello", kube_namespace, propagation_policy="Background")
    wait_for(lambda: not core.list_namespaced_pod(kube_namespace, label_selector="job-name=hello").items,
             SETTLE_SECONDS, "the garbage collector removing the Job's pod")
    wait_for(lambda: not engine_containers(uid), SETTLE_SECONDS, "the kubelet removing the pod's container")


def test_the_job_controller_ends_a_job_past_its_deadline(kube_namespace: str, core: Any) -> None:
    from kubernetes import client

    batch: Any = client.BatchV1Api(core.api_client)
    batch.create_namespaced_job(kube_namespace, {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "late"},
        "spec": {"backoffLimit": 0, "activeDeadlineSeconds": 2, "template": {"spec": {
            "restartPolicy": "Never", "terminationGracePeriodSeconds": 1, "containers": [
                {"name": "main", "image": services.BASE_IMAGE, "command": ["sleep", "3600"]}]}}}})
    def pods() -> list[Any]:
        return list(core.list_namespaced_pod(kube_namespace, label_selector="job-name=late").items)

    wait_for(lambda: bool(pods()), SETTLE_SECONDS, "the Job's pod")
    [uid] = [p.metadata.uid for p in pods()]

    def failed_condition() -> Any:
        conditions = batch.read_namespaced_job("late", kube_namespace).status.conditions or []
        return next((c for c in conditions if c.type == "Failed" and c.status == "True"), None)

    wait_for(lambda: failed_condition() is not None, SETTLE_SECONDS, "the Job Failed")
    assert failed_condition().reason == "DeadlineExceeded"
    # The controller deleted the pod; the kubelet stopped it and removed its container.
    wait_for(lambda: not engine_containers(uid), SETTLE_SECONDS, "the pod's container removed")


def test_logs_follow_through_the_api_server(kube_namespace: str, core: Any, tmp_path: Path) -> None:
    # The container waits for a file the test makes, so the stream is read while it runs.
    tmp_path.chmod(0o777)
    script = "echo first; while [ ! -e /signal/go ]; do sleep 0.1; done; echo second"
    core.create_namespaced_pod(kube_namespace, pod_manifest(
        "follow", ["sh", "-c", script],
        container={"volumeMounts": [{"name": "signal", "mountPath": "/signal"}]},
        volumes=[{"name": "signal", "hostPath": {"path": str(tmp_path)}}]))
    wait_pod(core, kube_namespace, "follow", lambda p: p["status"].get("phase") == "Running", "Running")

    stream = core.read_namespaced_pod_log("follow", kube_namespace, follow=True, _preload_content=False)
    try:
        lines = stream.stream(64)
        received = b""
        while b"\n" not in received:
            received += next(lines)
        assert received == b"first\n"
        assert read_pod(core, kube_namespace, "follow")["status"]["phase"] == "Running"
        (tmp_path / "go").touch()
        received += b"".join(lines)
    finally:
        stream.release_conn()
    assert received == b"first\nsecond\n"
    assert core.read_namespaced_pod_log("follow", kube_namespace, tail_lines=1) == "second\n"
    assert core.read_namespaced_pod_log("follow", kube_namespace, since_seconds=3600) == "first\nsecond\n"
    stamped = core.read_namespaced_pod_log("follow", kube_namespace, timestamps=True).splitlines()
    assert [line.split(" ", 1)[1] for line in stamped] == ["first", "second"]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z", line.split(" ", 1)[0])
               for line in stamped)


def test_a_node_selector_the_node_does_not_match_leaves_the_pod_unscheduled(
        kube_namespace: str, core: Any) -> None:
    core.create_namespaced_pod(kube_namespace, pod_manifest(
        "elsewhere", ["true"], nodeSelector={"kubernetes.io/arch": "s390x"}))
    pod = wait_pod(core, kube_namespace, "elsewhere",
                   lambda p: any(c["type"] == "PodScheduled" for c in p["status"].get("conditions") or []),
                   "a PodScheduled condition")

    condition = next(c for c in pod["status"]["conditions"] if c["type"] == "PodScheduled")
    assert (condition["status"], condition["reason"]) == ("False", "Unschedulable")
    assert not pod["spec"].get("nodeName")
    assert pod["status"]["phase"] == "Pending"


def test_a_second_node_advertising_arm64_runs_the_pods_that_select_it(
        kube: ControlPlane, kube_namespace: str, core: Any) -> None:
    import platform

    kube.add_node("arm64-standin", "arm64")
    try:
        for name, arch in (("on-arm64", "arm64"), ("on-host", kubelet._arch())):
            core.create_namespaced_pod(kube_namespace, pod_manifest(
                name, ["busybox", "uname", "-m"], nodeSelector={"kubernetes.io/arch": arch}))
        arm64 = wait_pod(core, kube_namespace, "on-arm64", finished, "finished")
        host = wait_pod(core, kube_namespace, "on-host", finished, "finished")
        assert (arm64["spec"]["nodeName"], host["spec"]["nodeName"]) == ("arm64-standin",
                                                                          NODE_NAME)
        for pod in (arm64, host):
            assert pod["status"]["phase"] == "Succeeded", pod["status"]
            scheduled = next(c for c in pod["status"]["conditions"] if c["type"] == "PodScheduled")
            assert scheduled["status"] == "True", scheduled
        # Its logs come from its own kubelet API, through the API server. The node is this
        # host all the same: an image of the host's architecture runs natively there.
        assert core.read_namespaced_pod_log("on-arm64", kube_namespace) == f"{platform.machine()}\n"
        labels = json.loads(core.read_node("arm64-standin", _preload_content=False).data)
        assert labels["metadata"]["labels"]["kubernetes.io/arch"] == "arm64"
        assert labels["status"]["nodeInfo"]["architecture"] == "arm64"
    finally:
        kube.remove_node("arm64-standin")


def test_deleting_a_running_pod_stops_and_removes_its_container(kube_namespace: str, core: Any) -> None:
    core.create_namespaced_pod(kube_namespace, pod_manifest("sleeper", ["sleep", "3600"]))
    pod = wait_pod(core, kube_namespace, "sleeper", lambda p: p["status"].get("phase") == "Running",
                   "Running")
    uid = pod["metadata"]["uid"]
    assert [c.status for c in engine_containers(uid)] == ["running"]

    core.delete_namespaced_pod("sleeper", kube_namespace)
    wait_for(lambda: not core.list_namespaced_pod(
        kube_namespace, field_selector="metadata.name=sleeper").items, SETTLE_SECONDS, "the pod deleted")
    assert engine_containers(uid) == []


def test_a_pod_runs_to_its_end_through_an_api_server_restart(kube: ControlPlane, kube_namespace: str,
                                                             core: Any, tmp_path: Path) -> None:
    tmp_path.chmod(0o777)
    core.create_namespaced_pod(kube_namespace, pod_manifest(
        "through", ["sh", "-c", "while [ ! -e /signal/go ]; do sleep 0.1; done; echo done"],
        container={"volumeMounts": [{"name": "signal", "mountPath": "/signal"}]},
        volumes=[{"name": "signal", "hostPath": {"path": str(tmp_path)}}]))
    wait_pod(core, kube_namespace, "through", lambda p: p["status"].get("phase") == "Running", "Running")

    kube.restart("kube-apiserver")
    (tmp_path / "go").touch()

    pod = wait_pod(core, kube_namespace, "through", finished, "finished")
    assert pod["status"]["phase"] == "Succeeded"
    assert core.read_namespaced_pod_log("through", kube_namespace) == "done\n"


def test_a_restarted_kubelet_removes_the_containers_it_left(kube: ControlPlane, kube_namespace: str,
                                                             core: Any) -> None:
    core.create_namespaced_pod(kube_namespace, pod_manifest("left", ["sleep", "3600"]))
    pod = wait_pod(core, kube_namespace, "left", lambda p: p["status"].get("phase") == "Running", "Running")
    [before] = [c.id for c in engine_containers(pod["metadata"]["uid"])]

    kube.restart("kubelet")

    wait_for(lambda: before not in [c.id for c in engine_containers(pod["metadata"]["uid"])],
             SETTLE_SECONDS, "the restarted kubelet removing the container it had left")


def test_the_kubelet_api_answers_only_a_client_with_a_cluster_certificate(kube: ControlPlane) -> None:
    pki = kube.directory / "pki"
    url = f"https://127.0.0.1:{kube.kubelet_port}/healthz"
    context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionResetError)):
        urllib.request.urlopen(url, context=context, timeout=10)
    # The API server's own client certificate (--kubelet-client-certificate) is let in.
    context.load_cert_chain(pki / "apiserver-kubelet-client.crt", pki / "apiserver-kubelet-client.key")
    with urllib.request.urlopen(url, context=context, timeout=10) as answer:
        assert answer.read() == b"ok"


def test_deploy_kubernetes_applies_to_the_real_api_server(kube: ControlPlane) -> None:
    from workers.kube import KANIKO_ACCESS

    applied = kube.kubectl("apply", "-k", str(REPO / "deploy" / "kubernetes"), timeout=60)
    try:
        assert applied.returncode == 0, applied.stderr
        role = json.loads(kube.kubectl("get", "role", "buildq-kaniko", "-n", "buildq", "-o", "json").stdout)
        granted = {(verb, group, resource) for rule in role["rules"] for verb in rule["verbs"]
                   for group in rule["apiGroups"] for resource in rule["resources"]}
        assert granted == {(a.verb, a.group, a.resource) for a in KANIKO_ACCESS}
    finally:
        kube.kubectl("delete", "namespace", "buildq", "--wait=false")
