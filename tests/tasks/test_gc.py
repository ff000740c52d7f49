"""buildq gc against the real registry: keeps the N newest buildq tags, deletes the rest by
digest, never a tag a running request holds or an image another tag names, deletes nothing
with --dry-run, and names storage.delete.enabled where deletion is off."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import requests

from tasks import build_image
from tasks.lock import Lease, new_token
from tests import services
from tests.tasks.conftest import REPO, Cluster

MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


def buildq(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tasks.cli", *args], cwd=REPO, env=cluster.env,
                          capture_output=True, text=True, timeout=120)


def _build(cluster: Cluster, tmp_path: Path, base: str, host: str, repo: str) -> dict:
    root = tmp_path / uuid.uuid4().hex[:8]
    root.mkdir()
    (root / "Dockerfile").write_text(f"FROM {base}\nCOPY msg.txt /msg.txt\n")
    (root / "msg.txt").write_text(f"{uuid.uuid4()}\n")
    record = build_image.delay(str(root), destination=f"{host}/{repo}").get(timeout=180)
    assert record["status"] == "built", record
    return dict(record)


def _verdicts(run: subprocess.CompletedProcess[str]) -> dict[str, str]:
    assert run.returncode == 0, run.stderr
    return {t["tag"]: t["verdict"] for t in json.loads(run.stdout)}


def test_gc_keeps_the_newest_and_spares_in_use_and_shared_images(
        cluster: Cluster, tmp_path: Path, base_image: str) -> None:
    registry = cluster.registry
    repo = f"gc/app-{uuid.uuid4().hex[:6]}"
    a1, a2, a3, a4 = (_build(cluster, tmp_path, base_image, registry.host, repo) for _ in range(4))
    # Another tag names the oldest image: deleting its manifest would take that tag too.
    manifest = requests.get(f"{registry.url}/v2/{repo}/manifests/{a1['tag']}",
                            headers={"Accept": MANIFEST}, timeout=10)
    put = requests.put(f"{registry.url}/v2/{repo}/manifests/latest", data=manifest.content,
                       headers={"Content-Type": manifest.headers["Content-Type"]}, timeout=10)
    assert put.status_code == 201, put.text
    # A running request holds a2's source hash (the lock a build takes).
    client = cluster.client()
    lease = Lease(client, a2["source_hash"], new_token(), 60, "gc-test-request")
    assert lease.acquire({"request_id": "gc-test-request"})
    dest = f"{registry.host}/{repo}"
    try:
        dry = buildq(cluster, "gc", "--repository", dest, "--keep", "1", "--dry-run", "--json")
        assert _verdicts(dry) == {a4["tag"]: "keep", a3["tag"]: "delete", a2["tag"]: "in use",
                                  a1["tag"]: "shared"}
        assert sorted(registry.tags(repo)) == sorted([a1["tag"], a2["tag"], a3["tag"], a4["tag"],
                                                      "latest"])
        young = buildq(cluster, "gc", "--repository", dest, "--older-than", "1h", "--json")
        assert set(_verdicts(young).values()) == {"keep"}

        done = buildq(cluster, "gc", "--repository", dest, "--keep", "1")
        assert done.returncode == 0, done.stderr
        assert "deleted" in done.stdout and a3["tag"] in done.stdout
        assert sorted(registry.tags(repo)) == sorted([a1["tag"], a2["tag"], a4["tag"], "latest"])
        # Deleted by digest: the manifest itself is gone.
        gone = requests.head(f"{registry.url}/v2/{repo}/manifests/{a3['digest']}",
                             headers={"Accept": MANIFEST}, timeout=10)
        assert gone.status_code == 404
    finally:
        lease.release(["gc-test-request"])

    again = _verdicts(buildq(cluster, "gc", "--repository", dest, "--keep", "1", "--json"))
    assert again == {a4["tag"]: "keep", a2["tag"]: "delete", a1["tag"]: "shared"}
    assert sorted(registry.tags(repo)) == sorted([a1["tag"], a4["tag"], "latest"])
    assert registry.digest(repo, "latest") == a1["digest"]


def test_gc_names_the_setting_where_deletion_is_off(
        cluster: Cluster, tmp_path: Path, base_image: str) -> None:
    closed = services.start_registry(tmp_path / "no-delete", delete=False)
    try:
        for _ in range(2):
            _build(cluster, tmp_path, base_image, closed.host, "gc/closed")
        run = buildq(cluster, "gc", "--repository", f"{closed.host}/gc/closed", "--keep", "1")
        assert run.returncode == 1, run.stderr
        assert "storage.delete.enabled" in run.stderr and "Traceback" not in run.stderr
        assert len(closed.tags("gc/closed")) == 2
    finally:
        closed.stop()


def test_gc_refuses_bad_input_with_the_accepted_forms(cluster: Cluster) -> None:
    dest = f"{cluster.registry.host}/gc/none"
    for args, expected in ((["--keep", "-1"], "-1"), (["--older-than", "3x"], "30d"),
                           ([], "--keep N")):
        run = buildq(cluster, "gc", "--repository", dest, *args)
        assert run.returncode == 2, (args, run.stderr)
        assert expected in run.stderr and "Traceback" not in run.stderr, run.stderr
