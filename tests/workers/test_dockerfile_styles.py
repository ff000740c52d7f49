"""What the generated Dockerfile makes of each packaging style, lock, Python and start.

Text-level: the images themselves are built and run in tests/tasks/test_generated_projects.py.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import tarfile
from pathlib import Path

import pytest

from config import config_from_mapping
from config.errors import ConfigError, InputError, SourceError
from config.settings import Settings
from tasks.operations import describe_request, hash_tree
from tasks.records import make_record
from workers.context import BuildInputs, source_hash, write_context
from workers.dockerfile import KNOWN_PYTHONS, PythonOptions, generate, plan

PROJECTS = Path(__file__).resolve().parents[1] / "projects"
SHA = "sha256:" + "ab" * 32


def _project(root: Path, files: dict[str, str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def _copy(name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(PROJECTS / name, tmp_path / name))


def _opts(config: dict[str, object] | None = None, **kwargs: object) -> PythonOptions:
    cfg = config_from_mapping(config) if config is not None else None
    return PythonOptions.create(cfg, **kwargs)  # type: ignore[arg-type]


def _pins(text: str) -> list[str]:
    """The requirement lines a generated Dockerfile writes for pip (hashes dropped)."""
    folded = text.replace("\\\n", " ")
    for line in folded.splitlines():
        if line.startswith('RUN ["sh", "-c", "printf'):
            argv = json.loads(line[4:])
            return [re.sub(r" --hash=\S+", "", a) for a in argv[4:]]
    return []


def _cmd(text: str) -> tuple[list[str] | None, list[str]]:
    entry = next((json.loads(line[11:]) for line in text.splitlines() if line.startswith("ENTRYPOINT ")),
                 None)
    cmd = next(json.loads(line[4:]) for line in text.splitlines() if line.startswith("CMD "))
    return entry, cmd


def _from(text: str) -> str:
    return next(line.split(" ", 1)[1] for line in text.splitlines() if line.startswith("FROM "))


# --- lockfiles ----------------------------------------------------------------------------


def test_uv_lock_pins_runtime_packages_with_hashes_and_markers_not_dev(tmp_path: Path) -> None:
    root = _copy("uv-lock", tmp_path)
    found = plan(root, _opts())
    assert (found.dependencies, found.lock, found.style) == ("locked", "uv.lock", "uv")
    assert _pins(found.text or "") == ['colorama==0.4.6 ; sys_platform == "win32"', "gunicorn==23.0.0",
                                       "packaging==26.4"]
    assert "--require-hashes" in (found.text or "")
    assert "pytest==" not in (found.text or "")
    # A virtual uv project (no build system) is run from its source, not installed.
    assert '"--no-deps", "."' not in (found.text or "")


def test_a_lock_pin_change_changes_the_text_and_the_tag(tmp_path: Path) -> None:
    root = _copy("uv-lock", tmp_path)
    before = plan(root, _opts()).text or ""
    hashed = source_hash(root, BuildInputs.create(None, None, None, None, dockerfile_text=before))
    lock = root / "uv.lock"
    lock.write_text(lock.read_text().replace('version = "26.4"', 'version = "26.3"'))
    after = plan(root, _opts()).text or ""
    assert "packaging==26.3" in after and before != after
    assert source_hash(root, BuildInputs.create(None, None, None, None, dockerfile_text=after)) != hashed


def test_uv_lock_extras_git_sources_and_refusals(tmp_path: Path) -> None:
    root = _project(tmp_path / "p", {
        "app.py": "",
        "pyproject.toml": '[project]\nname="p"\nversion="1"\ndependencies=["lib"]\n'
                          '[project.optional-dependencies]\nfast=["speedy"]\n',
        "uv.lock": f'''version = 1
[[package]]
name = "p"
version = "1"
source = {{ virtual = "." }}
dependencies = [{{ name = "lib", marker = "python_full_version >= '3.10'" }}]
[package.optional-dependencies]
fast = [{{ name = "speedy" }}]
[[package]]
name = "lib"
version = "2.0"
source = {{ git = "https://example.com/lib.git?rev=main#0123456789abcdef0123456789abcdef01234567" }}
dependencies = [{{ name = "helper", marker = "sys_platform == 'linux'" }}]
[[package]]
name = "helper"
version = "1.0"
source = {{ registry = "https://pypi.org/simple" }}
wheels = [{{ url = "https://x/helper-1.0-py3-none-any.whl", hash = "{SHA}" }},
          {{ url = "https://x/helper-1.0-cp311-cp311-win_amd64.whl", hash = "sha256:{'cd' * 32}" }}]
[[package]]
name = "speedy"
version = "3.1"
source = {{ registry = "https://pypi.org/simple" }}
sdist = {{ url = "https://x/speedy-3.1.tar.gz", hash = "{SHA}" }}
'''})
    text = plan(root, _opts()).text or ""
    assert _pins(text) == [
        "helper==1.0 ; python_full_version >= \"3.10\" and sys_platform == \"linux\"",
        "lib @ git+https://example.com/lib.git@0123456789abcdef0123456789abcdef01234567 ; "
        "python_full_version >= \"3.10\""]
    # git cannot be hash-checked: the set is kept exact with --no-deps, and the image gets git.
    assert "--no-deps -r" in text and "--require-hashes" not in text
    assert "# git, for the dependencies installed from git (lib)." in text
    assert "speedy" not in text
    assert "speedy==3.1" in _pins(plan(root, _opts({"builder": {"pip": {"extras": ["fast"]}}})).text or "")
    with pytest.raises(SourceError, match=r"builder\.pip\.extras names gpu"):
        plan(root, _opts({"builder": {"pip": {"extras": ["gpu"]}}}))
    (root / "pyproject.toml").write_text('[project]\nname="p"\nversion="1"\ndependencies=["lib", "new"]\n')
    (root / "uv.lock").write_text((root / "uv.lock").read_text().replace(
        'source = { virtual = "." }', 'source = { virtual = "." }\n[package.metadata]\n'
        'requires-dist = [{ name = "lib" }]', 1))
    with pytest.raises(SourceError, match=r"uv.lock is out of date: the project depends on new"):
        plan(root, _opts())


def test_uv_lock_local_path_dependency_is_refused_by_name(tmp_path: Path) -> None:
    root = _project(tmp_path / "p", {"app.py": "", "pyproject.toml": '[project]\nname="p"\nversion="1"\n',
                                     "uv.lock": 'version = 1\n[[package]]\nname = "p"\nversion = "1"\n'
                                                'source = { virtual = "." }\n'
                                                'dependencies = [{ name = "shared" }]\n'
                                                '[[package]]\nname = "shared"\nversion = "0.1"\n'
                                                'source = { editable = "../shared" }\n'})
    with pytest.raises(SourceError, match=r"installs shared from a local path \(\.\./shared\)"):
        plan(root, _opts())


def test_poetry_lock_walk_follows_extras_and_python_markers(tmp_path: Path) -> None:
    root = _project(tmp_path / "p", {
        "main.py": "",
        "pyproject.toml": '[tool.poetry]\nname="p"\nversion="1"\npackage-mode=false\n'
                          '[tool.poetry.dependencies]\npython="^3.9"\n'
                          'web={version="^1", extras=["server"]}\n'
                          'old={version="^2", python="<3.10"}\n'
                          'opt={version="*", optional=true}\n'
                          '[tool.poetry.extras]\nall=["opt"]\n',
        "poetry.lock": f'''
[[package]]
name = "web"
version = "1.5"
optional = false
python-versions = "*"
files = [{{file = "web-1.5-py3-none-any.whl", hash = "{SHA}"}}]
[package.dependencies]
core = ">=1"
uvicorn = {{version = ">=0.30", optional = true}}
[package.extras]
server = ["uvicorn (>=0.30)"]
[[package]]
name = "core"
version = "1.0"
optional = false
python-versions = "*"
[[package]]
name = "uvicorn"
version = "0.34.0"
optional = true
python-versions = "*"
[[package]]
name = "old"
version = "2.1"
optional = false
python-versions = "*"
[[package]]
name = "opt"
version = "9"
optional = true
python-versions = "*"
[metadata]
lock-version = "1.1"
python-versions = "^3.9"
content-hash = "x"
[metadata.files]
core = [{{file = "core-1.0.tar.gz", hash = "{SHA}"}}]
uvicorn = [{{file = "uvicorn-0.34.0-py3-none-any.whl", hash = "{SHA}"}}]
old = [{{file = "old-2.1-py3-none-any.whl", hash = "{SHA}"}}]
opt = [{{file = "opt-9-py3-none-any.whl", hash = "{SHA}"}}]
'''})
    found = plan(root, _opts())
    assert _pins(found.text or "") == ["core==1.0", 'old==2.1 ; python_version < "3.10"',
                                       "uvicorn==0.34.0", "web==1.5"]
    assert (found.dependencies, found.lock, found.style) == ("locked", "poetry.lock", "poetry")
    # The lock's metadata.files (lock-version 1.1) hold the hashes.
    assert "--require-hashes" in (found.text or "")
    # uvicorn came in through web[server]: the ASGI server is known, so main.py's app is served.
    (root / "main.py").write_text("from fastapi import FastAPI\napp = FastAPI()\n")
    assert _cmd(plan(root, _opts()).text or "")[1] == [
        "sh", "-c", "exec uvicorn main:app --host 0.0.0.0 --port $PORT"]
    assert "opt==9" in _pins(plan(root, _opts({"builder": {"pip": {"extras": ["all"]}}})).text or "")


def test_poetry1_without_lock_translates_constraints_and_installs_after_the_source(tmp_path: Path) -> None:
    root = _project(tmp_path / "p", {
        "pyproject.toml": '[tool.poetry]\nname="p"\nversion="1"\n'
                          '[tool.poetry.dependencies]\npython="^3.10"\nattrs="^25.1"\nsix="~1.16"\n'
                          'tool={git="https://example.com/tool.git", tag="v2"}\n'
                          '[tool.poetry.scripts]\np="p:main"\n'
                          '[build-system]\nrequires=["poetry-core"]\nbuild-backend="poetry.core.masonry.api"\n'})
    found = plan(root, _opts())
    text = found.text or ""
    assert (found.dependencies, found.lock) == ("resolved", None)
    run = next(line for line in text.replace("\\\n", " ").splitlines()
               if line.startswith('RUN ["python", "-m", "pip"') and "--no-deps" not in line)
    assert json.loads(run[4:])[-3:] == ["attrs<26,>=25.1", "six<1.17,>=1.16",
                                        "tool @ git+https://example.com/tool.git@v2"]
    assert 'RUN ["python", "-m", "pip", "install", "--no-cache-dir", "--no-deps", "."]' in text
    assert _cmd(text) == (["p"], [])
    # Python from ^3.10: the newest known minor it admits.
    assert _from(text) == f"python:{KNOWN_PYTHONS[-1]}-slim"


def test_pdm_lock_without_inherited_metadata_is_walked(tmp_path: Path) -> None:
    root = _project(tmp_path / "p", {
        "main.py": "",
        "pyproject.toml": '[project]\nname="p"\nversion="1"\ndependencies=["a[x]>=1"]\n',
        "pdm.lock": f'''[metadata]
groups = ["default"]
strategy = ["cross_platform"]
lock_version = "4.4"
[[package]]
name = "a"
version = "1.2"
dependencies = ["b; sys_platform == 'linux'"]
files = [{{file = "a-1.2-py3-none-any.whl", hash = "{SHA}"}}]
[[package]]
name = "a"
version = "1.2"
extras = ["x"]
dependencies = ["a==1.2", "c>=2"]
files = [{{file = "a-1.2-py3-none-any.whl", hash = "{SHA}"}}]
[[package]]
name = "b"
version = "0.9"
files = [{{file = "b-0.9-py3-none-any.whl", hash = "{SHA}"}}]
[[package]]
name = "c"
version = "2.0"
files = [{{file = "c-2.0-py3-none-any.whl", hash = "{SHA}"}}]
'''})
    assert _pins(plan(root, _opts()).text or "") == ["a==1.2", 'b==0.9 ; sys_platform == "linux"', "c==2.0"]


def test_pipfile_lock_installs_the_project_itself_after_the_source(tmp_path: Path) -> None:
    lock = {"_meta": {"sources": []},
            "default": {"six": {"version": "==1.17.0", "hashes": [SHA]},
                        "p": {"path": ".", "editable": True}},
            "develop": {"pytest": {"version": "==8.4.1", "hashes": [SHA]}}}
    root = _project(tmp_path / "p", {"Pipfile": '[packages]\nsix="*"\np={path=".", editable=true}\n',
                                     "Pipfile.lock": json.dumps(lock), "main.py": "",
                                     "setup.py": "from setuptools import setup\nsetup(name='p')\n"})
    text = plan(root, _opts()).text or ""
    assert _pins(text) == ["six==1.17.0"]
    assert 'RUN ["python", "-m", "pip", "install", "--no-cache-dir", "--no-deps", "."]' in text
    lock["default"]["six"]["version"] = ">=1"
    (root / "Pipfile.lock").write_text(json.dumps(lock))
    with pytest.raises(SourceError, match=r"Pipfile.lock six is not pinned"):
        plan(root, _opts())


def test_several_lockfiles_are_chosen_by_the_tool_or_refused(tmp_path: Path) -> None:
    root = _copy("poetry2", tmp_path)
    (root / "uv.lock").write_text("version = 1\n")
    assert plan(root, _opts()).lock == "poetry.lock"
    (root / "pyproject.toml").write_text((root / "pyproject.toml").read_text().replace(
        "[tool.poetry]\npackage-mode = false\n", "").replace("[tool.poetry.group.dev.dependencies]\n"
                                                             'pytest = "^8.0"\n', "").replace(
        'requires = ["poetry-core>=2.0.0,<3.0.0"]\nbuild-backend = "poetry.core.masonry.api"',
        'requires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"'))
    with pytest.raises(SourceError, match=r"several lockfiles \(uv.lock, poetry.lock\)"):
        plan(root, _opts())


# --- other styles -------------------------------------------------------------------------


def test_pipfile_without_lock_resolves_at_build_time(tmp_path: Path) -> None:
    root = _project(tmp_path / "p", {"app.py": "", "Pipfile": (
        '[packages]\nflask="*"\ngunicorn=">=21"\nrequests={version="==2.32.3", extras=["socks"]}\n'
        'pywin={version="*", sys_platform="== \'win32\'"}\n[requires]\npython_version="3.10"\n')})
    found = plan(root, _opts())
    assert (found.dependencies, found.style) == ("resolved", "pipenv")
    text = found.text or ""
    assert '"flask", "gunicorn>=21", "pywin ; sys_platform == \'win32\'", "requests[socks]==2.32.3"' \
        in text.replace("\\\n   ", "").replace(" \"", "\"").replace(",\"", ", \"")
    assert _from(text) == "python:3.10-slim"


def test_setup_py_static_requirements_go_before_the_source(tmp_path: Path) -> None:
    root = _copy("setup-py", tmp_path)
    text = generate(root, _opts())
    steps = text.splitlines()
    deps = steps.index('RUN ["python", "-m", "pip", "install", "--no-cache-dir", "six>=1.16"]')
    assert deps < steps.index("COPY --chown=10001:10001 . .")
    assert _cmd(text) == (["setup-only"], [])
    # Computed install_requires: only setup.py knows them, so the project brings them along.
    (root / "setup.py").write_text("from setuptools import setup\nreqs = open('r.txt').read().split()\n"
                                   "setup(name='x', install_requires=reqs)\n")
    (root / "main.py").write_text("")
    found = plan(root, _opts())
    assert found.dependencies == "resolved"
    assert 'RUN ["python", "-m", "pip", "install", "--no-cache-dir", "."]' in (found.text or "")


def test_setup_cfg_needs_a_build_entry_point(tmp_path: Path) -> None:
    root = _copy("setup-cfg", tmp_path)
    text = generate(root, _opts())
    assert 'RUN ["python", "-m", "pip", "install", "--no-cache-dir", "attrs>=25", "gunicorn>=23"]' in text
    (root / "pyproject.toml").unlink()
    with pytest.raises(SourceError, match=r"neither setup\.py nor pyproject\.toml"):
        plan(root, _opts())


def test_requirements_with_the_project_line_install_it_after_the_source(tmp_path: Path) -> None:
    root = _project(tmp_path / "p", {"main.py": "", "requirements.txt": "-r base.txt\n-e .\nsix==1.17\n",
                                     "base.txt": "attrs\n",
                                     "setup.py": "from setuptools import setup\nsetup(name='p')\n"})
    text = generate(root, _opts())
    assert 'COPY ["base.txt", "base.txt"]' in text
    assert _pins(text) == ["-r base.txt", "six==1.17"]
    assert "> /app/.buildq-requirements.txt" in text
    assert text.index("buildq-requirements") < text.index("COPY --chown") < text.index(
        'RUN ["python", "-m", "pip", "install", "--no-cache-dir", "."]')


# --- Python -------------------------------------------------------------------------------


@pytest.mark.parametrize(("files", "expected"), [
    ({".python-version": "cpython@3.11\n"}, "python:3.11-slim"),
    ({".python-version": "cpython-3.12.4-linux-x86_64-gnu\n"}, "python:3.12.4-slim"),
    ({".python-version": "system\npypy3.10\n"}, "pypy:3.10-slim"),
    ({".python-version": "pypy3.10-7.3.12\n"}, "pypy:3.10-slim"),
    ({"runtime.txt": "python-3.10.14\n", "Pipfile": '[requires]\npython_version="3.9"\n'},
     "python:3.10.14-slim"),
    ({"Pipfile": '[requires]\npython_version="3.9"\n',
      "pyproject.toml": '[project]\nname="x"\nversion="1"\nrequires-python=">=3.8"\n'}, "python:3.9-slim"),
    ({"pyproject.toml": '[tool.poetry]\nname="x"\nversion="1"\n[tool.poetry.dependencies]\n'
                        'python=">=3.8,<3.12"\n'}, "python:3.11-slim"),
])
def test_python_version_sources_in_order(tmp_path: Path, files: dict[str, str], expected: str) -> None:
    root = _project(tmp_path / "p", {"main.py": "", **files})
    text = generate(root, _opts())
    assert _from(text) == expected
    if expected.startswith("pypy"):
        assert 'RUN ["pypy3", "-m", "venv"' in text


@pytest.mark.parametrize(("version", "message"), [
    ("3.13t", "free-threaded"),
    ("3.12-dev", "no official image"),
    ("miniconda3-latest", "not a CPython or PyPy version"),
    ("3", "without a minor version"),
    ("2.7.18", "need Python 3"),
    ("pypy3.7", "official pypy images exist for"),
])
def test_python_versions_without_an_image_are_refused(tmp_path: Path, version: str, message: str) -> None:
    root = _project(tmp_path / "p", {"main.py": "", ".python-version": f"{version}\n"})
    with pytest.raises(SourceError, match=message):
        generate(root, _opts())
    # An explicit --python or a fixed base does not read the file at all.
    assert _from(generate(root, _opts(python="3.11"))) == "python:3.11-slim"


def test_pypy_on_a_cpython_base_template_is_refused(tmp_path: Path) -> None:
    root = _project(tmp_path / "p", {"main.py": "", ".python-version": "pypy3.10\n"})
    with pytest.raises(SourceError, match="is a CPython image by version"):
        generate(root, _opts({"builder": {"base-image": "mirror.example.com/python:{python}-slim"}}))


# --- the start command --------------------------------------------------------------------


def test_procfile_web_process_else_the_only_one(tmp_path: Path) -> None:
    root = _project(tmp_path / "p", {"requirements.txt": "gunicorn\n", "app.py": "",
                                     "Procfile": "release: ./migrate\nweb: gunicorn app:app -w 2\n"
                                                 "worker: celery -A tasks worker\n"})
    text = generate(root, _opts())
    assert _cmd(text) == (None, ["sh", "-c", "exec gunicorn app:app -w 2"])
    assert "PORT=8080" in text and "EXPOSE 8080" in text
    (root / "Procfile").write_text("worker: python worker.py && echo done\n")
    text = generate(root, _opts())
    # Shell syntax is kept as written (no exec in front of a compound command).
    assert _cmd(text) == (None, ["sh", "-c", "python worker.py && echo done"])
    assert "EXPOSE" not in text
    (root / "Procfile").write_text("worker: a\nclock: b\n")
    with pytest.raises(SourceError, match=r"several processes \(clock, worker\) and no web process"):
        generate(root, _opts())


def test_django_is_served_by_the_server_among_its_dependencies(tmp_path: Path) -> None:
    manage = "import os\nos.environ.setdefault('DJANGO_SETTINGS_MODULE', 'site_conf.settings.prod')\n"
    root = _project(tmp_path / "p", {"manage.py": manage, "site_conf/__init__.py": "",
                                     "site_conf/settings/prod.py": "", "site_conf/wsgi.py": "",
                                     "site_conf/asgi.py": "", "requirements.txt": "django\ngunicorn\n"})
    assert _cmd(generate(root, _opts())) == (
        None, ["sh", "-c", "exec gunicorn site_conf.wsgi --bind 0.0.0.0:$PORT"])
    (root / "requirements.txt").write_text("django\nuvicorn\n")
    assert _cmd(generate(root, _opts()))[1][2] == \
        "exec uvicorn site_conf.asgi:application --host 0.0.0.0 --port $PORT"
    (root / "requirements.txt").write_text("django\n")
    with pytest.raises(SourceError, match="runserver is not a production server"):
        generate(root, _opts())


@pytest.mark.parametrize(("code", "requirements", "command"), [
    ("from fastapi import FastAPI\napp = FastAPI()\n", "fastapi\nuvicorn\n",
     "exec uvicorn main:app --host 0.0.0.0 --port $PORT"),
    ("import flask\napp = flask.Flask(__name__)\n", "flask\ngunicorn\n",
     "exec gunicorn main:app --bind 0.0.0.0:$PORT"),
    ("import flask\napp = flask.Flask(__name__)\n", "flask\nuvicorn\n",
     "exec uvicorn main:app --interface wsgi --host 0.0.0.0 --port $PORT"),
    ("async def app(scope, receive, send):\n    pass\n", "hypercorn\n",
     "exec hypercorn main:app --bind 0.0.0.0:$PORT"),
])
def test_app_objects_get_the_matching_server(tmp_path: Path, code: str, requirements: str,
                                             command: str) -> None:
    root = _project(tmp_path / "p", {"main.py": code, "requirements.txt": requirements})
    assert _cmd(generate(root, _opts())) == (None, ["sh", "-c", command])


def test_a_web_app_without_a_server_is_refused_not_run_on_localhost(tmp_path: Path) -> None:
    root = _project(tmp_path / "p", {"app.py": "from flask import Flask\napp = Flask(__name__)\n"
                                               "if __name__ == '__main__':\n    app.run()\n",
                                     "requirements.txt": "flask\n"})
    with pytest.raises(SourceError, match=r"app.py defines an WSGI app \(app\), but no server") as err:
        generate(root, _opts())
    assert "gunicorn" in (err.value.hint or "")
    # A Typer app is a command line, not a web app: run the script.
    (root / "app.py").write_text("import typer\napp = typer.Typer()\n")
    assert _cmd(generate(root, _opts())) == (None, ["python", "app.py"])


def test_a_console_script_and_a_web_app_together_are_ambiguous(tmp_path: Path) -> None:
    root = _project(tmp_path / "p", {
        "main.py": "from fastapi import FastAPI\napp = FastAPI()\n",
        "pyproject.toml": '[project]\nname="p"\nversion="1"\ndependencies=["fastapi", "uvicorn"]\n'
                          '[project.scripts]\nhello="p:main"\n'
                          '[build-system]\nrequires=["hatchling"]\nbuild-backend="hatchling.build"\n'})
    with pytest.raises(SourceError, match=r"console script \(hello\) and serves the ASGI app in main.py"):
        generate(root, _opts())
    assert _cmd(generate(root, _opts(entrypoint="hello --loud"))) == (None, ["hello", "--loud"])


def test_python_dash_m_for_a_package_with_dunder_main(tmp_path: Path) -> None:
    root = _project(tmp_path / "p", {"trainer/__init__.py": "", "trainer/__main__.py": "",
                                     "tests/__main__.py": "", "requirements.txt": "six\n"})
    assert _cmd(generate(root, _opts())) == (None, ["python", "-m", "trainer"])


# --- W&B jobs -----------------------------------------------------------------------------


def test_wandb_job_uses_its_runtime_frozen_requirements_and_entrypoint(tmp_path: Path) -> None:
    root = _copy("wandb-job", tmp_path)
    found = plan(root, _opts())
    text = found.text or ""
    assert (found.dependencies, found.lock, found.job) == ("locked", "requirements.frozen.txt",
                                                           "wandb-job.json")
    assert _from(text) == "python:3.11-slim"
    assert 'RUN ["python", "-m", "pip", "install", "--no-cache-dir", "--no-deps", "-r", ' \
           '"requirements.frozen.txt"]' in text
    # The run's "python3.11" is the venv's python; the job's args follow.
    assert _cmd(text) == (None, ["python", "train.py", "--epochs", "2"])
    # On a fixed base the job's Python is checked at build time instead.
    fixed = generate(root, _opts({"builder": {"base-image": "example.com/py:prod"}}))
    assert "sys.version_info" in fixed and "the job ran on Python 3.11" in fixed
    assert _from(generate(root, _opts(python="3.12"))) == "python:3.12-slim"


@pytest.mark.parametrize(("change", "message"), [
    ({"source_type": "image", "source": {"image": "reg.example.com/team/job:v1"}},
     r"image job \(reg.example.com/team/job:v1\).*image:reg.example.com/team/job:v1"),
    ({"source": {"entrypoint": ["python", "x.ipynb"], "notebook": True}}, "notebook job"),
    ({"source": {"entrypoint": ["python3.11", "missing.py"]}}, "starts missing.py, which is not"),
    ({"source": {"dockerfile": "Dockerfile.gpu"}}, "names the Dockerfile 'Dockerfile.gpu'"),
    ({"source": {"build_context": "../up"}}, "not inside the project"),
    ({"runtime": "Python three"}, "is not a Python version"),
    ({"source_type": "nope"}, "has no source_type"),
])
def test_wandb_job_mistakes_are_refused_with_what_to_do(tmp_path: Path, change: dict[str, object],
                                                        message: str) -> None:
    root = _copy("wandb-job", tmp_path)
    job = json.loads((root / "wandb-job.json").read_text())
    job.update(change)
    (root / "wandb-job.json").write_text(json.dumps(job))
    with pytest.raises(SourceError, match=message):
        plan(root, _opts())


def test_wandb_job_refuses_uncommitted_changes_and_machine_local_pins(tmp_path: Path) -> None:
    root = _copy("wandb-job", tmp_path)
    (root / "diff.patch").write_text("--- a/train.py\n+++ b/train.py\n@@ -1 +1 @@\n-a\n+b\n")
    with pytest.raises(SourceError, match="uncommitted changes"):
        plan(root, _opts())
    (root / "diff.patch").write_text("")
    (root / "requirements.frozen.txt").write_text("attrs==25.3.0\ncertifi @ file:///croot/certifi_1700/work\n")
    with pytest.raises(SourceError, match=r"installs 'certifi' from file:///croot"):
        plan(root, _opts())


#: Bases named by tag (tests/conftest.py): the base images here are local, not in a registry.
LOCAL_BASES = Settings.from_env({"BUILDQ_BASE_POLICY": "tag"})


def test_wandb_job_with_its_own_dockerfile_builds_that_context(tmp_path: Path) -> None:
    root = _copy("wandb-job-dockerfile", tmp_path)
    state, _, _ = describe_request("r", str(root), LOCAL_BASES, destination=None, ref=None,
                                   dockerfile=None, build_args=None, target=None, platform=None,
                                   config={})
    hash_tree(state, root, LOCAL_BASES)
    assert state.generated_dockerfile is None
    assert state.generated == {"dockerfile": "Dockerfile.train", "context": "trainer",
                               "dependencies": None, "lock": None, "job": "wandb-job.json",
                               "style": "wandb job", "ignore": [], "warnings": []}
    from tasks.operations import build_inputs

    inputs = build_inputs(state)
    out = io.BytesIO()
    write_context(root, inputs, out)
    with tarfile.open(fileobj=io.BytesIO(out.getvalue()), mode="r:gz") as tar:
        assert sorted(tar.getnames()) == ["Dockerfile.train", "run.sh"]
    # Files outside the build context do not move the tag.
    before = state.source_hash
    (root / "notes.txt").write_text("changed\n")
    state.generated = None
    assert hash_tree(state, root, LOCAL_BASES) == before
    state.status = "built"
    assert make_record(state)["job"] == "wandb-job.json"


# --- the default .dockerignore ------------------------------------------------------------


def _tag(root: Path) -> str:
    state, _, _ = describe_request("r", str(root), LOCAL_BASES, destination=None, ref=None,
                                   dockerfile=None, build_args=None, target=None, platform=None,
                                   config={"builder": {"entrypoint": "python main.py"}})
    return hash_tree(state, root, LOCAL_BASES)


def test_default_dockerignore_keeps_local_state_out_of_the_tag_and_the_image(tmp_path: Path) -> None:
    root = _project(tmp_path / "p", {"main.py": "print(1)\n", "requirements.txt": "six\n",
                                     ".git/HEAD": "ref: refs/heads/main\n", ".venv/bin/python": "",
                                     "pkg/__pycache__/m.cpython-311.pyc": "x", ".env": "TOKEN=s3cret\n",
                                     "config/.env.production": "TOKEN=x\n", ".coverage": "",
                                     "node_modules/x/index.js": "", "dist/p-1.tar.gz": ""})
    tag = _tag(root)
    for rel in (".git/HEAD", ".venv/bin/python", ".env", "pkg/__pycache__/m.cpython-311.pyc",
                ".pytest_cache/v/x", "build/lib/x.py"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("changed\n")
        assert _tag(root) == tag, rel
    state, _, _ = describe_request("r", str(root), LOCAL_BASES, destination=None, ref=None,
                                   dockerfile=None, build_args=None, target=None, platform=None,
                                   config={"builder": {"entrypoint": "python main.py"}})
    hash_tree(state, root, LOCAL_BASES)
    from tasks.operations import build_inputs

    out = io.BytesIO()
    write_context(root, build_inputs(state), out)
    with tarfile.open(fileobj=io.BytesIO(out.getvalue()), mode="r:gz") as tar:
        names = tar.getnames()
    assert sorted(n for n in names if "/" not in n) == ["Dockerfile", "config", "main.py", "pkg",
                                                        "requirements.txt"]
    assert "config/.env.production" not in names and "pkg/__pycache__" not in names
    assert "buildq's default .dockerignore" in (state.generated_dockerfile or "")
    (root / "main.py").write_text("print(2)\n")
    assert _tag(root) != tag


def test_the_projects_own_dockerignore_wins_and_a_shipped_env_is_warned_about(tmp_path: Path) -> None:
    root = _project(tmp_path / "p", {"main.py": "", ".env": "TOKEN=s3cret\n", ".dockerignore": ".git\n"})
    found = plan(root, _opts())
    assert found.ignore == ()
    assert found.warnings == (".env is copied into the image: the project's .dockerignore lets it "
                              "through (a .env file usually holds secrets).",)
    assert "# Warning: .env is copied into the image" in (found.text or "")
    (root / ".dockerignore").write_text(".env\n")
    assert plan(root, _opts()).warnings == ()


def test_a_configured_wheelhouse_is_kept_even_where_the_default_ignores(tmp_path: Path) -> None:
    root = _project(tmp_path / "p", {"main.py": "", "requirements.txt": "six\n",
                                     "dist/six-1.17.0-py2.py3-none-any.whl": "x"})
    found = plan(root, _opts({"builder": {"pip": {"wheels": "dist"}}}))
    assert "!dist" in found.ignore
    inputs = BuildInputs.create(None, None, None, None, dockerfile_text=found.text,
                                default_ignore=found.ignore)
    out = io.BytesIO()
    write_context(root, inputs, out)
    with tarfile.open(fileobj=io.BytesIO(out.getvalue()), mode="r:gz") as tar:
        assert "dist/six-1.17.0-py2.py3-none-any.whl" in tar.getnames()


def test_extras_key_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"builder\.pip\.extras"):
        config_from_mapping({"builder": {"pip": {"extras": ["not ok!"]}}})
    with pytest.raises(InputError):
        PythonOptions.create(None, entrypoint="")


def test_every_corpus_project_generates_the_same_text_twice(tmp_path: Path) -> None:
    for project in sorted(p.name for p in PROJECTS.iterdir()):
        root = _copy(project, tmp_path)
        options = _opts({"builder": {"pip": {"extras": ["server"]}}} if project == "hatch-extras" else None)
        assert plan(root, options) == plan(root, options), project


def _uv_project(root: Path, wheels: list[str]) -> Path:
    listed = ", ".join(f'{{ url = "https://x/{w}", hash = "sha256:{i + 1:064x}" }}'
                       for i, w in enumerate(wheels))
    return _project(root, {
        "main.py": "",
        "pyproject.toml": '[project]\nname="p"\nversion="1"\nrequires-python=">=3.9"\n'
                          'dependencies=["fast"]\n',
        "uv.lock": f'version = 1\n[[package]]\nname = "p"\nversion = "1"\nsource = {{ virtual = "." }}\n'
                   f'dependencies = [{{ name = "fast" }}]\n[[package]]\nname = "fast"\nversion = "1.0"\n'
                   f'source = {{ registry = "https://pypi.org/simple" }}\n'
                   f'sdist = {{ url = "https://x/fast-1.0.tar.gz", hash = "{SHA}" }}\nwheels = [{listed}]\n'})


def test_a_range_picks_the_newest_python_the_locks_wheels_are_built_for(tmp_path: Path) -> None:
    compiled = _uv_project(tmp_path / "a", ["fast-1.0-cp311-cp311-manylinux_2_17_x86_64.whl",
                                            "fast-1.0-cp312-cp312-manylinux_2_17_x86_64.whl",
                                            "fast-1.0-cp313-cp313-win_amd64.whl"])
    text = generate(compiled, _opts())
    assert _from(text) == "python:3.12-slim"
    assert "Python 3.12 from pyproject.toml requires-python and the lock's wheels" in text
    # The Windows wheel's hash is of no use in a Linux image; the sdist's and the others' stay.
    assert f"sha256:{3:064x}" not in text
    assert all(h in text for h in (SHA, f"sha256:{1:064x}", f"sha256:{2:064x}"))
    stable_abi = _uv_project(tmp_path / "b", ["fast-1.0-cp39-abi3-manylinux_2_17_x86_64.whl"])
    assert _from(generate(stable_abi, _opts())) == f"python:{KNOWN_PYTHONS[-1]}-slim"
    pure = _uv_project(tmp_path / "c", ["fast-1.0-py3-none-any.whl"])
    assert _from(generate(pure, _opts())) == f"python:{KNOWN_PYTHONS[-1]}-slim"


def test_extra_clauses_of_lock_markers_do_not_hide_chosen_extras(tmp_path: Path) -> None:
    root = _project(tmp_path / "p", {
        "main.py": "",
        "pyproject.toml": '[tool.poetry]\nname="p"\nversion="1"\npackage-mode=false\n'
                          '[tool.poetry.dependencies]\npython="^3.9"\nreq={version="^2", extras=["socks"]}\n',
        "poetry.lock": f'''[[package]]
name = "req"
version = "2.32.3"
optional = false
python-versions = "*"
files = [{{file = "req-2.32.3-py3-none-any.whl", hash = "{SHA}"}}]
[package.dependencies]
socks = {{version = ">=1", optional = true, markers = "extra == \\"socks\\" and sys_platform != \\"win32\\""}}
[package.extras]
socks = ["socks (>=1)"]
[[package]]
name = "socks"
version = "1.7.1"
optional = true
python-versions = "*"
files = [{{file = "socks-1.7.1-py3-none-any.whl", hash = "{SHA}"}}]
[metadata]
lock-version = "2.0"
python-versions = "^3.9"
content-hash = "x"
'''})
    # pip takes every "extra == ..." in a requirements file as false: it must not be there.
    assert _pins(generate(root, _opts())) == ["req==2.32.3", 'socks==1.7.1 ; sys_platform != "win32"']


def test_the_project_line_keeps_its_extras(tmp_path: Path) -> None:
    root = _project(tmp_path / "p", {"main.py": "", "requirements.txt": "-e .[web]\nsix\n",
                                     "setup.py": "from setuptools import setup\nsetup(name='p')\n"})
    assert 'RUN ["python", "-m", "pip", "install", "--no-cache-dir", ".[web]"]' in generate(root, _opts())
