"""The corpus in tests/projects: one small project per packaging style, built and run.

Each project is built by ``buildq build`` (embedded mode, a real Docker Engine and
registry) with no Dockerfile of its own, then run: web apps must answer HTTP on $PORT
inside the container, CLIs print their version, and ``pip freeze`` in the image must
equal the lock's pins where there is a lock. A code-only edit must reuse the dependency
layer. Packages come from a local package index (wheels the host's pip downloads from
PyPI once, served on 127.0.0.1), which the build reaches with network mode host.
"""

from __future__ import annotations

import hashlib
import html
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import services
from tests.tasks.test_embedded import embedded_env, run_buildq

PROJECTS = Path(__file__).resolve().parents[1] / "projects"

#: Every distribution the corpus installs or builds with, and its sha256 (PyPI's files
#: never change, so a mismatch means a wrong download).
WHEELS = {
    "Django-4.2.20-py3-none-any.whl":
        "213381b6e4405f5c8703fffc29cd719efdf189dec60c67c04f76272b3dc845b9",
    "annotated_types-0.8.0-py3-none-any.whl":
        "f072f4d804ea359e4eaf198b1af7a8b0943881a87f31bb764f8bf219bb9419e0",
    "anyio-4.16.0-py3-none-any.whl":
        "c66ae634e0b8228396b801741beb3294326d4b6102f7bba4041c0dfb58c29026",
    "asgiref-3.13.0-py3-none-any.whl":
        "f9596a2434512686473d50f96ff6207fbba49ae1a785dfac614df4aeb085674d",
    "attrs-25.3.0-py3-none-any.whl":
        "427318ce031701fea540783410126f03899a97ffc6f61596ad581ac2e40e3bc3",
    "click-8.1.8-py3-none-any.whl":
        "63c132bbbed01578a06712a2d1f497bb62d9c1c0d329b7903a866228027263b2",
    "fastapi-0.115.12-py3-none-any.whl":
        "e94613d6c05e27be7ffebdd6ea5f388112e5e430c8f7d6494a9d1d88d43e814d",
    "gunicorn-23.0.0-py3-none-any.whl":
        "ec400d38950de4dfd418cff8328b2c8faed0edb0d517d3394e457c317908ca4d",
    "h11-0.16.0-py3-none-any.whl":
        "63cf8bbe7522de3bf65932fda1d9c2772064ffb3dae62d55932da54b31cb6c86",
    "hatchling-1.27.0-py3-none-any.whl":
        "d3a2f3567c4f926ea39849cdf924c7e99e6686c9c8e288ae1037c8fa2a5d937b",
    "idna-3.20-py3-none-any.whl":
        "ab7ae7122974553370f0bdb919e1a960b2cd1bc1ef0276416d896db81c14582c",
    "packaging-26.4-py3-none-any.whl":
        "81383611a09c1bc0b08b76e0fd5829d7c6824c65b27a6aee339da133f4233ea2",
    "pathspec-1.1.1-py3-none-any.whl":
        "a00ce642f577bf7f473932318056212bc4f8bfdf53128c78bbd5af0b9b20b189",
    "pdm_backend-2.4.3-py3-none-any.whl":
        "07c7e7ae9dc7bbaf9a470e8d2cc59e987bf2897c2f27a7efbde8f1534c0ea4ee",
    "pluggy-1.7.0-py3-none-any.whl":
        "7dd7b0d8832ba3cb632c306926ded123429211b83641b35dc5c41ad2d34f9bec",
    "poetry_core-2.1.2-py3-none-any.whl":
        "ecb1e8f7d4f071a21cd0feb8c19bd1aec80de6fb0e82aa9d809a591e544431b4",
    "pydantic-2.14.4-py3-none-any.whl":
        "653a2ad9f6d8858529c77c72717d0ea991d6c6837fe683246b2f4b2bbfc3fadc",
    "pydantic_core-2.50.5-cp311-cp311-manylinux2014_x86_64.manylinux_2_17_x86_64.whl":
        "488319076ec92908b91fc6265ce761f1d78748f69f85518564fd16bf333e1b70",
    "setuptools-75.8.0-py3-none-any.whl":
        "e3982f444617239225d675215d51f6ba05f845d4eec313da4418fdbb56fb27e3",
    "six-1.17.0-py2.py3-none-any.whl":
        "4721f391ed90541fddacab5acf947aa0d3dc7d27b2e1e8eda2be8970586c3274",
    "sqlparse-0.6.1-py3-none-any.whl":
        "3be5a72d04c873d690d7c6dedd33d6fae2ef82759881ceec02fc2efd0cba564f",
    "starlette-0.46.2-py3-none-any.whl":
        "595633ce89f8ffa71a015caed34a5b2dc1c0cdb3f0f1fbd1e69339cf2abeec35",
    "trove_classifiers-2026.9.21.13-py3-none-any.whl":
        "8b1ff4f9c191b1040b71c37f1e445ab99732911e3cd91de52838453a854d7a17",
    "typing_extensions-4.16.0-py3-none-any.whl":
        "481caa481374e813c1b176ada14e97f1f67a4539ce9cfeb3f350d78d6370c2e8",
    "typing_inspection-0.4.5-py3-none-any.whl":
        "bc210535442b39e1bf2805e0c7a17dfd6a4ace760c84c7f7d16245d23a6b1c39",
    "uvicorn-0.34.0-py3-none-any.whl":
        "023dc038422502fa28a09c7a30bf2b6991512da7dcdb8fd35fe57cfc154126f4",
    "wheel-0.45.1-py3-none-any.whl":
        "708e7481cc80179af0e556bbf0cc00b8444c7321e2700b8d8580231d13017248",
}


