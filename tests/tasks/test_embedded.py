"""``buildq build`` with BUILDQ_REDIS_URL unset: the whole chain in one process, no Redis server.

Every run is a real subprocess of the CLI against the Docker Engine and a real registry.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests import services

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    @property
    def last_line(self) -> str:
        lines = self.stdout.strip().splitlines()
        return lines[-1] if lines else ""

    def record(self) -> dict[str, Any]:
        """The record printed by ``--json`` on stdout's last line."""
        data: dict[str, Any] = json.loads(self.last_line)
        return data

    def __str__(self) -> str:
        return f"exit {self.code}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


def embedded_env(root: Path, **extra: str) -> dict[str, str]:
    """An environment for the CLI in embedded mode, with every path under ``root``."""
    env = dict(os.environ)
    for name in list(env):
        if name.startswith("BUILDQ_") and name != "BUILDQ_BASE_POLICY":
            del env[name]
    (root / "home").mkdir(parents=True, exist_ok=True)
    env.update({
        "HOME": str(root / "home"),
        "BUILDQ_WORKDIR": str(root / "work"),
        "BUILDQ_CONTEXT_STORE": (root / "contexts").as_uri(),
        "BUILDQ_NETWORK_MODE": "none",
        "PYTHONPATH": str(REPO),
    })
    env.pop("XDG_DATA_HOME", None)
    env.update(extra)
    return env


