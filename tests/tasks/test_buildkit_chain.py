"""BuildKit through the whole chain: remote docker workers and the embedded mode.

A Dockerfile only BuildKit builds (cache, bind and secret mounts, COPY --chmod, two
independent stages) must come out built and pushed, and its image must hold what each
step made. A build on another host (a second dockerd, standing in for another build
host) must reuse the layers the first host pushed, through the destination's last tag.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tasks import app as app_module
from tests import services
from tests.tasks.conftest import Cluster, make_cluster, point_app_at, use_cluster
from tests.tasks.test_embedded import embedded_env, leftovers, run_buildq
from tests.workers.test_buildkit import FEATURES
from workers.builders.buildkit import Progress


def held_out_app(parent: Path, base: str, token: str) -> tuple[Path, str]:
    nonce = uuid.uuid4().hex[:8]
    app = parent / f"app-{nonce}"
    app.mkdir(parents=True)
    (app / "Dockerfile").write_text(FEATURES.format(
        base=base, nonce=nonce, digest=hashlib.sha256(token.encode()).hexdigest()))
    (app / "run.sh").write_text("echo hi\n")
    (app / "input.txt").write_text(f"input-{nonce}\n")
    return app, nonce


def shows(image: str, nonce: str, engine: str | None = None) -> None:
    done = subprocess.run(
        ["docker", *(["-H", engine] if engine else []), "run", "--rm", "--network", "none",
         image, "sh", "-c", "cat /tools.txt /data.txt /copied.txt /secret.txt; ls -l /run.sh"],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"tools-{nonce}\ndata-{nonce}\ninput-{nonce}\nsecret-ok\n" in done.stdout
    assert done.stdout.splitlines()[-1].startswith("-rwxr-x---"), done.stdout


def log_lines(url: str, source_hash: str) -> list[str]:
    client = redis.Redis.from_url(url, decode_responses=True)
    return [f["line"] for _, f in client.xrange(f"buildq:log:{source_hash}") if "line" in f]


@pytest.fixture
def secret_cluster(tmp_path: Path, docker_engine: str,
                   registry: services.RegistryServer) -> Iterator[tuple[Cluster, str]]:
    token = f"held-out-{uuid.uuid4().hex}"
    (tmp_path / "cluster").mkdir()
    cluster = make_cluster(tmp_path / "cluster", registry, lease=10)
    cluster.env["BUILDQ_SECRET_TOKEN"] = token
    previous = app_module._settings
    try:
        cluster.start_worker("control")
        cluster.start_worker("docker")
        use_cluster(cluster)
        yield cluster, token
    finally:
        cluster.stop_all()
        cluster.redis.stop()
        if previous is not None:
            # The next test's client must not reach (or check against) this cluster.
            point_app_at(previous)


def test_buildkit_dockerfile_builds_on_remote_workers(
        secret_cluster: tuple[Cluster, str], tmp_path: Path, base_image: str) -> None:
    from tasks import build_image

    cluster, token = secret_cluster
    app, nonce = held_out_app(tmp_path, base_image, token)
    record = build_image.delay(str(app), destination=f"{cluster.registry.host}/bk/remote",
                               builder="docker", secrets=["TOKEN"]).get(timeout=240)
    assert record["status"] == "built", record
    assert record["builder"] == "docker" and record["frontend"] == "buildkit", record
    assert record["digest"] == cluster.registry.digest("bk/remote", record["tag"])
    shows(record["image"], nonce)
    lines = log_lines(cluster.redis.url, record["source_hash"])
    assert any("with BuildKit" in line for line in lines), lines
    assert not any(token in line for line in lines)


def test_buildkit_dockerfile_builds_in_embedded_mode(
        tmp_path: Path, base_image: str, registry: services.RegistryServer) -> None:
    token = f"held-out-{uuid.uuid4().hex}"
    app, nonce = held_out_app(tmp_path / "src", base_image, token)
    env = embedded_env(tmp_path, BUILDQ_SECRET_TOKEN=token)
    run = run_buildq(["build", str(app), "--destination", f"{registry.host}/bk/embedded",
                      "--secret", "TOKEN", "--json"], env, timeout=240)
    assert run.code == 0, run
    record = run.record()
    assert record["status"] == "built" and record["frontend"] == "buildkit", record
    shows(record["image"], nonce)
    assert token not in run.output
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------- two hosts

EXPENSIVE = """FROM {base}
RUN echo {nonce} > /nonce && sleep 3 && dd if=/dev/urandom of=/generated bs=1k count=512 2>/dev/null
COPY late.txt /late.txt
"""


@pytest.fixture
def two_hosts(tmp_path: Path, docker_engine: str,
              registry: services.RegistryServer) -> Iterator[tuple[Cluster, services.SecondEngine]]:
    (tmp_path / "cluster").mkdir()
    cluster = make_cluster(tmp_path / "cluster", registry, lease=10)
    engine = services.start_second_engine(tmp_path / "host-b")
    previous = app_module._settings
    try:
        services.copy_image(docker_engine, engine.socket)
        cluster.start_worker("control")
        use_cluster(cluster)
        yield cluster, engine
    finally:
        cluster.stop_all()
        cluster.redis.stop()
        engine.stop()
        if previous is not None:
            point_app_at(previous)


def test_a_host_that_never_built_the_repository_reuses_the_layers_another_pushed(
        two_hosts: tuple[Cluster, services.SecondEngine], tmp_path: Path,
        base_image: str) -> None:
    from tasks import build_image

    cluster, host_b = two_hosts
    nonce = uuid.uuid4().hex[:8]
    app = tmp_path / "app"
    app.mkdir()
    (app / "Dockerfile").write_text(EXPENSIVE.format(base=base_image, nonce=nonce))
    (app / "late.txt").write_text("first\n")
    dest = f"{cluster.registry.host}/bk/shared-{nonce}"

    host_a = cluster.start_worker("docker")
    first = build_image.delay(str(app), destination=dest, builder="docker").get(timeout=240)
    assert first["status"] == "built" and first["frontend"] == "buildkit", first
    # Host A leaves; host B's engine has never seen this repository.
    os.killpg(host_a.pid, signal.SIGTERM)
    host_a.wait(30)
    cluster.workers.pop(host_a.pid, None)
    cluster.start_worker("docker", env=host_b.env)

    (app / "late.txt").write_text("second\n")
    second = build_image.delay(str(app), destination=dest, builder="docker").get(timeout=240)
    assert second["status"] == "built" and second["tag"] != first["tag"], second

    lines = log_lines(cluster.redis.url, second["source_hash"])
    assert any(f"importing cache manifest from {dest}:{first['tag']}" in line
               for line in lines), lines
    progress = Progress(lambda _: None)
    for line in lines:
        progress.feed(line)
    cached = progress.cached_steps()
    assert any(f"echo {nonce} > /nonce" in step for step in cached), lines
    assert not any("COPY late.txt" in step for step in cached), cached
    client = redis.Redis.from_url(cluster.redis.url, decode_responses=True)
    assert client.get(f"buildq:last-tag:{dest}") == second["tag"]
    done = subprocess.run(["docker", "-H", host_b.socket, "image", "inspect", second["image"]],
                          capture_output=True, timeout=60)
    assert done.returncode == 0, "host B did not build the second image"


def test_cache_repo_last_image_is_imported_and_a_missing_one_only_warns(
        cluster: Cluster, tmp_path: Path, base_image: str) -> None:
    from tasks import build_image

    nonce = uuid.uuid4().hex[:8]
    app = tmp_path / "app"
    app.mkdir()
    (app / "Dockerfile").write_text(f"FROM {base_image}\nRUN echo {nonce} > /nonce\n"
                                    "COPY late.txt /late.txt\n")
    registry = cluster.registry.host
    warm = f"{registry}/bk/warm-{nonce}"
    (app / "late.txt").write_text("warm\n")
    # A build whose destination is the cache repository notes its last tag there.
    seeded = build_image.delay(str(app), destination=warm).get(timeout=180)
    assert seeded["status"] == "built", seeded

    (app / "late.txt").write_text("app\n")
    record = build_image.delay(str(app), destination=f"{registry}/bk/app-{nonce}",
                               config={"builder": {"cache-repo": warm}}).get(timeout=180)
    assert record["status"] == "built", record
    lines = log_lines(cluster.redis.url, record["source_hash"])
    assert any(f"importing cache manifest from {warm}:{seeded['tag']}" in line
               for line in lines), lines
    assert not any(line.startswith("warning: the layer cache") for line in lines), lines

    empty = f"{registry}/bk/empty-{nonce}"
    (app / "late.txt").write_text("other\n")
    other = build_image.delay(str(app), destination=f"{registry}/bk/other-{nonce}",
                              config={"builder": {"cache-repo": empty}}).get(timeout=180)
    assert other["status"] == "built", other
    warnings = [line for line in log_lines(cluster.redis.url, other["source_hash"])
                if line.startswith("warning: the layer cache")]
    assert warnings and f"{empty}:latest" in warnings[0], warnings
