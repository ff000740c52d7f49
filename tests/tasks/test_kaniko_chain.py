"""The chain with ``builder: kaniko``, end to end, on the real control plane (tests/kube)
with the real kaniko executor.

Real control and kaniko workers (their own Redis); etcd, kube-apiserver (RBAC) and
kube-controller-manager (the real Job controller, garbage collector and TTL controller)
with the test kubelet running pods on the Docker Engine; the kaniko executor built from
its Go module (``tests.kube.kaniko``) and pulled by the kubelet from the test registry
through ``builder.kaniko-image``; moto (S3) and gcp-storage-emulator (GCS) as the context
stores. ``deploy/kubernetes`` is applied with ``kubectl apply -k``, and the kaniko pool
holds only its ServiceAccount's token: every build here also proves the shipped Role is
enough. Azure Blob is not here: real kaniko cannot address Azurite (see
tests/kube/README.md), so that store stops at the rendered Job and buildq's own upload.

The destination is a logical registry host mapped to the real registry by
BUILDQ_REGISTRY_ENDPOINTS, so every push also proves the Job honours that mapping.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import subprocess
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from config.names import HASH_LABEL
from tasks import build_image
from tasks.failures import outcome as answer_of
from tests import services
from tests.conftest import AWS_ENV
from tests.kube import kaniko
from tests.kube.cluster import ControlPlane
from tests.kube.jobs import JobEvents, PodNodes
from tests.tasks.conftest import REPO, Cluster, make_cluster, point_app_at, use_cluster
from workers.builders.kaniko.manifest import LABEL_HASH_CHARS

#: The kaniko builds here take minutes each on two shared cores.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

#: deploy/kubernetes's namespace and ServiceAccount (kustomization.yaml, serviceaccount.yaml).
NAMESPACE = "buildq"
ACCOUNT = "buildq-kaniko"
#: The name users give the registry; BUILDQ_REGISTRY_ENDPOINTS maps it to the real one.
LOGICAL_REGISTRY = "registry.buildq.test"
STORES = ("s3", "gcs")
#: A Secret in the Jobs' namespace with the dummy AWS keys kaniko signs its S3 requests
#: with (moto checks no signature); on EKS the pod's IRSA identity gives them instead.
AWS_KEYS_SECRET = "aws-standin-keys"
#: The one login the htpasswd registry takes, and the wrong one a test hands kaniko.
PUSH_USER = ("kaniko-pusher", "push-secret-7b2c")
WRONG_LOGIN_SECRET = "wrong-registry-login"
#: The second node of the multi-platform test: a test kubelet advertising arm64 (this amd64
#: host all the same, running arm64 binaries through QEMU; see tests/kube/README.md).
ARM64_NODE = "buildq-node-arm64"
#: What an index or manifest list may be served as.
INDEX_ACCEPT = ("application/vnd.oci.image.index.v1+json, "
                "application/vnd.docker.distribution.manifest.list.v2+json")


@dataclasses.dataclass
class Store:
    """A context store the workers use, and an independent client to look inside it."""

    url: str
    exists: Callable[[str], bool]


@dataclasses.dataclass
class KanikoCluster:
    cluster: Cluster
    kube: ControlPlane
    stores: dict[str, Store]
    #: The executor image in the test registry, as builder.kaniko-image names it.
    kaniko_image: str
    #: The base image in the test registry, which kaniko pulls.
    base: str
    #: A registry that refuses anonymous pushes (for the wrong-credentials test).
    locked_registry: services.RegistryServer

    @property
    def registry(self) -> services.RegistryServer:
        return self.cluster.registry

    def config(self, repository: str, store: str, **builder: Any) -> dict[str, Any]:
        kaniko_config = builder.pop("kaniko-config", {})
        container: dict[str, Any] = {"envFrom": [{"secretRef": {"name": AWS_KEYS_SECRET}}]}
        kaniko_config.setdefault("spec", {}).setdefault("template", {}).setdefault(
            "spec", {}).setdefault("containers", [{}])[0].update(container)
        return {"builder": {"type": "kaniko", "destination": f"{LOGICAL_REGISTRY}/{repository}",
                            "build-context-store": self.stores[store].url,
                            "kaniko-image": self.kaniko_image, "kaniko-config": kaniko_config,
                            **builder}}

    def jobs_and_pods(self, source_hash: str) -> list[str]:
        """The Jobs and pods of this build still in the namespace (names)."""
        selector = f"{HASH_LABEL}={source_hash[:LABEL_HASH_CHARS]}"
        found = []
        for kind in ("jobs", "pods"):
            shown = self.kube.kubectl("get", kind, "-n", NAMESPACE, "-l", selector, "-o", "name")
            assert shown.returncode == 0, shown.stderr
            found += shown.stdout.split()
        return found


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

    return Store(f"s3://{bucket}/kaniko", exists)


def _gcs(emulator: services.StandIn) -> Store:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(project="standin", credentials=AnonymousCredentials(),
                            client_options={"api_endpoint": emulator.endpoint})
    bucket = client.create_bucket(f"ctx-{uuid.uuid4().hex[:10]}")
    return Store(f"gs://{bucket.name}/kaniko", lambda key: bool(bucket.blob(f"kaniko/{key}").exists()))


def _apply_deploy(kube: ControlPlane) -> None:
    """``kubectl apply -k deploy/kubernetes``, as an operator would (the control plane runs
    no Deployment controller, so the Deployment makes no pod: the pool runs here)."""
    # tests/kube/test_node.py deletes the namespace without waiting: in one session with it,
    # applying while the namespace is still terminating would be refused.
    services.wait_for(lambda: kube.kubectl("get", "namespace", NAMESPACE, "-o",
                                           "jsonpath={.status.phase}").stdout != "Terminating",
                      120, f"namespace {NAMESPACE}, deleted by an earlier test, to be gone")
    applied = kube.kubectl("apply", "-k", str(REPO / "deploy" / "kubernetes"), timeout=120)
    assert applied.returncode == 0, applied.stderr


def _secret(kube: ControlPlane, name: str, data: dict[str, str], kind: str = "Opaque") -> None:
    manifest = {"apiVersion": "v1", "kind": "Secret", "type": kind,
                "metadata": {"name": name, "namespace": NAMESPACE},
                "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}
    applied = kube.kubectl("apply", "-f", "-", stdin=json.dumps(manifest))
    assert applied.returncode == 0, applied.stderr


def _docker_config(host: str, user: str, password: str) -> str:
    login = base64.b64encode(f"{user}:{password}".encode()).decode()
    return json.dumps({"auths": {host: {"auth": login}}})


@pytest.fixture(scope="module")
def kaniko_cluster(tmp_path_factory: pytest.TempPathFactory, docker_engine: str,
                   registry: services.RegistryServer, kube: ControlPlane,
                   gcs_emulator: services.StandIn) -> Iterator[KanikoCluster]:
    from tasks import app as app_module

    root = tmp_path_factory.mktemp("kaniko-cluster")
    image = kaniko.push_image(registry.host, say=lambda _line: None)
    base = f"{registry.host}/kaniko-base/busybox:base"
    for args in (("tag", services.ensure_base_image(), base), ("push", base)):
        subprocess.run(["docker", *args], check=True, capture_output=True, timeout=120)
    _apply_deploy(kube)
    _secret(kube, AWS_KEYS_SECRET, {k: AWS_ENV[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")})
    locked = services.start_htpasswd_registry(root / "locked-registry", dict([PUSH_USER]))
    _secret(kube, WRONG_LOGIN_SECRET, {".dockerconfigjson": _docker_config(
        locked.host, PUSH_USER[0], "not-the-password")}, kind="kubernetes.io/dockerconfigjson")
    kubeconfig = kube.token_kubeconfig(root / "buildq-kaniko.kubeconfig", NAMESPACE, ACCOUNT)
    # The workers log in to the locked registry with the right password (to look for the
    # image before building); the Job is handed the wrong one.
    docker_config = root / "docker-config"
    docker_config.mkdir()
    (docker_config / "config.json").write_text(_docker_config(locked.host, *PUSH_USER))
    moto_server = services.start_moto(root / "moto")
    stores = {"s3": _s3(moto_server), "gcs": _gcs(gcs_emulator)}
    cluster = make_cluster(root, registry, lease=6)
    cluster.env.update(AWS_ENV)
    cluster.env.update({
        "AWS_DEFAULT_REGION": "us-east-1",
        "BUILDQ_S3_ENDPOINT_URL": moto_server.endpoint,
        "BUILDQ_GCS_ENDPOINT_URL": gcs_emulator.endpoint,
        "BUILDQ_REGISTRY_ENDPOINTS": f"{LOGICAL_REGISTRY}={registry.host}",
        "BUILDQ_ALLOWED_DESTINATIONS": f"{LOGICAL_REGISTRY}/*,{registry.host}/*,{locked.host}/*",
        # Only the ServiceAccount's token: what the pool may do, the shipped Role decides.
        "KUBECONFIG": str(kubeconfig),
        "BUILDQ_KUBE_NAMESPACE": NAMESPACE,
        "DOCKER_CONFIG": str(docker_config),
    })
    cluster.env.pop("STORAGE_EMULATOR_HOST", None)
    previous = app_module._settings
    try:
        cluster.start_worker("control", concurrency=2)
        cluster.start_worker("kaniko", concurrency=2)
        use_cluster(cluster)
        yield KanikoCluster(cluster, kube, stores, image, base, locked)
    finally:
        cluster.stop_all()
        cluster.redis.stop()
        moto_server.stop()
        locked.stop()
        if previous is not None:
            point_app_at(previous)


@pytest.fixture
def kc(kaniko_cluster: KanikoCluster) -> Iterator[KanikoCluster]:
    yield kaniko_cluster


@pytest.fixture
def creations(kaniko_cluster: KanikoCluster) -> Iterator[JobEvents]:
    watcher = JobEvents(kaniko_cluster.kube, NAMESPACE)
    yield watcher
    watcher.close()


def _app(tmp_path: Path, base: str, extra: str = "") -> Path:
    root = tmp_path / f"app-{uuid.uuid4().hex[:8]}"
    root.mkdir()
    (root / "Dockerfile").write_text(f"FROM {base}\nCOPY msg.txt /msg.txt\n{extra}")
    (root / "msg.txt").write_text(f"kaniko {uuid.uuid4()}\n")
    return root


def _repo(name: str) -> str:
    return f"kaniko/{name}-{uuid.uuid4().hex[:6]}"


def _nothing_left(kc: KanikoCluster, store: str, source_hash: str) -> None:
    # The Job is deleted with propagationPolicy Background: the real garbage collector
    # removes its pod a moment later.
    services.wait_for(lambda: kc.jobs_and_pods(source_hash) == [], 60,
                      f"no Job or pod of {source_hash[:12]} (left: {kc.jobs_and_pods(source_hash)})")
    assert not kc.stores[store].exists(f"{source_hash}.tar.gz")


def _log_lines(kc: KanikoCluster, source_hash: str) -> list[str]:
    client: redis.Redis = kc.cluster.client()
    return [fields.get("line", "") for _, fields in client.xrange(f"buildq:log:{source_hash}")]


def _runs(kc: KanikoCluster, repo: str, digest: str) -> str:
    """``cat /msg.txt`` in ``image@digest``, pulled from the registry."""
    ref = f"{kc.registry.host}/{repo}@{digest}"
    try:
        shown = subprocess.run(["docker", "run", "--rm", "--network", "none", ref, "cat", "/msg.txt"],
                               capture_output=True, text=True, timeout=300)
    finally:
        subprocess.run(["docker", "image", "rm", ref], capture_output=True, check=False)
    assert shown.returncode == 0, shown.stderr
    return shown.stdout


@pytest.mark.parametrize("store", STORES)
def test_kaniko_chain_end_to_end(kc: KanikoCluster, creations: JobEvents, store: str,
                                 tmp_path: Path) -> None:
    app = _app(tmp_path, kc.base, "RUN echo from-the-kaniko-pod\n")
    repo = _repo(store)
    config = kc.config(repo, store)
    record = build_image.delay(str(app), builder="kaniko", config=config).get(timeout=600)
    assert record["status"] == "built", record
    tag, source_hash = record["tag"], record["source_hash"]
    assert record["image"] == f"{LOGICAL_REGISTRY}/{repo}:{tag}"
    # The digest is the registry's own Docker-Content-Digest, and the image runs.
    assert record["digest"] == kc.registry.digest(repo, tag)
    assert _runs(kc, repo, record["digest"]) == (app / "msg.txt").read_text()
    assert {"upload", "kaniko", "push"} <= set(record["stages"])
    # Kaniko itself cached the RUN layer with --cache-repo.
    cached = requests.get(f"{kc.registry.url}/v2/{repo}-cache/tags/list", timeout=10)
    assert cached.status_code == 200 and cached.json().get("tags"), cached.text

    (uid,) = creations.of(source_hash)
    (job,) = [j for j in creations.added if j["metadata"]["uid"] == uid]
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert f"--context={kc.stores[store].url}/{source_hash}.tar.gz" in args
    assert f"--destination={kc.registry.host}/{repo}:{tag}" in args
    _nothing_left(kc, store, source_hash)
    assert any("from-the-kaniko-pod" in line for line in _log_lines(kc, source_hash))

    # Built once: the same request now finds the image and costs no Job.
    again = build_image.delay(str(app), builder="kaniko", config=config).get(timeout=120)
    assert again["status"] == "skipped", again
    assert again["digest"] == record["digest"]
    assert len(creations.of(source_hash)) == 1


def _failed(kc: KanikoCluster, creations: JobEvents, config: dict[str, Any],
            app: Path) -> dict[str, Any]:
    record = answer_of(build_image.delay(str(app), builder="kaniko", config=config), timeout=600)
    assert record["status"] == "failed", record
    assert len(creations.of(record["source_hash"])) == 1
    _nothing_left(kc, "s3", record["source_hash"])
    return dict(record)


def test_failing_run_step_is_recorded_and_everything_is_deleted(
        kc: KanikoCluster, creations: JobEvents, tmp_path: Path) -> None:
    app = _app(tmp_path, kc.base, "RUN echo doomed-step && false\n")
    repo = _repo("failing")
    record = _failed(kc, creations, kc.config(repo, "s3"), app)
    assert record["error_kind"] == "build"
    assert "kaniko exited with code 1" in record["error"] and "doomed-step" in record["error"]
    assert kc.registry.digest(repo, record["tag"]) is None


def _limits(memory: str) -> dict[str, Any]:
    return {"spec": {"template": {"spec": {"containers": [
        {"resources": {"limits": {"memory": memory}, "requests": {"memory": memory}}}]}}}}


def test_oom_killed_under_a_small_memory_limit(kc: KanikoCluster, creations: JobEvents,
                                               tmp_path: Path) -> None:
    # dd fills a 256 MiB buffer in the pod's container, under a 64 MiB limit.
    app = _app(tmp_path, kc.base, "RUN dd if=/dev/zero of=/dev/null bs=256M count=1\n")
    record = _failed(kc, creations, kc.config(_repo("oom"), "s3", **{"kaniko-config": _limits("64Mi")}),
                     app)
    assert "ran out of memory (OOMKilled" in record["error"] and record["error_kind"] == "build", record


def test_deadline_exceeded_by_the_job_controller(kc: KanikoCluster, creations: JobEvents,
                                                 tmp_path: Path) -> None:
    app = _app(tmp_path, kc.base, "RUN sleep 600\n")
    config = kc.config(_repo("deadline"), "s3",
                       **{"kaniko-config": {"spec": {"activeDeadlineSeconds": 20}}})
    record = _failed(kc, creations, config, app)
    assert "(DeadlineExceeded)" in record["error"] and record["error_kind"] == "build", record


def test_missing_kaniko_image_is_image_pull_back_off(kc: KanikoCluster, creations: JobEvents,
                                                     tmp_path: Path) -> None:
    app = _app(tmp_path, kc.base)
    config = kc.config(_repo("pull"), "s3",
                       **{"kaniko-image": f"{kc.registry.host}/no-such/kaniko:v0.0.0"})
    record = _failed(kc, creations, config, app)
    assert "cannot start: ImagePullBackOff" in record["error"] and record["error_kind"] == "build", record


def test_registry_refusing_the_push_credentials(kc: KanikoCluster, creations: JobEvents,
                                                tmp_path: Path) -> None:
    app = _app(tmp_path, kc.base)
    repo = _repo("refused")
    config = kc.config(repo, "s3", **{"secret-name": WRONG_LOGIN_SECRET})
    config["builder"]["destination"] = f"{kc.locked_registry.host}/{repo}"
    record = _failed(kc, creations, config, app)
    # The workers' own login is right (they found no image there); the Job's Secret is not,
    # and the registry refuses kaniko's push.
    assert record["error_kind"] == "build", record
    assert "kaniko exited with code 1" in record["error"], record
    assert "UNAUTHORIZED" in record["error"] or "401" in record["error"], record
    pushed = requests.get(f"{kc.locked_registry.url}/v2/{repo}/tags/list", auth=PUSH_USER, timeout=10)
    assert pushed.status_code == 404 or not pushed.json().get("tags"), pushed.text


def test_ten_identical_requests_create_one_job(kc: KanikoCluster, creations: JobEvents,
                                               tmp_path: Path) -> None:
    app = _app(tmp_path, kc.base, "RUN sleep 2\n")
    repo = _repo("ten")
    config = kc.config(repo, "s3")
    results = [build_image.delay(str(app), builder="kaniko", config=config) for _ in range(10)]
    with ThreadPoolExecutor(10) as threads:
        records = list(threads.map(lambda r: r.get(timeout=600), results))
    assert {r["status"] for r in records} == {"built"}, records
    assert {r["digest"] for r in records} == {kc.registry.digest(repo, records[0]["tag"])}
    assert len(creations.of(records[0]["source_hash"])) == 1
    _nothing_left(kc, "s3", records[0]["source_hash"])


def test_api_server_restarted_mid_build(kc: KanikoCluster, creations: JobEvents,
                                        tmp_path: Path) -> None:
    """The follower's watches break when kube-apiserver goes away; resuming them is refused
    with 410 Gone, it relists, and the build completes, in the one Job it created."""
    app = _app(tmp_path, kc.base, "RUN sleep 25\n")
    repo = _repo("restart")
    result = build_image.delay(str(app), builder="kaniko", config=kc.config(repo, "gcs"))

    def running() -> bool:
        shown = kc.kube.kubectl("get", "pods", "-n", NAMESPACE, "-l", "app.kubernetes.io/managed-by=buildq",
                                "-o", "jsonpath={.items[*].status.phase}")
        return "Running" in shown.stdout.split()

    services.wait_for(running, 300, "the kaniko pod to run")
    kc.kube.restart("kube-apiserver")
    record = result.get(timeout=600)
    assert record["status"] == "built", record
    assert record["digest"] == kc.registry.digest(repo, record["tag"])
    assert len(creations.of(record["source_hash"])) == 1
    _nothing_left(kc, "gcs", record["source_hash"])
    # The restarted server's watch cache starts at etcd's current revision, which its own
    # start moved past the follower's: resuming is refused (410 Gone) and it relists.
    relisted = [line for line in _log_lines(kc, record["source_hash"]) if "(410)" in line]
    assert relisted, _log_lines(kc, record["source_hash"])


@pytest.fixture(scope="module")
def multi_base(kaniko_cluster: KanikoCluster) -> str:
    """A busybox base for amd64, arm64 and arm/v7 under one index in the test registry."""
    return services.push_multiplatform_base(kaniko_cluster.registry.host)


@pytest.fixture
def arm64_node(kc: KanikoCluster) -> Iterator[str]:
    """A second node, labelled kubernetes.io/arch=arm64, for the time of one test."""
    handler = Path("/proc/sys/fs/binfmt_misc/qemu-aarch64")
    if not handler.exists() or not handler.read_text().startswith("enabled"):
        pytest.fail("no enabled QEMU binfmt handler for arm64 on this host: run "
                    "scripts/bootstrap --tests", pytrace=False)
    kc.kube.add_node(ARM64_NODE, "arm64")
    yield ARM64_NODE
    kc.kube.remove_node(ARM64_NODE)


def _node_arch(kube: ControlPlane, node: str) -> str:
    shown = kube.kubectl("get", "node", node, "-o", "jsonpath={.metadata.labels.kubernetes\\.io/arch}")
    assert shown.returncode == 0, shown.stderr
    return shown.stdout.strip()


def _image_arch(kc: KanikoCluster, repo: str, digest: str) -> str:
    """The architecture an image's config says (what kaniko recorded, not the index)."""
    manifest = requests.get(f"{kc.registry.url}/v2/{repo}/manifests/{digest}", timeout=10, headers={
        "Accept": "application/vnd.oci.image.manifest.v1+json, "
                  "application/vnd.docker.distribution.manifest.v2+json"})
    assert manifest.status_code == 200, manifest.text
    config = requests.get(f"{kc.registry.url}/v2/{repo}/blobs/{manifest.json()['config']['digest']}",
                          timeout=10)
    assert config.status_code == 200, config.text
    return str(config.json()["architecture"])


