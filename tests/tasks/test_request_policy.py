"""Who may build what, and push where, with remote workers.

A worker serving the broker reads a local path or a ``file://`` repository only under
``BUILDQ_SOURCE_ROOTS`` (plus buildq's own upload area) and pushes only where the
destination policy allows. The workers here are real processes whose roots name one
directory; the requests that try to leave it are sent straight to the broker (as anybody
who can write to it could), so only the workers stand in their way, and the files they
aim at are watched through their access times. The same checks run in ``buildq build``
and ``build_image.delay()`` before anything is shipped or queued.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from config.errors import ForbiddenError, InputError
from tasks import build_image, outcome
from tests import services
from tests.tasks.conftest import REPO, Cluster, make_cluster, point_app_at, use_cluster

#: An access time far enough back that any read moves it (relatime updates an atime
#: older than a day).
OLD = time.time() - 3 * 24 * 3600


@dataclass
class Guarded:
    cluster: Cluster
    allowed: Path
    outside: Path
    docker_config: Path

    def dest(self, name: str = "") -> str:
        return f"{self.cluster.registry.host}/policy/{name or uuid.uuid4().hex[:8]}"


def _app(parent: Path, base: str) -> Path:
    root = parent / f"app-{uuid.uuid4().hex[:8]}"
    root.mkdir(parents=True)
    (root / "Dockerfile").write_text(f"FROM {base}\nCOPY msg.txt /msg.txt\n")
    (root / "msg.txt").write_text(f"policy {uuid.uuid4()}\n")
    return root


def _age(*paths: Path) -> dict[Path, float]:
    """Set each path's access time far back; return what it is now."""
    for path in paths:
        st = path.stat()
        os.utime(path, (OLD, st.st_mtime))
    return {path: path.stat().st_atime for path in paths}


def _untouched(atimes: dict[Path, float]) -> None:
    for path, atime in atimes.items():
        assert path.stat().st_atime == atime, f"{path} was read"


def _tree(root: Path) -> list[Path]:
    return [root, *root.rglob("*")]


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory, docker_engine: str,
            registry: services.RegistryServer) -> Iterator[Guarded]:
    from tasks import app as app_module

    root = tmp_path_factory.mktemp("guarded")
    (root / "cluster").mkdir()
    cluster = make_cluster(root / "cluster", registry, lease=6)
    allowed, outside = root / "allowed", root / "outside"
    allowed.mkdir()
    outside.mkdir()
    cluster.env["BUILDQ_SOURCE_ROOTS"] = str(allowed)
    # The workers' own registry login, which no request may image.
    docker_config = Path(cluster.env["HOME"]) / ".docker"
    docker_config.mkdir(parents=True)
    (docker_config / "config.json").write_text(json.dumps({"auths": {}}))
    previous = app_module._settings
    try:
        cluster.start_worker("control", concurrency=2)
        cluster.start_worker("docker")
        use_cluster(cluster)
        yield Guarded(cluster, allowed, outside, docker_config)
    finally:
        cluster.stop_all()
        cluster.redis.stop()
        if previous is not None:
            point_app_at(previous)


def _sent(cluster: Cluster) -> set[str]:
    """What the broker has seen of requests: their results and records."""
    client = cluster.client()
    return {*client.scan_iter("celery-task-meta-*"), *client.scan_iter("buildq:record:*"),
            *client.scan_iter("buildq:events:*")}


def _bare_repo(parent: Path, base: str) -> Path:
    work = _app(parent / "work", base)
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q", "-b", "main", str(work)], check=True)
    subprocess.run([*git, "-C", str(work), "add", "."], check=True)
    subprocess.run([*git, "-C", str(work), "commit", "-qm", "one"], check=True)
    bare = parent / f"repo-{uuid.uuid4().hex[:6]}.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], check=True)
    return bare


# --- on the workers: requests sent straight to the broker --------------------------------


