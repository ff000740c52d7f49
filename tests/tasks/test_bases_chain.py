"""Base images in the hash, through Redis, real workers, the Docker Engine and a registry.

The fleet's other tests build on a local image no registry serves, so they run with
BUILDQ_BASE_POLICY=tag (tests/conftest.py); these push their bases to the registry and
ask for the default policy, digest, per request.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tasks import build_image, outcome
from tasks.keys import events_key, log_key
from tests import services
from tests.tasks.conftest import REPO, Cluster, make_cluster, use_cluster


def _push_base(cluster: Cluster, base_image: str, repository: str, marker: str) -> str:
    """Push ``base_image`` plus a /base-marker file to the cluster's registry; its digest."""
    tag = f"{cluster.registry.host}/{repository}"
    build = subprocess.run(
        ["docker", "build", "--network", "none", "-t", tag, "-"],
        input=f"FROM {base_image}\nRUN echo {marker} > /base-marker\n".encode(),
        capture_output=True, timeout=120)
    assert build.returncode == 0, build.stderr.decode()
    push = subprocess.run(["docker", "push", tag], capture_output=True, timeout=120)
    assert push.returncode == 0, push.stderr.decode()
    name, _, ref = repository.partition(":")
    digest = cluster.registry.digest(name, ref)
    assert digest
    return digest


def _app(tmp_path: Path, dockerfile: str) -> Path:
    root = tmp_path / f"bases-{uuid.uuid4().hex[:8]}"
    root.mkdir()
    (root / "Dockerfile").write_text(dockerfile)
    (root / "msg.txt").write_text(f"bases {uuid.uuid4()}\n")
    return root


@pytest.fixture
def restore_cluster(cluster: Cluster) -> Iterator[None]:
    yield
    use_cluster(cluster)


