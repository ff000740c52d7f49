"""The chain with ``builder: kaniko``, end to end, for each cloud context store.

Real control and kaniko workers (their own Redis), the Kubernetes API stand-in reached
by the kaniko worker through a kubeconfig, its docker kubelet, a real registry, and the
storage stand-ins: moto (S3), gcp-storage-emulator (GCS) and Azurite (Azure Blob). The
workers find the stores and the registry only through their BUILDQ_* environment; the
kubelet reads each context only through what the Job's own env says, as kaniko would.

The destination is a logical registry host mapped to the real registry by
BUILDQ_REGISTRY_ENDPOINTS, so every push also proves the Job honours that mapping.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import redis

from config.names import HASH_LABEL
from tasks import build_image
from tasks.failures import outcome as answer_of
from tasks.keys import events_key
from tests import services
from tests.conftest import AWS_ENV
from tests.k8s_standin import KubeStandIn, role_rules
from tests.tasks.conftest import REPO, Cluster, make_cluster, point_app_at, use_cluster
from workers.kube import KANIKO_ACCESS

NAMESPACE = "buildq-kaniko"
#: The name users give the registry; BUILDQ_REGISTRY_ENDPOINTS maps it to the real one.
LOGICAL_REGISTRY = "registry.buildq.test"
AZURE_HOST = f"{services.AZURITE_ACCOUNT}.blob.core.windows.net"
K8S_VERSION = "1.33.0"
STORES = ("s3", "gcs", "azure")
#: The kaniko pool's access table as (verb, group, resource), which `buildq doctor` checks.
ACCESS_TABLE = {(a.verb, a.group, a.resource) for a in KANIKO_ACCESS}


@dataclasses.dataclass
class Store:
    """A context store the workers use, and an independent client to look inside it."""

    url: str
    exists: Callable[[str], bool]
    #: What the Job's env must carry for kaniko to read this store.
    job_env: dict[str, str]


@dataclasses.dataclass
class KanikoCluster:
    cluster: Cluster
    standin: KubeStandIn
    stores: dict[str, Store]
    #: This module's own moto (S3), which a test stops to take the store down.
    moto: services.StandIn

    @property
    def registry(self) -> services.RegistryServer:
        return self.cluster.registry

    def config(self, repository: str, store: str) -> dict[str, Any]:
        return {"builder": {"type": "kaniko", "destination": f"{LOGICAL_REGISTRY}/{repository}",
                            "build-context-store": self.stores[store].url}}


def _s3_client(moto: services.StandIn) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=moto.endpoint, region_name="us-east-1",
                        aws_access_key_id="standin", aws_secret_access_key="standin")


def _s3(moto: services.StandIn) -> Store:
    from botocore.exceptions import ClientError

    bucket = f"ctx-{uuid.uuid4().hex[:10]}"
    s3 = _s3_client(moto)
    s3.create_bucket(Bucket=bucket)

    def exists(key: str) -> bool:
        try:
            s3.head_object(Bucket=bucket, Key=f"kaniko/{key}")
            return True
        except ClientError:
            return False

    return Store(f"s3://{bucket}/kaniko", exists,
                 {"S3_ENDPOINT": moto.endpoint, "S3_FORCE_PATH_STYLE": "true"})


def _gcs(emulator: services.StandIn) -> Store:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(project="standin", credentials=AnonymousCredentials(),
                            client_options={"api_endpoint": emulator.endpoint})
    bucket = client.create_bucket(f"ctx-{uuid.uuid4().hex[:10]}")
    return Store(f"gs://{bucket.name}/kaniko", lambda key: bool(bucket.blob(f"kaniko/{key}").exists()),
                 {"STORAGE_EMULATOR_HOST": emulator.endpoint})


def _azure(azurite: services.StandIn) -> Store:
    from azure.storage.blob import BlobServiceClient

    service = BlobServiceClient(f"{azurite.endpoint}/{services.AZURITE_ACCOUNT}", credential={
        "account_name": services.AZURITE_ACCOUNT, "account_key": services.AZURITE_KEY})
    container = service.create_container(f"ctx-{uuid.uuid4().hex[:10]}")
    return Store(f"https://{AZURE_HOST}/{container.container_name}/kaniko",
                 lambda key: bool(container.get_blob_client(f"kaniko/{key}").exists()),
                 {"AZURE_STORAGE_ACCESS_KEY": services.AZURITE_KEY,
                  "BUILDQ_AZURE_BLOB_ENDPOINT": f"{azurite.endpoint}/{services.AZURITE_ACCOUNT}"})


@pytest.fixture(scope="module")
def kaniko_cluster(tmp_path_factory: pytest.TempPathFactory, docker_engine: str,
                   registry: services.RegistryServer, kube_standin: KubeStandIn,
                   gcs_emulator: services.StandIn,
                   azurite: services.StandIn) -> Iterator[KanikoCluster]:
    from tasks import app as app_module

    root = tmp_path_factory.mktemp("kaniko-cluster")
    try:
        moto_server = services.start_moto(root / "moto")
    except ImportError as exc:
        pytest.skip(f"storage stand-in unavailable: {exc}")
    stores = {"s3": _s3(moto_server), "gcs": _gcs(gcs_emulator), "azure": _azure(azurite)}
    cluster = make_cluster(root, registry, lease=6)
    # Control (uploads) and kaniko (dispatches, verifies, records, deletes the context)
    # workers both reach the stores through these settings, as deployed workers would.
    cluster.env.update(AWS_ENV)
    cluster.env.update({
        "AWS_DEFAULT_REGION": "us-east-1",
        "BUILDQ_S3_ENDPOINT_URL": moto_server.endpoint,
        "BUILDQ_GCS_ENDPOINT_URL": gcs_emulator.endpoint,
        "BUILDQ_AZURE_BLOB_ENDPOINT": f"{azurite.endpoint}/{services.AZURITE_ACCOUNT}",
        "BUILDQ_AZURE_STORAGE_KEY": services.AZURITE_KEY,
        "BUILDQ_REGISTRY_ENDPOINTS": f"{LOGICAL_REGISTRY}={registry.host}",
        # Pushes go to the logical registry's name (and the real one's, for loopback jobs).
        "BUILDQ_ALLOWED_DESTINATIONS": f"{LOGICAL_REGISTRY}/*,{registry.host}/*",
        "KUBECONFIG": str(kube_standin.kubeconfig(root / "kubeconfig", NAMESPACE)),
        "BUILDQ_KUBE_NAMESPACE": NAMESPACE,
    })
    cluster.env.pop("STORAGE_EMULATOR_HOST", None)
    # The Job takes the Azure account key from a Secret in its own namespace.
    if kube_standin.get("secrets", NAMESPACE, "azure-storage-access-key") is None:
        kube_standin.put_secret(NAMESPACE, "azure-storage-access-key",
                                {"AZURE_STORAGE_ACCESS_KEY": services.AZURITE_KEY})
    previous = app_module._settings
    try:
        cluster.start_worker("control", concurrency=2)
        cluster.start_worker("kaniko", concurrency=2)
        use_cluster(cluster)
        yield KanikoCluster(cluster, kube_standin, stores, moto_server)
    finally:
        cluster.stop_all()
        cluster.redis.stop()
        moto_server.stop()
        if previous is not None:
            point_app_at(previous)


@pytest.fixture
def kc(kaniko_cluster: KanikoCluster) -> Iterator[KanikoCluster]:
    kaniko_cluster.standin.reset()
    yield kaniko_cluster
    # Every Job the workers sent passes the real schema, and carries no secret value.
    for create in kaniko_cluster.standin.requests_for("POST"):
        kubernetes_validate.validate(create.body, K8S_VERSION, strict=True)
        assert services.AZURITE_KEY not in json.dumps(create.body)
    # Whatever the test made the pool do (adopt, cancel, fail), it asked the API server only
    # for what the doctor checks and the Role grants.
    assert kaniko_cluster.standin.accesses() <= ACCESS_TABLE
    kaniko_cluster.standin.reset()


def _app(tmp_path: Path, base: str, extra: str = "") -> Path:
    root = tmp_path / f"app-{uuid.uuid4().hex[:8]}"
    root.mkdir()
    (root / "Dockerfile").write_text(f"FROM {base}\nCOPY msg.txt /msg.txt\n{extra}")
    (root / "msg.txt").write_text(f"kaniko {uuid.uuid4()}\n")
    return root


def _repo(name: str) -> str:
    return f"kaniko/{name}-{uuid.uuid4().hex[:6]}"


def _nothing_left(kc: KanikoCluster, store: str, source_hash: str) -> None:
    assert kc.standin.list("jobs") == []
    assert kc.standin.list("pods") == []
    assert not kc.stores[store].exists(f"{source_hash}.tar.gz")


def _log_lines(kc: KanikoCluster, source_hash: str) -> list[str]:
    client: redis.Redis = kc.cluster.client()
    return [fields.get("line", "") for _, fields in client.xrange(f"buildq:log:{source_hash}")]


def _args(job: dict[str, Any]) -> list[str]:
    return list(job["spec"]["template"]["spec"]["containers"][0]["args"])


@pytest.mark.parametrize("store", STORES)
def test_kaniko_chain_end_to_end(kc: KanikoCluster, store: str, tmp_path: Path,
                                 base_image: str) -> None:
    app = _app(tmp_path, base_image, "RUN echo from-the-kaniko-pod\n")
    repo = _repo(store)
    config = kc.config(repo, store)
    # Identical requests at once: one lock holder, one Job, one record for all.
    results = [build_image.delay(str(app), builder="kaniko", config=config) for _ in range(3)]
    with ThreadPoolExecutor(3) as threads:
        records = list(threads.map(lambda r: r.get(timeout=240), results))
    assert {r["status"] for r in records} == {"built"}, records
    record = next(r for r in records if not r["attached"])
    tag, source_hash = record["tag"], record["source_hash"]
    assert record["image"] == f"{LOGICAL_REGISTRY}/{repo}:{tag}"
    # The digest is the registry's own Docker-Content-Digest, for every request.
    assert {r["digest"] for r in records} == {kc.registry.digest(repo, tag)}
    assert {"upload", "kaniko", "push"} <= set(record["stages"])

    (create,) = kc.standin.requests_for("POST")
    assert create.status == 201 and create.path == f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs"
    job = create.body
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    args = _args(job)
    # Kaniko read the context from this store, and pushed to the mapped endpoint.
    assert f"--context={kc.stores[store].url}/{source_hash}.tar.gz" in args
    assert f"--destination={kc.registry.host}/{repo}:{tag}" in args
    assert f"--insecure-registry={kc.registry.host}" in args
    # The kubelet ran the Job with exactly this env, Secrets resolved.
    assert kc.standin.kubelet_env and kc.standin.kubelet_env[-1].items() >= kc.stores[store].job_env.items()
    env = job["spec"]["template"]["spec"]["containers"][0].get("env") or []
    assert services.AZURITE_KEY not in str(job)
    if store == "azure":
        assert {"name": "AZURE_STORAGE_ACCESS_KEY", "valueFrom": {"secretKeyRef": {
            "name": "azure-storage-access-key", "key": "AZURE_STORAGE_ACCESS_KEY"}}} in env

    _nothing_left(kc, store, source_hash)
    lines = _log_lines(kc, source_hash)
    assert any("from-the-kaniko-pod" in line for line in lines)
    assert not any(services.AZURITE_KEY in text for text in [json.dumps(records), *lines])

    # Built once: the same request now finds the image and costs no Job.
    again = build_image.delay(str(app), builder="kaniko", config=config).get(timeout=120)
    assert again["status"] == "skipped", again
    assert again["digest"] == record["digest"] and again["image"] == record["image"]
    assert len(kc.standin.requests_for("POST")) == 1
    _nothing_left(kc, store, source_hash)


def test_failing_run_step_is_recorded_and_everything_is_deleted(
        kc: KanikoCluster, tmp_path: Path, base_image: str) -> None:
    app = _app(tmp_path, base_image, "RUN echo doomed-step && false\n")
    repo = _repo("failing")
    record = answer_of(build_image.delay(str(app), builder="kaniko",
                                       config=kc.config(repo, "s3")),
                     timeout=180)
    assert record["status"] == "failed", record
    assert record["error_kind"] == "build"
    assert "kaniko exited with code 1" in record["error"] and "doomed-step" in record["error"]
    assert len(kc.standin.requests_for("POST")) == 1
    assert [r.body for r in kc.standin.requests_for("DELETE")] == [{"propagationPolicy": "Background"}]
    assert kc.registry.digest(repo, record["tag"]) is None
    _nothing_left(kc, "s3", record["source_hash"])


@pytest.mark.parametrize(("outcome", "kaniko_config", "expected"), [
    ("exit", None, "kaniko exited with code 1"),
    ("oom", None, "ran out of memory (OOMKilled"),
    ("hang", {"spec": {"activeDeadlineSeconds": 2}}, "(DeadlineExceeded)"),
    ("pull", None, "cannot start: ImagePullBackOff"),
], ids=["exit", "oom", "deadline", "image-pull"])
def test_job_failures_give_a_clear_record_and_leave_nothing(
        kc: KanikoCluster, outcome: str, kaniko_config: dict[str, Any] | None, expected: str,
        tmp_path: Path, base_image: str) -> None:
    app = _app(tmp_path, base_image)
    config = kc.config(_repo(outcome), "azure")
    if kaniko_config:
        config["builder"]["kaniko-config"] = kaniko_config
    kc.standin.plan(outcome)
    record = answer_of(build_image.delay(str(app), builder="kaniko", config=config), timeout=180)
    assert record["status"] == "failed", record
    assert expected in record["error"] and record["error_kind"] == "build", record
    assert len(kc.standin.requests_for("POST")) == 1
    _nothing_left(kc, "azure", record["source_hash"])


def test_api_server_500s_then_recovers(kc: KanikoCluster, tmp_path: Path, base_image: str) -> None:
    app = _app(tmp_path, base_image)
    repo = _repo("api-500")
    kc.standin.fail_next(2, 500, method="POST", path_contains="/jobs")
    record = build_image.delay(str(app), builder="kaniko",
                               config=kc.config(repo, "gcs")).get(timeout=180)
    assert record["status"] == "built", record
    assert record["digest"] == kc.registry.digest(repo, record["tag"])
    assert [r.status for r in kc.standin.requests_for("POST")] == [500, 500, 201]
    _nothing_left(kc, "gcs", record["source_hash"])


def test_store_down_is_retried_then_a_clear_record(kc: KanikoCluster, tmp_path: Path,
                                                   base_image: str) -> None:
    app = _app(tmp_path, base_image)
    store = kc.stores["s3"]
    kc.moto.stop()
    try:
        result = build_image.delay(str(app), builder="kaniko", config=kc.config(_repo("down"), "s3"))
        record = answer_of(result, timeout=180)
    finally:
        kc.moto.start(services.moto_ready(kc.moto))
        # moto keeps its buckets in memory: give the restarted one the same bucket back.
        _s3_client(kc.moto).create_bucket(Bucket=store.url.split("/")[2])
    assert record["status"] == "failed", record
    assert record["error_kind"] == "context-store"
    assert f"cannot reach {kc.moto.endpoint}" in record["error"]
    events = kc.cluster.client().xrange(events_key(record["id"]))
    assert [f for _, f in events if f.get("kind") == "retry"], "the chain never retried"
    # No Job was ever created, and nothing is left behind.
    assert kc.standin.requests_for("POST") == []
    _nothing_left(kc, "s3", record["source_hash"])


def test_revoked_build_deletes_the_job_and_the_context(
        kc: KanikoCluster, tmp_path: Path, base_image: str) -> None:
    app = _app(tmp_path, base_image)
    repo = _repo("revoked")
    config = kc.config(repo, "gcs")
    kc.standin.plan("hang")
    result = build_image.delay(str(app), builder="kaniko", config=config)
    services.wait_for(lambda: any(p["status"]["phase"] == "Running" for p in kc.standin.list("pods")),
                      120, "the kaniko pod")
    (job,) = kc.standin.list("jobs")
    source_hash = job["metadata"]["annotations"][HASH_LABEL]
    assert kc.stores["gcs"].exists(f"{source_hash}.tar.gz")  # uploaded, in use
    # A second request for the same source waits on the running build.
    waiter = build_image.delay(str(app), builder="kaniko", config=config)
    services.wait_for(lambda: any(f.get("kind") == "attached" for _, f in
                                  kc.cluster.client().xrange(events_key(waiter.id))),
                      60, "the second request to attach")
    (main,) = [pid for pid, (pool, _) in kc.cluster.workers.items() if pool == "kaniko"]
    processes = set(_children(main))

    result.revoke(terminate=True)  # SIGTERM to the pool process running the kaniko stage
    record = answer_of(waiter, timeout=120)
    assert record["status"] == "failed" and record["error_kind"] == "cancelled", record
    assert "cancelled (SIGTERM)" in record["error"]
    assert [r.body for r in kc.standin.requests_for("DELETE")] == [{"propagationPolicy": "Background"}]
    _nothing_left(kc, "gcs", source_hash)
    # The pool process ended once the record was written, as the pool expects of a
    # terminated job's process, and was replaced.
    services.wait_for(lambda: processes - set(_children(main)), 30, "the pool process to exit")
    services.wait_for(lambda: len(_children(main)) >= len(processes), 30, "a replacement")

    # The lock went with the build: the same source builds at once, in a new Job.
    again = build_image.delay(str(app), builder="kaniko", config=config).get(timeout=180)
    assert again["status"] == "built", again
    assert again["digest"] == kc.registry.digest(repo, again["tag"])
    assert len(kc.standin.requests_for("POST")) == 2
    _nothing_left(kc, "gcs", source_hash)


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The command may hold spaces and parentheses: fields follow the last ")".
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_killed_pool_process_build_is_taken_over_and_adopts_the_job(
        kc: KanikoCluster, tmp_path: Path, base_image: str) -> None:
    """The pool process dispatching a Job dies: the build is taken over, and the new
    holder adopts the running Job (409 on create) instead of starting a second one."""
    app = _app(tmp_path, base_image, "RUN sleep 15\n")
    repo = _repo("adopted")
    result = build_image.delay(str(app), builder="kaniko", config=kc.config(repo, "azure"))
    services.wait_for(lambda: any(p["status"]["phase"] == "Running" for p in kc.standin.list("pods")),
                      120, "the kaniko pod")
    (main,) = [pid for pid, (pool, _) in kc.cluster.workers.items() if pool == "kaniko"]
    children = _children(main)
    assert children, "the kaniko worker has no pool processes"
    for child in children:  # the one dispatching is among them; the idle one is replaced
        os.kill(child, signal.SIGKILL)

    record = result.get(timeout=180)
    assert record["status"] == "built", record
    assert record["digest"] == kc.registry.digest(repo, record["tag"])
    assert [r.status for r in kc.standin.requests_for("POST")] == [201, 409]
    _nothing_left(kc, "azure", record["source_hash"])


def test_skipped_build_deletes_a_context_left_by_a_dead_holder(
        kc: KanikoCluster, tmp_path: Path, base_image: str) -> None:
    app = _app(tmp_path, base_image)
    config = kc.config(_repo("leftover"), "s3")
    first = build_image.delay(str(app), builder="kaniko", config=config).get(timeout=180)
    assert first["status"] == "built", first
    # What a holder killed after its Job pushed leaves behind (its Job ends by TTL); the
    # build that takes over finds the image and must still delete the upload.
    key = f"{first['source_hash']}.tar.gz"
    bucket = kc.stores["s3"].url.split("/")[2]
    _s3_client(kc.moto).put_object(Bucket=bucket, Key=f"kaniko/{key}", Body=b"orphaned upload")
    assert kc.stores["s3"].exists(key)
    again = build_image.delay(str(app), builder="kaniko", config=config).get(timeout=120)
    assert again["status"] == "skipped", again
    assert not kc.stores["s3"].exists(key)


def test_ten_identical_requests_create_one_job(kc: KanikoCluster, tmp_path: Path,
                                               base_image: str) -> None:
    app = _app(tmp_path, base_image, "RUN sleep 2\n")
    config = kc.config(_repo("ten"), "s3")
    results = [build_image.delay(str(app), builder="kaniko", config=config) for _ in range(10)]
    with ThreadPoolExecutor(10) as threads:
        records = list(threads.map(lambda r: r.get(timeout=240), results))
    assert {r["status"] for r in records} == {"built"}
    assert len({r["digest"] for r in records}) == 1
    creates = kc.standin.requests_for("POST")
    assert len(creates) == 1 and creates[0].status == 201
    _nothing_left(kc, "s3", records[0]["source_hash"])


def test_what_the_pool_asks_the_api_server_is_what_the_doctor_checks_and_the_role_grants(
        kc: KanikoCluster, tmp_path: Path, base_image: str) -> None:
    app = _app(tmp_path, base_image, "RUN echo asked\n")
    record = build_image.delay(str(app), builder="kaniko",
                               config=kc.config(_repo("access"), "s3")).get(timeout=180)
    assert record["status"] == "built", record
    # The kaniko worker's watchdog lists its Jobs once per lease to sweep abandoned ones.
    services.wait_for(lambda: ("list", "batch", "jobs") in kc.standin.accesses(), 60,
                      "the kaniko pool's Job sweep")
    asked = kc.standin.accesses()
    granted = role_rules(REPO / "deploy" / "kubernetes" / "role.yaml")
    assert asked <= ACCESS_TABLE <= granted, (asked - ACCESS_TABLE, ACCESS_TABLE - granted)
    # The Role grants nothing the pool never asks for.
    assert granted == ACCESS_TABLE
    # One build uses every entry but "get jobs", which only adopting a Job needs (see
    # test_killed_pool_process_build_is_taken_over_and_adopts_the_job).
    assert ACCESS_TABLE - asked == {("get", "batch", "jobs")}, ACCESS_TABLE - asked