def _refused(result: Any, setting: str) -> dict[str, Any]:
    record = outcome(result, timeout=120)
    assert record["status"] == "failed", record
    assert record["error_kind"] == "forbidden", record
    assert setting in record["error"], record
    assert record["digest"] is None and record["source_hash"] is None, record
    return record


def test_workers_refuse_local_sources_outside_the_roots_and_read_nothing(
        guarded: Guarded, base_image: str) -> None:
    app = _app(guarded.outside, base_image)
    link = guarded.allowed / f"link-{uuid.uuid4().hex[:6]}"
    link.symlink_to(app)
    repo = _bare_repo(guarded.outside, base_image)
    watched = _age(*_tree(app), *_tree(repo), *_tree(guarded.docker_config))
    sources = {
        "outside": str(app),
        "symlink": str(link),
        "dotdot": f"{guarded.allowed}/../{guarded.outside.name}/{app.name}",
        "file-git": repo.as_uri(),
        "docker-config": str(guarded.docker_config),
        "docker-config-home": "~/.docker",
    }
    # apply_async, not delay(): nothing on this side checks them, only the workers do.
    results = {name: build_image.apply_async(args=[source], kwargs={"destination": guarded.dest()})
               for name, source in sources.items()}
    # A launch-config named by path is read for the request as well.
    config = guarded.outside / f"launch-{uuid.uuid4().hex[:6]}.yaml"
    config.write_text("builder:\n  type: docker\n")
    watched.update(_age(config))
    results["config-path"] = build_image.apply_async(
        args=[str(_app(guarded.allowed, base_image))],
        kwargs={"destination": guarded.dest(), "config": str(config)})
    for name, result in results.items():
        record = _refused(result, "BUILDQ_SOURCE_ROOTS")
        assert str(guarded.allowed) in record["error"], (name, record)
    _untouched(watched)
    assert not list((guarded.cluster.root / "contexts").rglob("*.tar.gz"))


def test_a_source_inside_a_root_builds(guarded: Guarded, base_image: str) -> None:
    app = _app(guarded.allowed, base_image)
    record = build_image.delay(str(app), destination=guarded.dest("inside")).get(timeout=180)
    assert record["status"] == "built", record
    assert record["digest"] == guarded.cluster.registry.digest("policy/inside", record["tag"])