def _requirement(filename: str) -> str:
    name, version = filename.split("-")[:2]
    return f"{name}=={version}"


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _wheelhouse() -> Path:
    """The wheels, downloaded by the host's pip once and kept in the user's cache."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "buildq-tests" / "wheels"
    cache.mkdir(parents=True, exist_ok=True)
    missing = [f for f in WHEELS if not (cache / f).is_file()]
    if missing:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
             "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
             "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
             "--platform", "any", "-d", str(cache), *(_requirement(f) for f in missing)],
            check=True, capture_output=True, timeout=600)
    for filename, digest in WHEELS.items():
        assert hashlib.sha256((cache / filename).read_bytes()).hexdigest() == digest, filename
    return cache


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="session")
def package_index(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A PEP 503 simple index of WHEELS on 127.0.0.1; yields its URL."""
    wheels = _wheelhouse()
    root = tmp_path_factory.mktemp("index")
    (root / "files").mkdir()
    pages: dict[str, list[str]] = {}
    for filename, digest in sorted(WHEELS.items()):
        shutil.copy(wheels / filename, root / "files" / filename)
        link = f'<a href="../../files/{html.escape(filename)}#sha256={digest}">{html.escape(filename)}</a>'
        pages.setdefault(_canonical(filename.split("-")[0]), []).append(link)
    for name, links in pages.items():
        (root / "simple" / name).mkdir(parents=True)
        (root / "simple" / name / "index.html").write_text(
            "<!DOCTYPE html><html><body>\n" + "<br>\n".join(links) + "\n</body></html>\n")
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a: _Quiet(*a, directory=str(root)))  # type: ignore[misc]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/simple"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def versioned_python_base(python_base_image: str) -> str:
    """The Debian python3 base also tagged by its Python minor, for ``{python}`` bases."""
    subprocess.run(["docker", "tag", python_base_image, "local/python3:3.11"], check=True, timeout=60)
    return "local/python3:{python}"


# --- building and running -----------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    project: str
    #: "web": answers HTTP on $PORT; "cli": prints ``expect`` when run with ``args``.
    kind: str
    expect: str
    dependencies: str
    lock: str | None = None
    #: ``pip freeze --local`` in the image, less the project itself (None: not checked).
    freeze: tuple[str, ...] | None = None
    args: tuple[str, ...] = ()
    #: A source file a code-only edit touches.
    edit: str = "main.py"
    config: dict[str, Any] = field(default_factory=dict)
    versioned_base: bool = False
    job: str | None = None