def _run(image: str, *command: str) -> str:
    done = subprocess.run(["docker", "run", "--rm", "--network", "none", image, *command],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_moved_base_tag_rebuilds_with_the_new_base_and_the_record_names_it(
        cluster: Cluster, tmp_path: Path, base_image: str) -> None:
    base = f"bases/moving:{uuid.uuid4().hex[:6]}"
    first_base = _push_base(cluster, base_image, base, "first")
    app = _app(tmp_path, f"FROM {cluster.registry.host}/{base}\nCOPY msg.txt /msg.txt\n")
    dest = f"{cluster.registry.host}/bases/app"

    first = build_image.delay(str(app), destination=dest, base_policy="digest").get(timeout=120)
    assert first["status"] == "built", first
    assert first["bases"] == [{"image": f"{cluster.registry.host}/{base}", "digest": first_base}]
    again = build_image.delay(str(app), destination=dest, base_policy="digest").get(timeout=60)
    assert again["status"] == "skipped" and again["tag"] == first["tag"]

    moved_base = _push_base(cluster, base_image, base, "second")
    assert moved_base != first_base
    time.sleep(1.5)  # past the workers' BUILDQ_BASE_TTL (tests/tasks/conftest.py)
    third = build_image.delay(str(app), destination=dest, base_policy="digest").get(timeout=120)
    assert third["status"] == "built", third
    assert third["tag"] != first["tag"]
    assert third["bases"][0]["digest"] == moved_base
    assert _run(third["image"], "cat", "/base-marker").strip() == "second"
    # The tag policy hashes the text only: the moved base is invisible to it.
    text_only = build_image.delay(str(app), destination=dest, base_policy="tag").get(timeout=120)
    assert text_only["bases"] == [] and text_only["base_policy"] == "tag"


def test_the_build_uses_the_hashed_base_even_when_its_tag_moves_before_the_build(
        tmp_path: Path, registry: services.RegistryServer, base_image: str,
        restore_cluster: None) -> None:
    """The control worker hashes and uploads; no docker worker runs until the tag has moved."""
    (tmp_path / "lone").mkdir()
    lone = make_cluster(tmp_path / "lone", registry, lease=120)
    try:
        lone.start_worker("control", concurrency=1)
        use_cluster(lone)
        base = f"bases/racing:{uuid.uuid4().hex[:6]}"
        hashed_base = _push_base(lone, base_image, base, "hashed")
        app = _app(tmp_path, f"FROM {registry.host}/{base}\nCOPY msg.txt /msg.txt\n")
        result = build_image.delay(str(app), destination=f"{registry.host}/bases/race",
                                   base_policy="digest")
        client = lone.client()

        def uploaded() -> bool:
            return any(f.get("stage") == "upload" and f.get("state") == "done"
                       for _, f in client.xrange(events_key(result.id)))

        services.wait_for(uploaded, 60, "the upload stage")
        _push_base(lone, base_image, base, "moved")
        lone.start_worker("docker", concurrency=1)
        record = result.get(timeout=120)
        assert record["status"] == "built", record
        assert record["bases"][0]["digest"] == hashed_base
        assert _run(record["image"], "cat", "/base-marker").strip() == "hashed"
    finally:
        lone.stop_all()
        lone.redis.stop()


def test_ten_concurrent_forced_requests_rebuild_an_existing_tag_once(
        cluster: Cluster, tmp_path: Path, base_image: str) -> None:
    marker = f"forced-{uuid.uuid4().hex[:8]}"
    app = _app(tmp_path, f"FROM {base_image}\nCOPY msg.txt /msg.txt\nRUN echo {marker}\n")
    dest = f"{cluster.registry.host}/bases/forced"
    first = build_image.delay(str(app), destination=dest).get(timeout=120)
    assert first["status"] == "built" and not first["forced"]

    results = [build_image.delay(str(app), destination=dest, force=True) for _ in range(10)]
    with ThreadPoolExecutor(10) as pool:
        records = list(pool.map(lambda r: r.get(timeout=180), results))
    assert {r["status"] for r in records} == {"built"}
    assert {r["tag"] for r in records} == {first["tag"]}
    assert all(r["forced"] for r in records)
    lines = [f["line"] for _, f in cluster.client().xrange(log_key(first["source_hash"]))]
    # The RUN step printed its marker (BuildKit prefixes "#<step> <seconds> ") once for the
    # first build and once for the forced one: a forced build reuses no cached step.
    printed = re.compile(rf"(#\d+ \d+\.\d+ )?{marker}")
    assert sum(bool(printed.fullmatch(line.strip())) for line in lines) == 2, lines


def test_copy_from_an_image_and_an_arg_parameterised_from_are_resolved_and_pinned(
        cluster: Cluster, tmp_path: Path, base_image: str) -> None:
    tools = f"bases/tools:{uuid.uuid4().hex[:6]}"
    tools_digest = _push_base(cluster, base_image, tools, "tools")
    runtime = f"bases/runtime:{uuid.uuid4().hex[:6]}"
    runtime_digest = _push_base(cluster, base_image, runtime, "runtime")
    reg = cluster.registry.host
    app = _app(tmp_path, (
        f"ARG RUNTIME={reg}/{runtime}\nFROM scratch AS empty\nFROM ${{RUNTIME}} AS final\n"
        f"COPY --from={reg}/{tools} /base-marker /tools-marker\nCOPY --from=empty / /\n"))
    record = build_image.delay(str(app), destination=f"{reg}/bases/multi",
                               base_policy="digest").get(timeout=120)
    assert record["status"] == "built", record
    assert record["bases"] == [{"image": f"{reg}/{runtime}", "digest": runtime_digest},
                               {"image": f"{reg}/{tools}", "digest": tools_digest}]
    assert _run(record["image"], "cat", "/tools-marker").strip() == "tools"


def test_a_base_that_cannot_be_resolved_fails_the_record_naming_it(
        cluster: Cluster, tmp_path: Path) -> None:
    missing = _app(tmp_path, f"FROM {cluster.registry.host}/bases/none:1\n")
    record = outcome(build_image.delay(str(missing), destination=f"{cluster.registry.host}/bases/x",
                                       base_policy="digest"),
                     timeout=120)
    assert record["status"] == "failed" and record["error_kind"] == "build", record
    assert "bases/none:1 does not exist" in record["error"]

    down = services.free_port()
    unreachable = _app(tmp_path, f"FROM 127.0.0.1:{down}/bases/gone:1\n")
    started = time.monotonic()
    record = outcome(build_image.delay(str(unreachable), destination=f"{cluster.registry.host}/bases/y",
                                       base_policy="digest"),
                     timeout=180)
    assert record["status"] == "failed" and record["error_kind"] == "registry", record
    assert f"127.0.0.1:{down}" in record["error"]
    assert time.monotonic() - started < 60  # the retry budget of the cluster (0.5 s base, 3)


def test_a_malformed_base_is_refused_before_anything_is_queued(
        cluster: Cluster, tmp_path: Path) -> None:
    app = _app(tmp_path, "FROM Not//A/Reference\n")
    queued_before = cluster.client().llen("control")
    done = subprocess.run(
        [sys.executable, "-m", "tasks.cli", "build", str(app), "--destination",
         f"{cluster.registry.host}/bases/bad", "--json"],
        env=cluster.env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "base image 'Not//A/Reference' is not a valid reference" in done.stderr
    assert "Traceback" not in done.stderr
    assert cluster.client().llen("control") == queued_before


def test_buildq_hash_shows_the_resolved_bases(cluster: Cluster, tmp_path: Path,
                                              base_image: str) -> None:
    base = f"bases/shown:{uuid.uuid4().hex[:6]}"
    digest = _push_base(cluster, base_image, base, "shown")
    app = _app(tmp_path, f"FROM {cluster.registry.host}/{base}\n")
    done = subprocess.run([sys.executable, "-m", "tasks.cli", "hash", str(app),
                           "--base-policy", "digest"],
                          env=cluster.env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"base: {cluster.registry.host}/{base} -> {digest}" in done.stderr
    record = build_image.delay(str(app), destination=f"{cluster.registry.host}/bases/shown",
                               base_policy="digest").get(timeout=120)
    assert done.stdout.strip() == record["tag"]
    assert record["bases"][0]["digest"] == digest


def _buildq(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tasks.cli", *args], env=cluster.env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_stale_lists_exactly_the_images_whose_base_moved_and_rebuilds_them(
        cluster: Cluster, tmp_path: Path, base_image: str) -> None:
    reg = cluster.registry.host
    moving = f"bases/stale-moving:{uuid.uuid4().hex[:6]}"
    steady = f"bases/stale-steady:{uuid.uuid4().hex[:6]}"
    _push_base(cluster, base_image, moving, "before")
    _push_base(cluster, base_image, steady, "steady")
    repository = f"{reg}/bases/stale-{uuid.uuid4().hex[:6]}"
    on_moving = build_image.delay(str(_app(tmp_path, f"FROM {reg}/{moving}\n")),
                                  destination=repository, base_policy="digest").get(timeout=120)
    on_steady = build_image.delay(str(_app(tmp_path, f"FROM {reg}/{steady}\n")),
                                  destination=repository, base_policy="digest").get(timeout=120)
    assert on_moving["status"] == on_steady["status"] == "built"

    listed = _buildq(cluster, "stale", "--repository", repository, "--json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == []

    moved = _push_base(cluster, base_image, moving, "after")
    listed = _buildq(cluster, "stale", "--repository", repository, "--json")
    assert listed.returncode == 0, listed.stderr
    entries = json.loads(listed.stdout)
    assert [e["image"] for e in entries] == [on_moving["image"]]
    assert entries[0]["moved"] == [{"image": f"{reg}/{moving}",
                                    "built_with": on_moving["bases"][0]["digest"], "now": moved}]

    time.sleep(1.5)  # past the workers' BUILDQ_BASE_TTL
    rebuilt = _buildq(cluster, "stale", "--repository", repository, "--rebuild", "--json")
    assert rebuilt.returncode == 0, rebuilt.stderr
    (entry,) = json.loads(rebuilt.stdout)
    record = build_image.AsyncResult(entry["rebuild"]).get(timeout=120)
    assert record["status"] == "built", record
    assert record["bases"][0]["digest"] == moved
    assert _run(record["image"], "cat", "/base-marker").strip() == "after"
    assert _buildq(cluster, "stale", "--repository", repository, "--json").stdout.strip() == "[]"


def test_a_multi_platform_base_resolves_to_its_index_digest(
        cluster: Cluster, tmp_path: Path, base_image: str) -> None:
    """A base tag naming a manifest list pins the list (the builder takes its platform)."""
    reg = cluster.registry.host
    name = f"bases/multi-{uuid.uuid4().hex[:6]}"
    context = tmp_path / "platform-base"
    context.mkdir()
    (context / "marker").write_text("multi\n")
    for arch in ("amd64", "arm64"):
        (context / "Dockerfile").write_text(
            f"FROM {base_image} AS files\nFROM scratch\nCOPY --from=files / /\nCOPY marker /marker\n"
            if arch == "amd64" else "FROM scratch\nCOPY marker /marker\n")
        built = subprocess.run(
            ["/usr/bin/docker", "build", "--network", "none", "--platform", f"linux/{arch}",
             "-t", f"{reg}/{name}:{arch}", str(context)],
            env={**os.environ, "DOCKER_BUILDKIT": "1"}, capture_output=True, text=True, timeout=120)
        assert built.returncode == 0, built.stderr
        pushed = subprocess.run(["docker", "push", f"{reg}/{name}:{arch}"], capture_output=True,
                                text=True, timeout=120)
        assert pushed.returncode == 0, pushed.stderr
    for command in (["manifest", "create", "--insecure", f"{reg}/{name}:multi",
                     f"{reg}/{name}:amd64", f"{reg}/{name}:arm64"],
                    ["manifest", "push", "--insecure", f"{reg}/{name}:multi"]):
        done = subprocess.run(["/usr/bin/docker", *command], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
    index = cluster.registry.digest(name, "multi")
    assert index

    record = build_image.delay(str(_app(tmp_path, f"FROM {reg}/{name}:multi\nCOPY msg.txt /m\n")),
                               destination=f"{reg}/bases/on-multi", platform="linux/amd64",
                               base_policy="digest").get(timeout=120)
    assert record["status"] == "built", record
    assert record["bases"] == [{"image": f"{reg}/{name}:multi", "digest": index}]
    assert _run(record["image"], "cat", "/marker").strip() == "multi"
