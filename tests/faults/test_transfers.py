"""Transfers cut in the middle, by tests/faults/proxy.py in front of the real service: a
multi-MB context upload to S3 (moto, multipart), Cloud Storage (gcp-storage-emulator,
resumable) and Azure Blob (Azurite, blocks), and a layer push to a docker-registry by the
Docker Engine. Each cut is retried, or the build fails with a record that says what
happened; afterwards each service's own API shows nothing half-written: no unfinished
multipart upload, no uncommitted block, no partial object, no partial image.

Two things the stand-ins cannot show, so these tests do not claim them: the emulator
answers 501 to Cloud Storage's session cancellation (DELETE on the session URI) and has
no call that lists sessions, so for GCS only objects are checked; and a docker-registry
keeps the upload session of a layer whose connection was cut (the engine cannot cancel
what it lost the connection to) until its own upload purging removes it (a week by
default) — it is never visible as a blob, which is what is checked.
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
import tarfile
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from config.errors import TransientContextStoreError
from config.settings import Settings
from tests import services
from tests.conftest import AWS_ENV
from tests.faults.conftest import events
from tests.faults.proxy import FaultProxy
from tests.tasks.conftest import Cluster, make_cluster
from tests.tasks.test_embedded import REPO, embedded_env
from workers.stores import ContextStore, store_for_url
from workers.stores import s3 as s3_store

pytestmark = pytest.mark.faults

MiB = 1 << 20
AZURE_HOST = f"{services.AZURITE_ACCOUNT}.blob.core.windows.net"


@pytest.fixture(autouse=True)
def cloud_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # What the cloud libraries read themselves: dummy AWS keys (moto checks no signature)
    # and no stray emulator, profile or CA bundle from the developer's shell.
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "STORAGE_EMULATOR_HOST", "REQUESTS_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)


# --- a store behind a proxy, and what its service still holds ---------------------------------


@dataclass
class Target:
    """One context store, reached through ``proxy``; ``leftovers`` asks the service directly."""

    name: str
    proxy: FaultProxy
    url: str
    #: What the CLI needs in its environment to reach the store through the proxy.
    env: dict[str, str]
    settings: Settings
    #: Objects, unfinished multipart uploads and uncommitted blobs, listed by the service.
    leftovers: Callable[[], list[str]]
    #: How many bytes the writer sends before some parts are surely stored.
    staged_after: int

    def store(self) -> ContextStore:
        return store_for_url(self.url, self.settings)


def _s3(server: services.StandIn, proxy: FaultProxy) -> Target:
    import boto3

    bucket = f"cut-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=server.endpoint)
    client.create_bucket(Bucket=bucket)

    def leftovers() -> list[str]:
        objects = client.list_objects_v2(Bucket=bucket).get("Contents") or []
        uploads = client.list_multipart_uploads(Bucket=bucket).get("Uploads") or []
        return sorted([o["Key"] for o in objects] + [f"multipart:{u['Key']}" for u in uploads])

    return Target("s3", proxy, f"s3://{bucket}/contexts", {"BUILDQ_S3_ENDPOINT_URL": proxy.endpoint},
                  Settings(s3_endpoint_url=proxy.endpoint), leftovers,
                  staged_after=2 * s3_store.PART_SIZE)


def _gcs(server: services.StandIn, proxy: FaultProxy) -> Target:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    bucket = f"cut-{uuid.uuid4().hex[:12]}"
    client = storage.Client(project="test", credentials=AnonymousCredentials(),
                            client_options={"api_endpoint": server.endpoint})
    client.create_bucket(bucket)

    def leftovers() -> list[str]:
        return sorted(b.name for b in client.list_blobs(bucket))

    return Target("gcs", proxy, f"gs://{bucket}/contexts", {"BUILDQ_GCS_ENDPOINT_URL": proxy.endpoint},
                  Settings(gcs_endpoint_url=proxy.endpoint), leftovers, staged_after=8 * MiB)


def _azure(server: services.StandIn, proxy: FaultProxy) -> Target:
    from azure.storage.blob import BlobServiceClient

    container = f"cut-{uuid.uuid4().hex[:12]}"
    service = BlobServiceClient(f"{server.endpoint}/{services.AZURITE_ACCOUNT}",
                                credential={"account_name": services.AZURITE_ACCOUNT,
                                            "account_key": services.AZURITE_KEY})
    client = service.create_container(container)

    def leftovers() -> list[str]:
        # A blob with staged but uncommitted blocks is listed only with uncommittedblobs.
        found = []
        for blob in client.list_blobs(include=["uncommittedblobs"]):
            uncommitted = client.get_blob_client(blob.name).get_block_list("uncommitted")[1]
            found.append(f"uncommitted:{blob.name}" if uncommitted else blob.name)
        return sorted(found)

    endpoint = f"{proxy.endpoint}/{services.AZURITE_ACCOUNT}"
    return Target("azure", proxy, f"https://{AZURE_HOST}/{container}/contexts",
                  {"BUILDQ_AZURE_BLOB_ENDPOINT": endpoint, "BUILDQ_AZURE_STORAGE_KEY": services.AZURITE_KEY},
                  Settings(azure_blob_endpoint=endpoint, azure_storage_key=services.AZURITE_KEY),
                  leftovers, staged_after=8 * MiB)


#: Each store: the session fixture of its stand-in, and how to set up a Target on it.
STORES: dict[str, tuple[str, Callable[[services.StandIn, FaultProxy], Target]]] = {
    "s3": ("moto_server", _s3), "gcs": ("gcs_emulator", _gcs), "azure": ("azurite", _azure)}


@pytest.fixture(params=list(STORES))
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    server_fixture, make = STORES[request.param]
    server: services.StandIn = request.getfixturevalue(server_fixture)
    proxy = FaultProxy("127.0.0.1", server.port)
    try:
        yield make(server, proxy)
    finally:
        proxy.close()


def incompressible(size: int) -> bytes:
    return random.Random(uuid.uuid4().int).randbytes(size)


def write(store: ContextStore, key: str, data: bytes, step: int = MiB) -> None:
    with store.writer(key) as out:
        for start in range(0, len(data), step):
            out.write(data[start:start + step])


# --- the store, directly --------------------------------------------------------------------


def test_a_cut_in_the_middle_of_an_upload_is_retried_and_the_object_arrives_whole(target: Target) -> None:
    store = target.store()
    data = incompressible(20 * MiB)
    target.proxy.cut_after(3 * MiB)

    write(store, "whole.tar.gz", data)

    assert target.proxy.cuts == 1, "the upload was not cut: the test proves nothing"
    with store.reader("whole.tar.gz") as stream:
        assert hashlib.sha256(stream.read()).digest() == hashlib.sha256(data).digest()
    # The object and nothing else: no second multipart upload, no stray blocks.
    assert target.leftovers() == ["contexts/whole.tar.gz"]
    store.delete("whole.tar.gz")
    assert target.leftovers() == []


def test_an_upload_cut_for_good_after_some_parts_fails_transient_and_leaves_nothing(
        target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    """Parts (blocks, chunks) already stored, then every large request is cut: the SDK's
    retries fail, the write fails transient (the chain retries it), and the writer removes
    what it stored — its small requests still pass, as on a link that breaks long transfers."""
    import workers.stores.azure as azure_module
    import workers.stores.gcs as gcs_module

    # Fewer retries inside the SDKs: every one of them is cut anyway.
    monkeypatch.setattr(gcs_module, "RETRY_TIMEOUT", 3.0)
    monkeypatch.setattr(azure_module, "RETRY_TOTAL", 1)
    store = target.store()
    data = incompressible(40 * MiB)
    first = 16 * MiB

    with pytest.raises(TransientContextStoreError) as caught, store.writer("cut.tar.gz") as out:
        out.write(data[:first])
        services.wait_for(lambda: target.proxy.sent_upstream >= target.staged_after, 60,
                          "the first parts reaching the store")
        target.proxy.cut_after(256 << 10, times=None)
        for start in range(first, len(data), MiB):
            out.write(data[start:start + MiB])

    assert target.proxy.cuts >= 1
    message = str(caught.value)
    assert "cannot reach" in message and target.url in message, message
    target.proxy.up()
    assert target.leftovers() == []


# --- buildq build ---------------------------------------------------------------------------


@dataclass
class Build:
    code: int
    record: dict[str, Any]
    stderr: list[str]
    #: The request's events, read from the cluster's Redis (none for an in-process build).
    events: list[dict[str, str]] = field(default_factory=list)

    def retries(self, stage: str) -> list[dict[str, str]]:
        return [e for e in self.events if e.get("kind") == "retry" and e.get("stage") == stage]


def app_with_blob(root: Path, base_image: str, size: int) -> Path:
    """A context of ``size`` random bytes: a multi-part upload and a layer of that size."""
    root.mkdir(parents=True)
    (root / "Dockerfile").write_text(f"FROM {base_image}\nCOPY blob.bin /blob.bin\n")
    (root / "blob.bin").write_bytes(incompressible(size))
    return root


def run_build(source: str | Path, destination: str, env: dict[str, str],
              on_line: Callable[[str], None] = lambda _line: None, timeout: float = 420) -> Build:
    """``buildq build --json``, its stderr handed to ``on_line`` line by line as it comes."""
    proc = subprocess.Popen([sys.executable, "-m", "tasks.cli", "build", str(source), "--destination",
                             destination, "--json"], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines: list[str] = []

    def follow() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))
            on_line(lines[-1])

    out: list[str] = []

    def collect() -> None:
        assert proc.stdout is not None
        out.append(proc.stdout.read())

    # Each pipe has one reader: communicate() would read stderr too, racing follow() for
    # its lines (and closing it under it).
    readers = [threading.Thread(target=target, daemon=True) for target in (follow, collect)]
    for reader in readers:
        reader.start()
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    for reader in readers:
        reader.join(10)
    stdout = "".join(out)
    last = stdout.strip().splitlines()[-1] if stdout.strip() else "{}"
    return Build(proc.returncode, json.loads(last), lines)


def remove_image(image: str) -> None:
    subprocess.run(["docker", "image", "rm", "-f", image], capture_output=True, check=False)


# --- the whole chain on workers: a Redis, a control and a docker worker per store -------------


@dataclass
class Chain:
    target: Target
    cluster: Cluster

    def build(self, source: str, destination: str,
              on_retry: Callable[[dict[str, str]], None] = lambda _event: None) -> Build:
        """``buildq build`` of ``source``; each retry event is handed to ``on_retry`` as it
        lands in Redis (the events are the chain's own account, not the CLI's display)."""
        client = self.cluster.client()
        # The request's events are the one stream this cluster did not have before (the
        # CLI's progress on stderr is a display: lines of it may run together).
        before = set(client.scan_iter(match="buildq:events:*"))
        request: list[str] = []
        done = threading.Event()

        def find_request() -> None:
            if not request:
                new = set(client.scan_iter(match="buildq:events:*")) - before
                if new:
                    request.append(str(new.pop()).rpartition(":")[2])

        def watch() -> None:
            seen = 0
            while not done.wait(0.1):
                find_request()
                if request:
                    retries = [e for e in events(client, request[0]) if e.get("kind") == "retry"]
                    for event in retries[seen:]:
                        on_retry(event)
                    seen = len(retries)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            build = run_build(source, destination, self.cluster.env)
        finally:
            done.set()
            watcher.join(10)
        find_request()
        assert request and build.record.get("id") == request[0], build.stderr
        build.events = events(client, request[0])
        return build


@pytest.fixture(scope="module")
def chains(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
           docker_engine: str, registry: services.RegistryServer) -> Iterator[Callable[[str], Chain]]:
    """A cluster per store, made when first asked for, with the store behind its proxy."""
    made: dict[str, Chain] = {}

    def chain(name: str) -> Chain:
        if name not in made:
            server_fixture, make = STORES[name]
            server: services.StandIn = request.getfixturevalue(server_fixture)
            target = make(server, FaultProxy("127.0.0.1", server.port))
            cluster = make_cluster(tmp_path_factory.mktemp(f"chain-{name}"), registry, lease=6)
            for unset in ("STORAGE_EMULATOR_HOST", "REQUESTS_CA_BUNDLE", "AWS_PROFILE"):
                cluster.env.pop(unset, None)
            cluster.env.update({**AWS_ENV, "AWS_DEFAULT_REGION": "us-east-1",
                                "BUILDQ_CONTEXT_STORE": target.url, "BUILDQ_RETRY_BASE": "1",
                                "BUILDQ_MAX_RETRIES": "3", **target.env})
            made[name] = Chain(target, cluster)
            cluster.start_worker("control")
            cluster.start_worker("docker")
        target = made[name].target
        target.proxy.up()
        return made[name]

    try:
        yield chain
    finally:
        for each in made.values():
            each.cluster.stop_all()
            each.cluster.redis.stop()
            each.target.proxy.close()


def archive_of(app: Path) -> str:
    """The app as a tar.gz the workers read in place (a directory would be shipped through
    the store under test by the CLI first)."""
    archive = app.parent / f"{app.name}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(app, arcname=".")
    return archive.as_uri()


@pytest.mark.parametrize("store", list(STORES))
def test_the_store_link_dies_mid_upload_and_the_retried_upload_builds_leaving_nothing(
        store: str, chains: Callable[[str], Chain], tmp_path: Path, base_image: str,
        registry: services.RegistryServer) -> None:
    """The link dies 5 MiB into the upload and stays down until the chain retries the
    upload: the first attempt could clean nothing up, so what it left (an S3 multipart
    upload, Azure blocks) must be gone once the build ends."""
    chain = chains(store)
    target = chain.target
    source = archive_of(app_with_blob(tmp_path / "app", base_image, 12 * MiB))

    def back_up(event: dict[str, str]) -> None:
        if event.get("stage") == "upload":
            target.proxy.up()

    target.proxy.die_after(5 * MiB)
    cuts = target.proxy.cuts
    build = chain.build(source, f"{registry.host}/transfers/{store}", back_up)
    record = build.record

    assert build.code == 0 and record["status"] == "built", "\n".join([str(record), *build.stderr])
    assert target.proxy.cuts - cuts == 1 and target.proxy.refused >= 1, "the link never died mid-upload"
    retries = build.retries("upload")
    assert len(retries) == 1, build.events
    assert "cannot reach" in retries[0]["error"] and target.url in retries[0]["error"]
    assert registry.digest(f"transfers/{store}", record["tag"]) == record["digest"]
    assert target.leftovers() == []
    remove_image(record["image"])


def test_every_upload_attempt_cut_fails_the_build_with_a_record_naming_the_store(
        chains: Callable[[str], Chain], tmp_path: Path, base_image: str,
        registry: services.RegistryServer) -> None:
    chain = chains("s3")
    target = chain.target
    source = archive_of(app_with_blob(tmp_path / "app", base_image, 12 * MiB))
    target.proxy.cut_after(256 << 10, times=None)
    try:
        build = chain.build(source, f"{registry.host}/transfers/failed")
    finally:
        target.proxy.up()
    record = build.record

    assert build.code == 1 and record["status"] == "failed", "\n".join([str(record), *build.stderr])
    assert record["error_kind"] == "context-store"
    assert "cannot reach" in record["error"] and f"to write {target.url}/" in record["error"]
    # Transient: retried as often as BUILDQ_MAX_RETRIES says, then recorded.
    assert len(build.retries("upload")) == 3, build.events
    assert registry.tags("transfers/failed") == []
    assert target.leftovers() == []


# --- a layer push cut -----------------------------------------------------------------------


@pytest.fixture
def registry_behind_proxy(tmp_path: Path) -> Iterator[tuple[services.RegistryServer, FaultProxy]]:
    server = services.start_registry(tmp_path / "registry")
    proxy = FaultProxy("127.0.0.1", server.port)
    try:
        yield server, proxy
    finally:
        proxy.close()
        server.stop()


def assert_whole_image(server: services.RegistryServer, repository: str, tag: str, digest: str) -> None:
    """The tag's manifest, its config and every layer are served whole (their digests match)."""
    media = "application/vnd.docker.distribution.manifest.v2+json"
    manifest = requests.get(f"{server.url}/v2/{repository}/manifests/{tag}",
                            headers={"Accept": media}, timeout=30)
    manifest.raise_for_status()
    assert "sha256:" + hashlib.sha256(manifest.content).hexdigest() == digest
    body = manifest.json()
    for blob in [body["config"], *body["layers"]]:
        got = requests.get(f"{server.url}/v2/{repository}/blobs/{blob['digest']}", timeout=60)
        got.raise_for_status()
        assert len(got.content) == blob["size"]
        assert "sha256:" + hashlib.sha256(got.content).hexdigest() == blob["digest"]