CASES = [
    Case("uv-lock", "web", "uv-greeter on port 8080", "locked", "uv.lock",
         ("gunicorn==23.0.0", "packaging==26.4"), edit="app.py"),
    Case("poetry1-lock", "cli", "poetry-one 1.4.0 (attrs 25.3.0)", "locked", "poetry.lock",
         ("attrs==25.3.0",), args=("--version",), edit="poetry_one/cli.py"),
    Case("poetry2", "web", "poetry-two on port 8080", "locked", "poetry.lock",
         ("click==8.1.8", "h11==0.16.0", "uvicorn==0.34.0")),
    Case("pdm-lock", "cli", "pdm-sayer 0.3.0 (six 1.17.0)", "locked", "pdm.lock", ("six==1.17.0",),
         edit="src/pdm_sayer/__main__.py"),
    Case("pipenv-lock", "web", "pipenv-app on port 8080", "locked", "Pipfile.lock",
         ("gunicorn==23.0.0", "packaging==26.4"), edit="wsgi.py"),
    Case("requirements-hashes", "web", "requirements-app on port 8080", "locked", "requirements.txt",
         ("click==8.1.8", "h11==0.16.0", "uvicorn==0.34.0")),
    Case("setup-py", "cli", "setup-only 0.5.0 (six 1.17.0)", "resolved", args=("--version",),
         edit="setup_only/__init__.py"),
    Case("setup-cfg", "web", "cfg-site 0.2.0 on port 8080", "resolved", edit="app.py"),
    Case("hatch-extras", "web", "hatch-web 1.1.0 on port 8080", "resolved", edit="src/hatch_web/__init__.py",
         config={"extras": ["server"]}),
    Case("django-procfile", "web", "django 4.2.20 site", "resolved", edit="mysite/urls.py"),
    Case("fastapi-main", "web", "fastapi 0.115.12 on port 8080", "resolved"),
    Case("cli-scripts", "cli", "hello-cli, version 3.2.1", "resolved", args=("--version",),
         edit="hello_cli.py"),
    Case("wandb-job", "cli", "python 3.11; epochs 2; attrs 25.3.0; six 1.17.0", "locked",
         "requirements.frozen.txt", ("attrs==25.3.0", "six==1.17.0"), edit="train.py",
         versioned_base=True, job="wandb-job.json"),
]

#: A step line of BuildKit's plain progress ("#8 [5/6] RUN ...") or the legacy builder's.
_BUILDKIT_STEP = re.compile(r"^#(\d+) \[\s*\d+/\d+\] (.*)$")
_LEGACY_STEP = re.compile(r"^Step \d+/\d+ : (.*)$")


def build_steps(log: str) -> dict[str, bool]:
    """Each build step in the CLI's log and whether it came from the engine's cache."""
    steps: dict[str, bool] = {}
    ids: dict[str, str] = {}
    current: str | None = None
    for raw in log.splitlines():
        line = raw.strip().removeprefix("|").strip()
        if match := _BUILDKIT_STEP.match(line):
            ids[match.group(1)] = match.group(2)
            steps.setdefault(match.group(2), False)
        elif (match := re.match(r"^#(\d+) CACHED$", line)) and match.group(1) in ids:
            steps[ids[match.group(1)]] = True
        elif match := _LEGACY_STEP.match(line):
            current = match.group(1)
            steps[current] = False
        elif current is not None and "Using cache" in line:
            steps[current] = True
    return steps


def _config(tmp_path: Path, index: str, base: str, pip: dict[str, Any]) -> Path:
    path = tmp_path / "launch-config.yaml"
    path.write_text(yaml.safe_dump({"builder": {"base-image": base,
                                                "pip": {"index-url": index, **pip}}}))
    return path


def _build(source: Path, dest: str, config: Path, tmp_path: Path) -> tuple[dict[str, Any], str]:
    env = embedded_env(tmp_path, BUILDQ_NETWORK_MODE="host")
    run = run_buildq(["build", str(source), "--destination", dest, "--config", str(config), "--json"],
                     env, timeout=600)
    assert run.code == 0, run
    assert "Traceback" not in run.output
    return run.record(), run.stderr


def _docker(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)


