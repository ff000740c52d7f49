"""Python projects without a Dockerfile: generated, built on the Docker pool, run, cached.

The base is a Debian rootfs with python3 made locally (nothing can be pulled), named
through builder.base-image; dependencies come from a wheel the test builds, installed
offline (builds run with network_mode none) through builder.pip.wheels.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import re
import subprocess
import sys
import tarfile
import uuid
import zipfile
from pathlib import Path
from typing import Any

import yaml

from config import config_from_mapping
from tasks import build_image, outcome
from tasks.operations import build_inputs
from tasks.state import BuildState
from tests.tasks.conftest import REPO, Cluster
from workers.context import write_context
from workers.dockerfile import DOCKERFILE

_STEP = re.compile(r"^Step \d+/\d+ : (.*)$")
#: A BuildKit step's header in a ``--progress=plain`` log: ``#7 [stage-0 4/6] RUN ...``.
_BUILDKIT_STEP = re.compile(r"^#(\d+) \[[^\]]*\d+/\d+\] (.*)$")


def _wheel(directory: Path, name: str, version: str, code: str) -> Path:
    """A minimal pure-Python wheel, built by hand so no build backend is needed offline."""
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}.py": code,
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: buildq-tests\nRoot-Is-Purelib: true\n"
                         "Tag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = "\n".join(record) + "\n"
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, text in files.items():
            zf.writestr(zipfile.ZipInfo(path, (2020, 1, 1, 0, 0, 0)), text)
    return wheel


def _project(tmp_path: Path, message: str) -> Path:
    root = tmp_path / f"proj-{uuid.uuid4().hex[:8]}"
    root.mkdir()
    (root / "train.py").write_text(f"import greet\nprint(greet.hello(), {message!r})\n")
    # A run-unique comment: the engine's cache outlives test sessions, and a layer cached
    # by an earlier run would hide what this run's builds do.
    (root / "requirements.txt").write_text(f"# run {uuid.uuid4()}\ngreet==1.0\n")
    _wheel(root / "wheels", "greet", "1.0", "def hello():\n    return 'greet 1.0'\n")
    return root


def _config(base: str) -> dict[str, Any]:
    return {"builder": {"base-image": base, "pip": {"wheels": "wheels"}}}


def _steps(cluster: Cluster, source_hash: str) -> dict[str, bool]:
    """Each build step of the hash's log, and whether the engine took it from its cache:
    the legacy builder's ``Step N/M :`` and ``Using cache``, or BuildKit's step headers and
    ``#N CACHED`` (BuildKit makes no step of ENV, USER, CMD and other metadata)."""
    steps: dict[str, bool] = {}
    current = None
    vertices: dict[str, str] = {}
    for _, fields in cluster.client().xrange(f"buildq:log:{source_hash}"):
        line = fields.get("line", "")
        match = _STEP.match(line.strip())
        buildkit = _BUILDKIT_STEP.match(line)
        if match:
            current = match.group(1)
            steps[current] = False
        elif buildkit and buildkit.group(1) not in vertices:
            vertices[buildkit.group(1)] = buildkit.group(2)
            steps[buildkit.group(2)] = False
        elif line.startswith("#") and line.partition(" ")[2] == "CACHED":
            number = line[1:].partition(" ")[0]
            if number in vertices:
                steps[vertices[number]] = True
        elif current is not None and "Using cache" in line:
            steps[current] = True
    return steps