def test_a_directory_shipped_by_the_cli_builds_from_outside_the_roots(
        guarded: Guarded, base_image: str) -> None:
    # buildq build DIR uploads the directory to the store's upload area, which the
    # workers may always read.
    app = _app(guarded.outside, base_image)
    done = subprocess.run([sys.executable, "-m", "tasks.cli", "build", str(app), "--destination",
                           guarded.dest("shipped"), "--json"], env=guarded.cluster.env, cwd=REPO,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["status"] == "built" and record["source"]["kind"] == "archive", record
    assert record["requester"] == f"{getpass.getuser()}@{socket.gethostname()}", record
    assert record["requester_verified"] is False


def test_workers_refuse_destinations_outside_the_policy_before_any_work(
        guarded: Guarded, base_image: str) -> None:
    app = _app(guarded.allowed, base_image)
    before = set((guarded.cluster.root / "contexts").rglob("*"))
    kaniko = {"type": "kaniko", "destination": guarded.dest(),
              "build-context-store": "s3://buildq-policy/contexts"}
    smuggled_cache = {**kaniko, "kaniko-config": {"spec": {"template": {"spec": {"containers": [
        {"args": ["--cache-repo=registry.example.com/elsewhere/cache"]}]}}}}}
    results = {
        "destination": build_image.apply_async(
            args=[str(app)], kwargs={"destination": "registry.example.com/team/app"}),
        "config-destination": build_image.apply_async(
            args=[str(app)], kwargs={"config": {"builder": {
                "type": "docker", "destination": "registry.example.com/team/app"}}}),
        "cache-repo": build_image.apply_async(
            args=[str(app)], kwargs={"destination": guarded.dest(), "config": {"builder": {
                "type": "docker", "cache-repo": "registry.example.com/elsewhere/cache"}}}),
        "kaniko-cache-repo": build_image.apply_async(
            args=[str(app)], kwargs={"config": {"builder": smuggled_cache}}),
    }
    for name, result in results.items():
        record = _refused(result, "BUILDQ_ALLOWED_DESTINATIONS")
        assert "registry.example.com/" in record["error"], (name, record)
        assert "loopback" in record["error"], (name, record)
    # A --destination in kaniko-config is buildq's own flag: refused as such, before work.
    smuggled = {**kaniko, "kaniko-config": {"spec": {"template": {"spec": {"containers": [
        {"args": ["--destination=registry.example.com/elsewhere/app:x"]}]}}}}}
    record = outcome(build_image.apply_async(args=[str(app)],
                                             kwargs={"config": {"builder": smuggled}}), timeout=120)
    assert record["status"] == "failed" and record["error_kind"] == "config", record
    assert "--destination" in record["error"]
    assert set((guarded.cluster.root / "contexts").rglob("*")) == before


# --- before anything is shipped or queued --------------------------------------------------


def _cases(g: Guarded, app: Path, repo: Path) -> dict[str, tuple[list[str], str]]:
    return {
        "secret-name": (["build", str(app), "--destination", g.dest(), "--secret",
                         "../../etc/passwd"], "secret name"),
        "platform": (["build", str(app), "--destination", g.dest(), "--platform", "linux"],
                     "platform"),
        "destination-syntax": (["build", str(app), "--destination", "127.0.0.1:1/a:latest"],
                               "tag"),
        "destination-policy": (["build", str(app), "--destination",
                                "registry.example.com/team/app"], "BUILDQ_ALLOWED_DESTINATIONS"),
        "file-git-outside": (["build", repo.as_uri(), "--destination", g.dest()],
                             "BUILDQ_SOURCE_ROOTS"),
    }


def test_cli_refuses_bad_fields_before_anything_is_shipped_or_queued(
        guarded: Guarded, base_image: str) -> None:
    app = _app(guarded.outside, base_image)
    repo = _bare_repo(guarded.outside, base_image)
    watched = _age(*_tree(repo))
    before, stored = _sent(guarded.cluster), set((guarded.cluster.root / "contexts").rglob("*"))
    for name, (args, fragment) in _cases(guarded, app, repo).items():
        done = subprocess.run([sys.executable, "-m", "tasks.cli", *args, "--json"],
                              env=guarded.cluster.env, cwd=REPO, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 2, (name, done.stderr)
        assert "Traceback" not in done.stderr and fragment in done.stderr, (name, done.stderr)
        lines = done.stderr.splitlines()
        # Nothing shipped ("uploaded ... to ..."), nothing queued ("request <id>").
        assert done.stdout == "", (name, done.stdout)
        assert not any(line.startswith(("uploaded ", "request ")) for line in lines), lines
    assert _sent(guarded.cluster) == before
    assert set((guarded.cluster.root / "contexts").rglob("*")) == stored
    _untouched(watched)


def test_build_image_delay_refuses_bad_fields_before_queueing(
        guarded: Guarded, base_image: str) -> None:
    app = _app(guarded.allowed, base_image)
    repo = _bare_repo(guarded.outside, base_image)
    before = _sent(guarded.cluster)
    calls: dict[str, tuple[dict[str, Any], type[Exception], str]] = {
        "secret-name": ({"source": str(app), "destination": guarded.dest(),
                         "secrets": ["../../etc/passwd"]}, InputError, "secret name"),
        "platform": ({"source": str(app), "destination": guarded.dest(), "platform": "linux"},
                     InputError, "platform"),
        "destination-syntax": ({"source": str(app), "destination": "127.0.0.1:1/a:latest"},
                               InputError, "tag"),
        "destination-policy": ({"source": str(app), "destination": "registry.example.com/t/a"},
                               ForbiddenError, "BUILDQ_ALLOWED_DESTINATIONS"),
        "outside": ({"source": str(guarded.outside), "destination": guarded.dest()},
                    ForbiddenError, "BUILDQ_SOURCE_ROOTS"),
        "file-git-outside": ({"source": repo.as_uri(), "destination": guarded.dest()},
                             ForbiddenError, "BUILDQ_SOURCE_ROOTS"),
        # A path on the workers that this host does not have is the workers' to judge.
    }
    for name, (kwargs, error, fragment) in calls.items():
        source = kwargs.pop("source")
        with pytest.raises(error) as caught:
            build_image.delay(source, **kwargs)
        assert fragment in str(caught.value), (name, caught.value)
    assert _sent(guarded.cluster) == before


# --- who asked -------------------------------------------------------------------------------


def test_records_name_the_claimed_requester_and_history_filters_on_it(
        guarded: Guarded, base_image: str) -> None:
    me = f"{getpass.getuser()}@{socket.gethostname()}"
    app = _app(guarded.allowed, base_image)
    by_script = build_image.delay(str(app), destination=guarded.dest()).get(timeout=180)
    assert by_script["status"] == "built", by_script
    assert by_script["requester"] == me and by_script["requester_verified"] is False

    # A message that names nobody (as sent by any Celery client) is recorded as such.
    nobody = build_image.apply_async(args=[str(_app(guarded.allowed, base_image))],
                                     kwargs={"destination": guarded.dest()}).get(timeout=180)
    assert nobody["status"] == "built" and nobody["requester"] is None, nobody

    def history(*args: str) -> list[dict[str, Any]]:
        done = subprocess.run([sys.executable, "-m", "tasks.cli", "history", "-n", "50",
                               "--json", *args], env=guarded.cluster.env, cwd=REPO,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        rows: list[dict[str, Any]] = json.loads(done.stdout)
        return rows

    mine = {r["source_hash"] for r in history("--requester", me)}
    assert by_script["source_hash"] in mine and nobody["source_hash"] not in mine
    assert by_script["source_hash"] in {r["source_hash"] for r in
                                        history("--requester", f"{me.split('@')[0]}@*")}
    assert history("--requester", "somebody-else@*") == []


def test_a_state_naming_a_tree_elsewhere_is_neither_read_nor_deleted(
        guarded: Guarded, base_image: str) -> None:
    # Any stage takes a state, and a state is input too: one sent straight to the broker
    # names a directory outside the roots as the fetched tree the worker "owns".
    from tasks.app import app

    victim = _app(guarded.outside, base_image)
    watched = _age(*_tree(victim))
    inside = _app(guarded.allowed, base_image)
    state = {"request_id": str(uuid.uuid4()), "builder": "docker", "owned": True,
             "source": {"kind": "directory", "location": str(inside), "ref": None},
             "workdir": str(victim), "source_hash": uuid.uuid4().hex * 2}
    uploaded = outcome(app.send_task("buildq.upload", args=[state]), timeout=120)
    dropped = outcome(app.send_task("buildq.record",
                                    args=[{**state, "request_id": str(uuid.uuid4())}]), timeout=120)
    assert uploaded["id"] == state["request_id"] and dropped["status"] is None, (uploaded, dropped)
    assert victim.is_dir() and (victim / "Dockerfile").is_file(), "the worker deleted it"
    _untouched(watched)

    # Nor can it name another object of a store as its context, to be deleted after.
    precious = guarded.outside / f"precious-{uuid.uuid4().hex[:6]}.tar.gz"
    precious.write_bytes(b"not a context")
    outcome(app.send_task("buildq.record", args=[{
        **state, "request_id": str(uuid.uuid4()), "owned": False, "workdir": None,
        "context_store": guarded.outside.as_uri(), "context_key": precious.name}]), timeout=120)
    assert precious.is_file(), "the worker deleted a file the state named as its context"