def fetch_inside(image: str, path: str = "/") -> str:
    """Start the image (no network), then GET $PORT from inside the container."""
    name = f"buildq-corpus-{uuid.uuid4().hex[:8]}"
    started = _docker("run", "-d", "--network", "none", "--name", name, image)
    assert started.returncode == 0, started.stderr
    try:
        probe = ("import os, urllib.request; print(urllib.request.urlopen("
                 f"'http://127.0.0.1:' + os.environ['PORT'] + '{path}', timeout=3).read().decode())")
        deadline = time.monotonic() + 60
        while True:
            done = _docker("exec", name, "python", "-c", probe)
            if done.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        logs = _docker("logs", name)
        assert done.returncode == 0, f"{done.stderr}\n--- container log\n{logs.stdout}{logs.stderr}"
        return done.stdout
    finally:
        _docker("rm", "-f", name)


def run_image(image: str, *args: str, entrypoint: str | None = None) -> str:
    extra = ["--entrypoint", entrypoint] if entrypoint else []
    done = _docker("run", "--rm", "--network", "none", *extra, image, *args)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _project_name(case: Case, source: Path) -> str:
    names = {"poetry1-lock": "poetry-one", "pdm-lock": "pdm-sayer", "setup-py": "setup-only",
             "setup-cfg": "cfg-site", "hatch-extras": "hatch-web", "cli-scripts": "hello-cli"}
    return names.get(case.project, case.project)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c.project for c in CASES])
def test_corpus_project_builds_runs_and_keeps_its_dependency_layer(
        case: Case, tmp_path: Path, registry: services.RegistryServer, python_base_image: str,
        versioned_python_base: str, package_index: str) -> None:
    source = tmp_path / case.project
    shutil.copytree(PROJECTS / case.project, source)
    # A marker the engine's cache cannot know, so the first build really builds.
    (source / ".buildq-test-run").write_text(f"{uuid.uuid4()}\n")
    base = versioned_python_base if case.versioned_base else python_base_image
    config = _config(tmp_path, package_index, base, case.config)
    dest = f"{registry.host}/corpus/{case.project}"

    first, _ = _build(source, dest, config, tmp_path)
    assert first["status"] == "built", first
    assert (first["dependencies"], first["lock"], first["job"]) == (case.dependencies, case.lock, case.job)
    image = first["image"]

    if case.kind == "web":
        assert case.expect in fetch_inside(image)
    else:
        assert case.expect in run_image(image, *case.args)
    # The image runs as the fixed non-root user.
    assert run_image(image, "-c", "import os; print(os.getuid())", entrypoint="python").strip() == "10001"
    frozen = run_image(image, "-m", "pip", "freeze", "--local", entrypoint="python").splitlines()
    project = _canonical(_project_name(case, source))
    frozen = [line for line in frozen if _canonical(re.split(r"==| @ ", line)[0]) != project]
    if case.freeze is not None:
        assert sorted(frozen) == sorted(case.freeze)

    # A code-only edit: a new image whose dependency layer comes from the cache.
    edited = source / case.edit
    edited.write_text(edited.read_text() + f"\n# edited {uuid.uuid4()}\n")
    second, log = _build(source, dest, config, tmp_path)
    assert second["status"] == "built" and second["tag"] != first["tag"], second
    steps = build_steps(log)
    source_step = next(s for s in steps if s.startswith("COPY --chown=10001:10001 . ."))
    dependency_steps = [s for s in list(steps)[:list(steps).index(source_step)]
                        if "pip" in s or s.startswith("COPY [")]
    assert dependency_steps, steps
    assert all(steps[s] for s in dependency_steps), steps
    assert steps[source_step] is False


@pytest.mark.slow
def test_wandb_job_with_its_own_dockerfile_builds_it_from_its_build_context(
        tmp_path: Path, registry: services.RegistryServer, base_image: str, package_index: str,
        python_base_image: str) -> None:
    source = tmp_path / "job"
    shutil.copytree(PROJECTS / "wandb-job-dockerfile", source)
    (source / "trainer" / "run.sh").write_text(
        (source / "trainer" / "run.sh").read_text() + f"# run {uuid.uuid4()}\n")
    config = _config(tmp_path, package_index, python_base_image, {})
    record, _ = _build(source, f"{registry.host}/corpus/job-dockerfile", config, tmp_path)
    assert record["status"] == "built", record
    assert (record["job"], record["dependencies"], record["lock"]) == ("wandb-job.json", None, None)
    out = run_image(record["image"])
    assert out.startswith("built from the job's own Dockerfile\n")
    # The context was the job's build_context: nothing above it reached the build.
    assert out.split()[6:] == ["Dockerfile.train", "run.sh"]
