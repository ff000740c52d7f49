"""Multi-platform requests through Redis, real workers, the Docker Engine, a registry and QEMU.

The docker-pool workers of the shared cluster run on this host's engine, which builds
linux/arm64 and linux/arm/v7 through the QEMU binfmt handlers scripts/bootstrap --tests
registers; the bases come from Debian's static busybox of each architecture, pushed to
the test registry under one index (tests/services.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from config.errors import InputError
from tasks import build_image, cancel, outcome
from tasks.keys import events_key
from tests import services
from tests.tasks.conftest import REPO, Cluster, make_cluster, use_cluster

#: What an index or manifest list may be served as.
INDEX_ACCEPT = ("application/vnd.oci.image.index.v1+json, "
                "application/vnd.docker.distribution.manifest.list.v2+json")


@pytest.fixture(scope="module")
def multi_base(shared_cluster: Cluster) -> str:
    """A busybox base for amd64, arm64 and arm/v7 under one index in the cluster's registry."""
    return services.push_multiplatform_base(shared_cluster.registry.host)


def _app(tmp_path: Path, base: str, step: str = "RUN uname -m > /arch") -> Path:
    root = tmp_path / f"multi-{uuid.uuid4().hex[:8]}"
    root.mkdir()
    (root / "Dockerfile").write_text(f"FROM {base}\nCOPY msg.txt /msg.txt\n{step}\n")
    (root / "msg.txt").write_text(f"multi {uuid.uuid4()}\n")
    return root


def _index(cluster: Cluster, repository: str, reference: str) -> tuple[str, dict[str, Any]]:
    """The media type and body of the index the registry serves for ``reference``."""
    response = requests.get(f"{cluster.registry.url}/v2/{repository}/manifests/{reference}",
                            headers={"Accept": INDEX_ACCEPT}, timeout=10)
    assert response.status_code == 200, response.text
    return response.headers["Content-Type"], response.json()


def _platforms_of(index: dict[str, Any]) -> dict[str, str]:
    """platform (os/arch[/variant]) → manifest digest, as the index names them."""
    found = {}
    for entry in index["manifests"]:
        platform = entry["platform"]
        name = "/".join(filter(None, (platform["os"], platform["architecture"],
                                      platform.get("variant"))))
        found[name] = entry["digest"]
    return found