def run_buildq(args: list[str], env: dict[str, str], timeout: float = 180) -> Run:
    proc = subprocess.run([sys.executable, "-m", "tasks.cli", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    return Run(proc.returncode, proc.stdout, proc.stderr)


def leftovers(root: Path) -> list[Path]:
    """Anything left in the scratch workdir or the context store after a build."""
    found: list[Path] = []
    for sub in ("work", "contexts"):
        if (root / sub).exists():
            found.extend((root / sub).rglob("*"))
    return found


def make_app(parent: Path, base: str, extra: str = "") -> Path:
    """A small app with unique content, so its first build is never a skip."""
    root = parent / f"app-{uuid.uuid4().hex[:8]}"
    root.mkdir(parents=True)
    (root / "Dockerfile").write_text(f"FROM {base}\nCOPY msg.txt /msg.txt\n{extra}")
    (root / "msg.txt").write_text(f"embedded {uuid.uuid4()}\n")
    return root


def test_directory_builds_pushes_then_skips_and_leaves_nothing(
        tmp_path: Path, registry: services.RegistryServer, base_image: str) -> None:
    repo = f"embedded/dir-{uuid.uuid4().hex[:8]}"
    dest = f"{registry.host}/{repo}"
    app = make_app(tmp_path / "src", base_image)
    env = embedded_env(tmp_path)

    first = run_buildq(["build", str(app), "--destination", dest], env)
    assert first.code == 0, first
    assert "Traceback" not in first.output
    status, _, reference = first.last_line.partition(": ")
    assert status == "built", first
    image, _, digest = reference.partition("@")
    tag = image.rpartition(":")[2]
    assert image == f"{dest}:{tag}"
    assert digest.startswith("sha256:")
    assert digest == registry.digest(repo, tag)
    assert registry.tags(repo) == [tag]
    assert leftovers(tmp_path) == []

    second = run_buildq(["build", str(app), "--destination", dest], env)
    assert second.code == 0, second
    assert second.last_line == f"skipped: {image}@{digest}", second
    assert registry.tags(repo) == [tag]
    assert leftovers(tmp_path) == []


def test_json_prints_the_record_as_the_last_stdout_line(
        tmp_path: Path, registry: services.RegistryServer, base_image: str) -> None:
    repo = f"embedded/json-{uuid.uuid4().hex[:8]}"
    dest = f"{registry.host}/{repo}"
    app = make_app(tmp_path / "src", base_image)
    env = embedded_env(tmp_path)

    run = run_buildq(["build", str(app), "--destination", dest, "--json"], env)
    assert run.code == 0, run
    record = run.record()
    assert record["status"] == "built", record
    assert record["error"] is None and record["error_kind"] is None
    assert record["image"] == f"{dest}:{record['tag']}"
    assert record["source_hash"].startswith(record["tag"]) and len(record["tag"]) >= 16
    assert record["digest"] == registry.digest(repo, record["tag"])
    assert set(record["stages"]) >= {"fetch", "hash", "exists", "upload", "build", "push", "record"}
    assert all(isinstance(v, float) and v >= 0 for v in record["stages"].values())
    # The human line goes to stderr so stdout stays machine-readable.
    assert f"built: {record['image']}@{record['digest']}" in run.stderr

    again = run_buildq(["build", str(app), "--destination", dest, "--json"], env)
    assert again.code == 0, again
    skipped = again.record()
    assert skipped["status"] == "skipped"
    assert (skipped["tag"], skipped["digest"], skipped["source_hash"]) == (
        record["tag"], record["digest"], record["source_hash"])
    assert "build" not in skipped["stages"] and "push" not in skipped["stages"]
    assert leftovers(tmp_path) == []


def test_archive_source_is_unpacked_in_workdir_and_removed_after_the_build(
        tmp_path: Path, registry: services.RegistryServer, base_image: str) -> None:
    repo = f"embedded/tar-{uuid.uuid4().hex[:8]}"
    app = make_app(tmp_path / "src", base_image)
    archive = tmp_path / "app.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("Dockerfile", "msg.txt"):
            data = (app / name).read_bytes()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    env = embedded_env(tmp_path)

    run = run_buildq(["build", str(archive), "--destination", f"{registry.host}/{repo}", "--json"],
                     env)
    assert run.code == 0, run
    record = run.record()
    assert record["status"] == "built" and record["source"]["kind"] == "archive"
    assert record["digest"] == registry.digest(repo, record["tag"])
    # The unpacked tree and the uploaded context are both gone.
    assert (tmp_path / "work").is_dir()
    assert leftovers(tmp_path) == []
    # Same files as the directory: same source hash.
    hashed = run_buildq(["hash", str(app), "--full"], env)
    assert hashed.code == 0, hashed
    assert hashed.last_line == record["source_hash"]


def test_bundled_hello_example_builds_with_its_default_base(
        tmp_path: Path, registry: services.RegistryServer, base_image: str) -> None:
    assert "ARG BASE=local/busybox:base" in (REPO / "examples/hello/Dockerfile").read_text()
    repo = f"embedded/hello-{uuid.uuid4().hex[:8]}"
    env = embedded_env(tmp_path)

    run = run_buildq(["build", str(REPO / "examples/hello"), "--destination",
                      f"{registry.host}/{repo}", "--json"], env)
    assert run.code == 0, run
    record = run.record()
    assert record["status"] == "built", record
    assert record["digest"] == registry.digest(repo, record["tag"])
    assert leftovers(tmp_path) == []
    # The example is used in place, never modified or removed.
    assert (REPO / "examples/hello/greeting.txt").is_file()


def test_the_demo_path_resolves_the_example_base_pushed_to_the_registry(
        tmp_path: Path, registry: services.RegistryServer, base_image: str) -> None:
    """What scripts/demo does: the base in the registry, the default digest policy."""
    base = f"{registry.host}/embedded/busybox:{uuid.uuid4().hex[:8]}"
    for command in (["docker", "tag", base_image, base], ["docker", "push", "-q", base]):
        subprocess.run(command, check=True, capture_output=True, timeout=120)
    repo = f"embedded/demo-{uuid.uuid4().hex[:8]}"
    env = embedded_env(tmp_path, BUILDQ_BASE_POLICY="digest")

    run = run_buildq(["build", str(REPO / "examples/hello"), "--destination",
                      f"{registry.host}/{repo}", "--build-arg", f"BASE={base}", "--json"], env)
    assert run.code == 0, run
    record = run.record()
    assert record["status"] == "built", record
    name, _, tag = base.partition("/")[2].partition(":")
    assert record["bases"] == [{"image": base, "digest": registry.digest(name, tag)}]
    again = run_buildq(["build", str(REPO / "examples/hello"), "--destination",
                        f"{registry.host}/{repo}", "--build-arg", f"BASE={base}", "--json"], env)
    assert again.code == 0 and again.record()["status"] == "skipped", again