def _cat_arch(image: str, platform: str) -> str:
    """``cat /arch`` in ``image`` (an index by digest) run for ``platform``, then the local
    copy dropped: Engine 20.10 keeps one platform per digest reference."""
    try:
        done = subprocess.run(["docker", "run", "--rm", "--network", "none", "--platform", platform,
                               image, "cat", "/arch"], capture_output=True, text=True, timeout=300)
    finally:
        subprocess.run(["docker", "image", "rm", image], capture_output=True, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_two_platforms_build_one_job_each_on_a_node_of_their_arch_under_one_index(
        kc: KanikoCluster, creations: JobEvents, arm64_node: str, multi_base: str,
        tmp_path: Path) -> None:
    app = _app(tmp_path, multi_base, "RUN uname -m > /arch\n")
    repo = _repo("multi")
    platforms = ["linux/amd64", "linux/arm64"]
    placements = PodNodes(kc.kube, NAMESPACE)
    try:
        record = build_image.delay(str(app), builder="kaniko", config=kc.config(repo, "s3"),
                                   platform=platforms).get(timeout=800)
    finally:
        placements.close()
    assert record["status"] == "built", record

    # The record's digest is an index in the registry naming each platform's image.
    index = requests.get(f"{kc.registry.url}/v2/{repo}/manifests/{record['digest']}",
                         headers={"Accept": INDEX_ACCEPT}, timeout=10)
    assert index.status_code == 200, index.text
    assert index.headers["Content-Type"] == record["index"]["media_type"]
    assert kc.registry.digest(repo, record["tag"]) == record["digest"]
    entries = {entry["platform"]: entry for entry in record["platforms"]}
    named = {"/".join(filter(None, (m["platform"]["os"], m["platform"]["architecture"],
                                    m["platform"].get("variant")))): m["digest"]
             for m in index.json()["manifests"]}
    assert named == {p: entries[p]["digest"] for p in platforms}

    for platform in platforms:
        entry, arch = entries[platform], platform.split("/")[1]
        # (Its record counts no build: the lease notes docker builds only, see
        # tasks/stages.py BUILD_STAGES; the one Job below is the one build.)
        assert entry["status"] == "built" and entry["attached"] is False, entry
        assert kc.registry.digest(repo, entry["tag"]) == entry["digest"]
        assert _image_arch(kc, repo, entry["digest"]) == arch
        # One Job per platform, for its platform, on a node of its architecture.
        (uid,) = creations.of(entry["source_hash"])
        (job,) = [j for j in creations.added if j["metadata"]["uid"] == uid]
        pod_spec = job["spec"]["template"]["spec"]
        assert f"--custom-platform={platform}" in pod_spec["containers"][0]["args"]
        assert pod_spec["nodeSelector"] == {"kubernetes.io/os": "linux", "kubernetes.io/arch": arch}
        (node,) = placements.nodes[entry["source_hash"]]
        assert _node_arch(kc.kube, node) == arch
        _nothing_left(kc, "s3", entry["source_hash"])
    assert placements.nodes[entries["linux/arm64"]["source_hash"]] == [arm64_node]

    image = f"{kc.registry.host}/{repo}@{record['digest']}"
    assert _cat_arch(image, "linux/arm64") == "aarch64"
    assert _cat_arch(image, "linux/amd64") == "x86_64"

    # The same request again: every platform's image exists, so no Job, and the same index.
    again = build_image.delay(str(app), builder="kaniko", config=kc.config(repo, "s3"),
                              platform=list(reversed(platforms))).get(timeout=300)
    assert again["status"] == "skipped", again
    assert (again["tag"], again["digest"]) == (record["tag"], record["digest"])
    for platform in platforms:
        assert len(creations.of(entries[platform]["source_hash"])) == 1


def test_a_platform_kaniko_cannot_build_is_refused_before_any_job(
        kc: KanikoCluster, creations: JobEvents, tmp_path: Path) -> None:
    app = _app(tmp_path, kc.base)
    repo = _repo("windows")
    record = answer_of(build_image.delay(str(app), builder="kaniko", config=kc.config(repo, "s3"),
                                         platform=["linux/amd64", "windows/amd64"]), timeout=120)
    assert record["status"] == "failed" and record["error_kind"] == "input", record
    assert "the kaniko pool builds Linux images only" in record["error"]
    assert "windows/amd64" in record["error"]
    assert not record.get("platforms") and creations.added == []
    pushed = requests.get(f"{kc.registry.url}/v2/{repo}/tags/list", timeout=10)
    assert pushed.status_code == 404 or not pushed.json().get("tags"), pushed.text


def test_a_platform_no_node_has_fails_at_the_deadline_naming_the_node_selector(
        kc: KanikoCluster, creations: JobEvents, multi_base: str, tmp_path: Path) -> None:
    # The cluster has no arm node: the Job's pod is never scheduled, and the Job controller
    # ends it at its deadline (an autoscaler could have added a node meanwhile).
    app = _app(tmp_path, multi_base, "RUN uname -m > /arch\n")
    config = kc.config(_repo("no-arm-node"), "s3",
                       **{"kaniko-config": {"spec": {"activeDeadlineSeconds": 20}}})
    record = answer_of(build_image.delay(str(app), builder="kaniko", config=config,
                                         platform="linux/arm/v7"), timeout=600)
    assert record["status"] == "failed" and record["error_kind"] == "build", record
    assert "(DeadlineExceeded) with its pod never scheduled" in record["error"], record
    assert "(node selector kubernetes.io/arch=arm, kubernetes.io/os=linux)" in record["error"]
    assert "didn't match Pod's node affinity/selector" in record["error"]
    assert "Add a node those labels select" in record["error"], record
    assert any("the pod waits for a node" in line for line in _log_lines(kc, record["source_hash"]))
    assert len(creations.of(record["source_hash"])) == 1
    _nothing_left(kc, "s3", record["source_hash"])