def _run(image: str, platform: str, *command: str) -> str:
    """Run ``command`` in ``image`` (an index by digest) for ``platform``, then drop the
    local copy: Engine 20.10 keeps one platform per digest reference."""
    done = subprocess.run(["docker", "run", "--rm", "--network", "none", "--platform", platform,
                           image, *command], capture_output=True, text=True, timeout=120)
    subprocess.run(["docker", "rmi", image], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _by_platform(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["platform"]: entry for entry in record["platforms"]}


def test_two_platforms_give_one_index_whose_images_run_their_arch_and_a_repeat_skips(
        cluster: Cluster, tmp_path: Path, multi_base: str) -> None:
    app = _app(tmp_path, multi_base)
    dest = f"{cluster.registry.host}/multi/app"
    platforms = ["linux/amd64", "linux/arm64"]

    first = build_image.delay(str(app), destination=dest, platform=platforms,
                              base_policy="digest").get(timeout=600)
    assert first["status"] == "built", first
    media_type, index = _index(cluster, "multi/app", first["digest"])
    assert first["index"]["media_type"] == media_type
    assert first["index"]["format"] == ("oci" if "oci" in media_type else "docker")
    assert cluster.registry.digest("multi/app", first["tag"]) == first["digest"]
    entries = _by_platform(first)
    assert _platforms_of(index) == {p: entries[p]["digest"] for p in platforms}
    for platform in platforms:
        entry = entries[platform]
        assert entry["status"] == "built" and entry["attached"] is False
        # Each platform stays pushed under its own tag, which is its own hash's.
        assert cluster.registry.digest("multi/app", entry["tag"]) == entry["digest"]
    assert len({entries[p]["source_hash"] for p in platforms}) == 2
    image = f"{dest}@{first['digest']}"
    assert _run(image, "linux/arm64", "cat", "/arch") == "aarch64"
    assert _run(image, "linux/amd64", "cat", "/arch") == "x86_64"

    # The same request in another order: the same platforms, nothing built, the same index.
    again = build_image.delay(str(app), destination=dest,
                              platform="linux/arm64,linux/amd64",
                              base_policy="digest").get(timeout=300)
    assert again["status"] == "skipped", again
    assert (again["tag"], again["digest"]) == (first["tag"], first["digest"])
    assert {e["status"] for e in again["platforms"]} == {"skipped"}
    assert again["builds"] == 0

    # A third platform: only it is built, and a new index names all three.
    third = build_image.delay(str(app), destination=dest,
                              platform=[*platforms, "linux/arm/v7"],
                              base_policy="digest").get(timeout=600)
    assert third["status"] == "built", third
    assert third["tag"] != first["tag"] and third["digest"] != first["digest"]
    entries = _by_platform(third)
    assert {p: e["status"] for p, e in entries.items()} == {
        "linux/amd64": "skipped", "linux/arm64": "skipped", "linux/arm/v7": "built"}
    assert third["builds"] == 1
    _, index = _index(cluster, "multi/app", third["digest"])
    assert _platforms_of(index) == {p: e["digest"] for p, e in entries.items()}
    assert _run(f"{dest}@{third['digest']}", "linux/arm/v7", "cat", "/arch") == "armv7l"
    # The first index is still there under its own tag.
    assert cluster.registry.digest("multi/app", first["tag"]) == first["digest"]


def test_overlapping_requests_build_their_shared_platform_once(
        cluster: Cluster, tmp_path: Path, multi_base: str) -> None:
    app = _app(tmp_path, multi_base)
    dest = f"{cluster.registry.host}/multi/overlap"
    with ThreadPoolExecutor(2) as pool:
        both = pool.submit(lambda: build_image.delay(
            str(app), destination=dest, platform=["linux/amd64", "linux/arm64"],
            base_policy="digest").get(timeout=600))
        arm_only = pool.submit(lambda: build_image.delay(
            str(app), destination=dest, platform="linux/arm64",
            base_policy="digest").get(timeout=600))
        multi, single = both.result(), arm_only.result()
    assert multi["status"] == "built", multi
    assert single["status"] in ("built", "skipped"), single
    arm = _by_platform(multi)["linux/arm64"]
    assert arm["source_hash"] == single["source_hash"]
    assert arm["digest"] == single["digest"]
    # One of the two built it; the other was attached to that build or found its image.
    built = [r for r in (arm, single) if r["status"] == "built" and not r["attached"]]
    assert len(built) == 1, (arm, single)
    assert built[0]["builds"] == 1


def test_a_platform_failing_fails_the_request_naming_it_and_pushes_no_index(
        cluster: Cluster, tmp_path: Path, multi_base: str) -> None:
    app = _app(tmp_path, multi_base, step='RUN test "$(uname -m)" != aarch64')
    dest = f"{cluster.registry.host}/multi/failing"

    record = outcome(build_image.delay(str(app), destination=dest,
                                       platform=["linux/amd64", "linux/arm64"],
                                       base_policy="digest"), timeout=600)
    assert record["status"] == "failed", record
    assert record["error"].startswith("linux/arm64 failed: "), record["error"]
    assert "linux/amd64" not in record["error"]
    assert record["index"] is None and record["digest"] is None
    entries = _by_platform(record)
    assert entries["linux/arm64"]["status"] == "failed"
    amd64 = entries["linux/amd64"]
    assert amd64["status"] == "built"
    # Only the amd64 image is in the registry, under its own tag: no index.
    assert services.RegistryServer.tags(cluster.registry, "multi/failing") == [amd64["tag"]]
    assert cluster.registry.digest("multi/failing", amd64["tag"]) == amd64["digest"]


def test_a_platform_no_docker_host_can_build_is_refused_naming_it(
        cluster: Cluster, tmp_path: Path, multi_base: str) -> None:
    app = _app(tmp_path, multi_base)
    dest = f"{cluster.registry.host}/multi/unbuildable"
    record = outcome(build_image.delay(str(app), destination=dest,
                                       platform=["linux/amd64", "windows/amd64"]), timeout=120)
    assert record["status"] == "failed", record
    assert "no docker-pool host can build windows/amd64" in record["error"]
    assert "qemu-user-static" in record["error"]
    # Refused before any platform was sent: nothing built, nothing pushed.
    assert record["platforms"] == []
    assert services.RegistryServer.tags(cluster.registry, "multi/unbuildable") == []


def test_the_cli_ships_a_directory_once_for_every_platform_and_status_shows_the_index(
        cluster: Cluster, tmp_path: Path, multi_base: str) -> None:
    app = _app(tmp_path, multi_base)
    dest = f"{cluster.registry.host}/multi/cli"
    done = subprocess.run(
        [sys.executable, "-m", "tasks.cli", "build", str(app), "--destination", dest,
         "--platform", "linux/amd64,linux/arm64", "--base-policy", "digest", "--json"],
        cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["status"] == "built" and record["source"]["kind"] == "archive"
    assert f"built: {dest}:{record['tag']}@{record['digest']}" in done.stderr
    assert {e["status"] for e in record["platforms"]} == {"built"}
    # Every platform fetched the one shipped archive; the request removed it at its end.
    assert not list((cluster.root / "contexts").rglob("buildq-upload-*"))
    # The tags `buildq hash` prints are the platforms' and the index's.
    hashed = subprocess.run(
        [sys.executable, "-m", "tasks.cli", "hash", str(app), "--platform",
         "linux/amd64,linux/arm64", "--base-policy", "digest"],
        cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=120)
    assert hashed.returncode == 0, hashed.stderr
    entries = _by_platform(record)
    assert hashed.stdout.splitlines() == [
        f"linux/amd64 {entries['linux/amd64']['tag']}",
        f"linux/arm64 {entries['linux/arm64']['tag']}", f"index {record['tag']}"]
    shown = subprocess.run([sys.executable, "-m", "tasks.cli", "status", record["id"]],
                           cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["digest"] == record["digest"]


def _started_platforms(client: Any, request_id: str) -> dict[str, str]:
    """platform → its request's id, from the multi-platform request's events."""
    found = {}
    for _, fields in client.xrange(events_key(request_id)):
        stage = fields.get("stage", "")
        if fields.get("state") == "started" and stage.startswith("build "):
            found[stage.removeprefix("build ")] = fields["platform_request"]
    return found


def _building(client: Any, request_id: str) -> bool:
    return any(f.get("stage") == "build" and f.get("state") == "started"
               for _, f in client.xrange(events_key(request_id)))


def test_cancelling_the_request_cancels_its_running_platforms(
        cluster: Cluster, tmp_path: Path, multi_base: str) -> None:
    app = _app(tmp_path, multi_base, step="RUN sleep 120")
    dest = f"{cluster.registry.host}/multi/cancelled"
    result = build_image.delay(str(app), destination=dest,
                               platform=["linux/amd64", "linux/arm64"])
    client = cluster.client()
    services.wait_for(lambda: len(_started_platforms(client, result.id)) == 2, 60,
                      "the platforms' requests")
    children = _started_platforms(client, result.id)
    services.wait_for(lambda: all(_building(client, c) for c in children.values()), 120,
                      "both platforms building")
    cancel(result.id)
    record = outcome(result, timeout=60)
    assert record["status"] == "cancelled", record
    for platform, child in children.items():
        answer = outcome(build_image.AsyncResult(child), timeout=120)
        assert answer["status"] == "cancelled", (platform, answer)
        assert result.id in answer["error"]
    assert services.RegistryServer.tags(cluster.registry, "multi/cancelled") == []


@pytest.mark.parametrize(("platform", "why"), [
    (["linux/amd64", "linux/amd46"], "holds 'linux/amd46', which names an unknown architecture"),
    ("linux/arm64,linux/arm64/v8", "names linux/arm64/v8 twice"),
    ([], "is an empty list"),
])
def test_delay_refuses_bad_platforms_before_anything_is_queued(
        cluster: Cluster, tmp_path: Path, platform: object, why: str) -> None:
    app = _app(tmp_path, services.BASE_IMAGE)
    queued = cluster.client().llen("control")
    with pytest.raises(InputError) as info:
        build_image.delay(str(app), destination=f"{cluster.registry.host}/multi/bad",
                          platform=platform)  # type: ignore[arg-type]
    assert why in info.value.message
    assert "os/arch[/variant] (linux/amd64, linux/arm64, linux/arm/v7)" in str(info.value.hint)
    assert cluster.client().llen("control") == queued


@pytest.fixture
def amd64_only(tmp_path_factory: pytest.TempPathFactory, shared_cluster: Cluster,
               multi_base: str) -> Iterator[Cluster]:
    """A cluster of its own whose one docker worker builds linux/amd64 only (BUILDQ_PLATFORMS),
    though its engine could build more."""
    own = make_cluster(tmp_path_factory.mktemp("amd64-only"), shared_cluster.registry, lease=6)
    own.start_worker("control", concurrency=2)
    own.start_worker("docker", env={"BUILDQ_PLATFORMS": "linux/amd64"})
    use_cluster(own)
    yield own
    own.stop_all()
    own.redis.stop()


def test_each_platform_builds_only_on_a_docker_host_that_advertises_it(
        amd64_only: Cluster, tmp_path: Path, multi_base: str) -> None:
    dest = f"{amd64_only.registry.host}/multi/routed"
    refused = outcome(build_image.delay(str(_app(tmp_path, multi_base)), destination=dest,
                                        platform=["linux/amd64", "linux/arm64"]), timeout=120)
    assert refused["status"] == "failed", refused
    assert refused["error"].startswith(
        "no docker-pool host can build linux/arm64: the live ones build linux/amd64.")

    amd64_only.start_worker("docker")  # this one builds what its engine can
    app = _app(tmp_path, multi_base)
    record = build_image.delay(str(app), destination=dest,
                               platform=["linux/amd64", "linux/arm64"]).get(timeout=600)
    assert record["status"] == "built", record
    arm64 = _by_platform(record)["linux/arm64"]["request_id"]
    # The amd64-only worker never took the arm64 build; the other did.
    logs = {path.name.split("-")[2]: path.read_text(errors="replace")
            for path in amd64_only.root.glob("worker-docker-*.log")}
    assert arm64 not in logs["1"]
    assert arm64 in logs["2"]