def _run(image: str, *args: str) -> str:
    done = subprocess.run(["docker", "run", "--rm", "--network", "none", *args, image],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_generated_build_runs_and_caches_the_dependency_layer(
        cluster: Cluster, tmp_path: Path, python_base_image: str) -> None:
    dest = f"{cluster.registry.host}/generated/app"
    app = _project(tmp_path, f"first {uuid.uuid4().hex[:6]}")
    cfg = _config(python_base_image)

    first = build_image.delay(str(app), destination=dest, config=cfg,
                              entrypoint="python train.py").get(timeout=300)
    assert first["status"] == "built", first
    assert first["digest"] == cluster.registry.digest("generated/app", first["tag"])
    assert not (app / "Dockerfile").exists()  # never written into the project
    assert _run(first["image"]).startswith("greet 1.0 first ")
    # The fixed non-root user, by uid.
    assert _run(first["image"], "--entrypoint", "id").startswith("uid=10001(app) gid=10001(app)")

    steps = _steps(cluster, first["source_hash"])
    pip_step = next(s for s in steps if s.startswith('RUN ["python", "-m", "pip"'))
    source_step = next(s for s in steps if s.startswith("COPY --chown=10001:10001 . ."))
    assert list(steps).index(pip_step) < list(steps).index(source_step)

    # A source change: everything up to the dependency layer comes from the cache.
    (app / "train.py").write_text((app / "train.py").read_text().replace("first", "second"))
    second = build_image.delay(str(app), destination=dest, config=cfg,
                               entrypoint="python train.py").get(timeout=300)
    assert second["status"] == "built" and second["tag"] != first["tag"], second
    steps = _steps(cluster, second["source_hash"])
    names = list(steps)
    assert all(steps[s] for s in names[1:names.index(source_step)]), steps
    assert steps[pip_step] is True
    assert steps[source_step] is False
    assert _run(second["image"]).startswith("greet 1.0 second ")

    # A requirements change rebuilds the dependency layer.
    _wheel(app / "wheels", "greet", "2.0", "def hello():\n    return 'greet 2.0'\n")
    (app / "requirements.txt").write_text(
        (app / "requirements.txt").read_text().replace("greet==1.0", "greet==2.0"))
    third = build_image.delay(str(app), destination=dest, config=cfg,
                              entrypoint="python train.py").get(timeout=300)
    assert third["status"] == "built", third
    steps = _steps(cluster, third["source_hash"])
    assert steps[pip_step] is False, steps
    assert _run(third["image"]).startswith("greet 2.0 second ")

    # Identical request: the same generated text, the same hash, a skip.
    again = build_image.delay(str(app), destination=dest, config=cfg,
                              entrypoint="python train.py").get(timeout=120)
    assert again["status"] == "skipped" and again["tag"] == third["tag"]


def test_cli_build_of_a_local_project_ships_it_without_a_dockerfile(
        cluster: Cluster, tmp_path: Path, python_base_image: str) -> None:
    dest = f"{cluster.registry.host}/generated/cli"
    app = _project(tmp_path, "from the cli")
    config = tmp_path / "launch-config.yaml"
    config.write_text(yaml.safe_dump(_config(python_base_image)))
    done = subprocess.run(
        [sys.executable, "-m", "tasks.cli", "build", str(app), "--destination", dest,
         "--config", str(config), "--entrypoint", "python train.py", "--json"],
        env=cluster.env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    record = yaml.safe_load(done.stdout.strip().splitlines()[-1])
    assert record["status"] == "built"
    assert _run(record["image"]).strip() == "greet 1.0 from the cli"
    # The same project asked directly hashes the same: shipping added nothing.
    direct = build_image.delay(str(app), destination=dest, config=_config(python_base_image),
                               entrypoint="python train.py").get(timeout=120)
    assert direct["status"] == "skipped" and direct["tag"] == record["tag"]
    # `buildq hash` with the same options predicts that tag; other options change it.
    hashed = subprocess.run(
        [sys.executable, "-m", "tasks.cli", "hash", str(app), "--config", str(config),
         "--entrypoint", "python train.py"],
        env=cluster.env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert hashed.returncode == 0, hashed.stderr
    assert hashed.stdout.strip() == record["tag"]
    other = subprocess.run(
        [sys.executable, "-m", "tasks.cli", "hash", str(app), "--config", str(config),
         "--entrypoint", "python other.py"],
        env=cluster.env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert other.returncode == 0, other.stderr
    assert other.stdout.strip() != record["tag"]


def test_nothing_to_start_fails_the_request_with_what_to_add(
        cluster: Cluster, tmp_path: Path, python_base_image: str) -> None:
    app = tmp_path / "lib-only"
    app.mkdir()
    (app / "lib.py").write_text("X = 1\n")
    record = outcome(build_image.delay(str(app), destination=f"{cluster.registry.host}/generated/none",
                                       config={"builder": {"base-image": python_base_image}}),
                     timeout=60)
    assert record["status"] == "failed" and record["error_kind"] == "source", record
    assert "cannot tell how to start it" in record["error"] and "--entrypoint" in record["error"]


# --- buildq dockerfile ------------------------------------------------------------------


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("BUILDQ_") or k == "BUILDQ_BASE_POLICY"}
    return subprocess.run([sys.executable, "-m", "tasks.cli", *args],
                          env={**base, "PYTHONPATH": str(REPO), **(env or {})}, cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def _plain_project(tmp_path: Path) -> Path:
    root = tmp_path / "plain"
    root.mkdir()
    (root / "train.py").write_text("print('hi')\n")
    (root / "requirements.txt").write_text("numpy\n")
    (root / ".python-version").write_text("3.11\n")
    return root


def test_dockerfile_text_is_identical_across_machine_settings(tmp_path: Path) -> None:
    app = _plain_project(tmp_path)
    outputs = []
    for i, (user, lang) in enumerate([("alice", "C"), ("bob", "de_DE.UTF-8"),
                                      ("ユーザー", "ja_JP.EUC-JP")]):
        home = tmp_path / f"home-{i}"
        home.mkdir()
        done = _cli("dockerfile", str(app), "--entrypoint", "python train.py", env={
            "HOME": str(home), "USER": user, "LOGNAME": user, "LANG": lang, "LC_ALL": lang,
            "TZ": ["UTC", "Asia/Tokyo", "America/Denver"][i], "PWD": str(home)})
        assert done.returncode == 0, done.stderr
        outputs.append(done.stdout.encode())
    assert outputs[0] == outputs[1] == outputs[2]
    text = outputs[0].decode()
    assert "FROM python:3.11-slim\n" in text
    for leak in ("alice", "bob", str(tmp_path), "0.1.0"):
        assert leak not in text


def test_dockerfile_command_errors_and_save(tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "lib.py").write_text("")
    done = _cli("dockerfile", str(bare))
    assert done.returncode == 2 and done.stdout == ""
    assert "cannot tell how to start it" in done.stderr and "--entrypoint" in done.stderr

    done = _cli("dockerfile", str(bare), "--python", "three")
    assert done.returncode == 2 and "not a Python version" in done.stderr

    printed = _cli("dockerfile", str(bare), "--entrypoint", "python lib.py")
    assert printed.returncode == 0
    saved = _cli("dockerfile", str(bare), "--entrypoint", "python lib.py", "--save")
    assert saved.returncode == 0, saved.stderr
    assert (bare / "Dockerfile").read_text() == printed.stdout
    # Now the project has a Dockerfile: it is what a build uses, and is never overwritten.
    (bare / "Dockerfile").write_text("FROM mine\n")
    again = _cli("dockerfile", str(bare), "--entrypoint", "python lib.py", "--save")
    assert again.returncode == 2 and "never overwrites" in again.stderr
    assert (bare / "Dockerfile").read_text() == "FROM mine\n"
    own = _cli("dockerfile", str(bare))
    assert own.returncode == 0 and own.stdout == "FROM mine\n" and "own Dockerfile" in own.stderr

    archive = tmp_path / "src.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(bare / "lib.py", "lib.py")
    done = _cli("dockerfile", str(archive), "--save", "--entrypoint", "python lib.py")
    assert done.returncode == 2 and "--save writes into a local directory" in done.stderr

    config = tmp_path / "secret.yaml"
    config.write_text("builder:\n  pip:\n    index-url: https://me:hunter2@pypi.example.com/simple\n")
    done = _cli("dockerfile", str(bare), "--config", str(config))
    assert done.returncode == 2 and "credentials" in done.stderr
    assert "hunter2" not in done.stderr + done.stdout


def test_gpu_uses_the_accelerator_base(tmp_path: Path) -> None:
    app = _plain_project(tmp_path)
    config = tmp_path / "gpu.yaml"
    config.write_text("builder:\n  accelerator:\n    base-image: example.com/cuda-py:{python}\n")
    done = _cli("dockerfile", str(app), "--gpu", "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert "FROM example.com/cuda-py:3.11\n" in done.stdout
    done = _cli("dockerfile", str(app), "--gpu")
    assert done.returncode == 2 and "builder.accelerator.base-image" in done.stderr


def test_uploaded_context_carries_the_printed_dockerfile(tmp_path: Path) -> None:
    """What either pool (Kaniko too) receives: the CLI's text, under the name the build uses."""
    app = _plain_project(tmp_path)
    printed = _cli("dockerfile", str(app), "--entrypoint", "python train.py").stdout
    state = BuildState(request_id="r", source={"kind": "directory", "location": str(app)},
                       entrypoint=["python", "train.py"],
                       config=config_from_mapping({}).to_mapping())
    out = io.BytesIO()
    write_context(app, build_inputs(state, app), out)
    with tarfile.open(fileobj=io.BytesIO(out.getvalue()), mode="r:gz") as tar:
        member = tar.extractfile(state.dockerfile or DOCKERFILE)
        assert member is not None
        assert member.read().decode() == printed
    assert not (app / "Dockerfile").exists()


def test_help_documents_the_default_python() -> None:
    from workers.dockerfile import DEFAULT_PYTHON

    done = _cli("dockerfile", "--help")
    assert done.returncode == 0
    assert f"else {DEFAULT_PYTHON}" in " ".join(done.stdout.split())