def test_a_layer_push_cut_once_is_retried_and_the_registry_holds_the_whole_image(
        registry_behind_proxy: tuple[services.RegistryServer, FaultProxy], tmp_path: Path,
        base_image: str) -> None:
    server, proxy = registry_behind_proxy
    app = app_with_blob(tmp_path / "app", base_image, 12 * MiB)
    env = embedded_env(tmp_path, BUILDQ_RETRY_BASE="1", BUILDQ_MAX_RETRIES="2")
    proxy.cut_after(4 * MiB)

    build = run_build(app, f"127.0.0.1:{proxy.port}/transfers/app", env)
    record = build.record

    assert build.code == 0 and record["status"] == "built", (record, build.stderr)
    assert proxy.cuts == 1, "the push was not cut: the test proves nothing"
    assert server.tags("transfers/app") == [record["tag"]]
    assert_whole_image(server, "transfers/app", record["tag"], record["digest"])
    remove_image(record["image"])


def test_a_layer_push_cut_on_every_attempt_fails_with_a_record_and_publishes_nothing(
        registry_behind_proxy: tuple[services.RegistryServer, FaultProxy], tmp_path: Path,
        base_image: str) -> None:
    """The engine retries a layer five times (5 s, 10 s, 15 s, 20 s apart) before it gives up."""
    server, proxy = registry_behind_proxy
    app = app_with_blob(tmp_path / "app", base_image, 12 * MiB)
    env = embedded_env(tmp_path, BUILDQ_RETRY_BASE="1", BUILDQ_MAX_RETRIES="0")
    proxy.cut_after(4 * MiB, times=None)

    build = run_build(app, f"127.0.0.1:{proxy.port}/transfers/app", env)
    record = build.record

    assert build.code == 1 and record["status"] == "failed", (record, build.stderr)
    assert record["error_kind"] == "registry"
    assert f"push of {record['image']}" in record["error"], record["error"]
    assert proxy.cuts >= 5
    proxy.up()
    # No tag, no manifest: nothing of the image is visible in the registry.
    assert server.tags("transfers/app") == []
    head = requests.head(f"{server.url}/v2/transfers/app/manifests/{record['tag']}", timeout=10)
    assert head.status_code == 404
    remove_image(record["image"])
