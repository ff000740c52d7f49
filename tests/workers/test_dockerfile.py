"""The generated Dockerfile: what it is made of, where its choices come from, its errors."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import pytest

from config import config_from_mapping
from config.errors import ConfigError, InputError, SourceError
from workers.context import BuildInputs, source_hash, write_context
from workers.dockerfile import (
    APP_UID,
    DEFAULT_PYTHON,
    KNOWN_PYTHONS,
    PythonOptions,
    dockerfile_for,
    generate,
)


def _project(root: Path, files: dict[str, str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def _opts(config: dict[str, object] | None = None, **kwargs: object) -> PythonOptions:
    cfg = config_from_mapping(config) if config is not None else None
    return PythonOptions.create(cfg, **kwargs)  # type: ignore[arg-type]


def _from(text: str) -> str:
    return next(line.split(" ", 1)[1] for line in text.splitlines() if line.startswith("FROM "))


def _instructions(text: str) -> list[str]:
    """Instruction lines (continuations folded in), comments and blanks dropped."""
    out: list[str] = []
    for line in text.replace("\\\n", " ").splitlines():
        if line.strip() and not line.startswith("#"):
            out.append(line)
    return out


def test_requirements_layer_comes_before_the_source(tmp_path: Path) -> None:
    root = _project(tmp_path / "p", {"train.py": "print(1)\n", "requirements.txt": "numpy\n"})
    text = generate(root, _opts(entrypoint="python train.py --lr '0.1 0.2'"))
    steps = _instructions(text)
    copy_reqs = steps.index('COPY ["requirements.txt", "requirements.txt"]')
    pip = next(i for i, s in enumerate(steps) if s.startswith("RUN") and "-r" in s)
    copy_src = steps.index(f"COPY --chown={APP_UID}:{APP_UID} . .")
    assert copy_reqs < pip < copy_src
    assert json.loads(steps[pip][4:]) == ["python", "-m", "pip", "install", "--no-cache-dir", "-r",
                                         "requirements.txt"]
    assert "PIP_NO_CACHE_DIR=1" in text
    assert steps[-2] == f"USER {APP_UID}:{APP_UID}"
    # Exec form, split like a shell: the quoted argument stays one argument.
    assert json.loads(steps[-1].removeprefix("CMD ")) == ["python", "train.py", "--lr", "0.1 0.2"]
    assert "WORKDIR /app" in steps
    assert text.endswith("\n") and "\r" not in text


def test_included_requirement_files_are_copied_and_local_paths_refused(tmp_path: Path) -> None:
    root = _project(tmp_path / "p", {"main.py": "", "requirements.txt": "-r reqs/base.txt\nsix\n",
                                     "reqs/base.txt": "-c constraints.txt\nattrs\n",
                                     "reqs/constraints.txt": "attrs<30\n"})
    text = generate(root, _opts())
    for rel in ("requirements.txt", "reqs/base.txt", "reqs/constraints.txt"):
        assert f'COPY ["{rel}", "{rel}"]' in text
    (root / "requirements.txt").write_text("six\n-e ./libs/helper\n")
    with pytest.raises(SourceError, match=r"requirements.txt line 2 installs from the project's files"):
        generate(root, _opts())
    (root / "requirements.txt").write_text("six\nwheel @ file:///home/me/wheel-0.1.whl\n")
    with pytest.raises(SourceError, match=r"line 2 installs 'wheel' from file:"):
        generate(root, _opts())
    (root / "requirements.txt").write_text("-r ../outside.txt\n")
    with pytest.raises(SourceError, match="outside the project"):
        generate(root, _opts())
    (root / "requirements.txt").write_text("-r missing.txt\n")
    with pytest.raises(SourceError, match=r"missing\.txt"):
        generate(root, _opts())


@pytest.mark.parametrize(("files", "expected"), [
    ({".python-version": "3.11.4\n", "runtime.txt": "python-3.9.1"}, "3.11.4"),
    ({".python-version": "# pyenv\n3.10\n"}, "3.10"),
    ({"pyproject.toml": '[project]\nname="x"\nversion="1"\nrequires-python=">=3.9"\n'},
     KNOWN_PYTHONS[-1]),
    ({"pyproject.toml": '[project]\nname="x"\nversion="1"\nrequires-python=">=3.8,<3.11"\n'},
     "3.10"),
    ({"pyproject.toml": '[project]\nname="x"\nversion="1"\nrequires-python="~=3.13"\n'},
     KNOWN_PYTHONS[-1]),
    ({"pyproject.toml": '[project]\nname="x"\nversion="1"\nrequires-python="~=3.10.2"\n'}, "3.10"),
    ({"runtime.txt": "python-3.9.18\n"}, "3.9.18"),
    ({}, DEFAULT_PYTHON),
])
def test_python_version_from_the_project(tmp_path: Path, files: dict[str, str],
                                         expected: str) -> None:
    root = _project(tmp_path / "p", {"main.py": "", **files})
    text = generate(root, _opts())
    assert _from(text) == f"python:{expected}-slim"
    # --python overrides whatever the project says.
    assert _from(generate(root, _opts(python="3.8"))) == "python:3.8-slim"


def test_requires_python_nothing_known_fits(tmp_path: Path) -> None:
    root = _project(tmp_path / "p", {"main.py": "", "pyproject.toml":
                                     '[project]\nname="x"\nversion="1"\nrequires-python="<3"\n'})
    with pytest.raises(SourceError, match="admits none"):
        generate(root, _opts())
    assert _from(generate(root, _opts(python="3.11"))) == "python:3.11-slim"


def test_bad_python_option() -> None:
    with pytest.raises(InputError, match="not a Python version"):
        _opts(python="latest")


def test_configured_bases(tmp_path: Path) -> None:
    root = _project(tmp_path / "p", {"main.py": "", ".python-version": "3.11\n"})
    fixed = {"builder": {"base-image": "registry.example.com/base/python:prod"}}
    assert _from(generate(root, _opts(fixed))) == "registry.example.com/base/python:prod"
    with pytest.raises(InputError, match=re.escape("--python 3.10 cannot change builder.base-image")):
        generate(root, _opts(fixed, python="3.10"))
    mirror = {"builder": {"base-image": "mirror.example.com/python:{python}-slim"}}
    assert _from(generate(root, _opts(mirror))) == "mirror.example.com/python:3.11-slim"
    assert _from(generate(root, _opts(mirror, python="3.12"))) == "mirror.example.com/python:3.12-slim"
    gpu = {"builder": {"base-image": "plain:1",
                       "accelerator": {"base-image": "example.com/cuda-python:12.4"}}}
    assert _from(generate(root, _opts(gpu, gpu=True))) == "example.com/cuda-python:12.4"
    assert _from(generate(root, _opts(gpu))) == "plain:1"
    with pytest.raises(ConfigError, match=re.escape("builder.accelerator.base-image is not set")):
        generate(root, _opts(fixed, gpu=True))


def test_pyproject_dependencies_layer_and_project_install(tmp_path: Path) -> None:
    root = _project(tmp_path / "p", {"pyproject.toml": (
        '[build-system]\nrequires=["setuptools"]\nbuild-backend="setuptools.build_meta"\n'
        '[project]\nname="x"\nversion="1"\ndependencies=["torch>=2", "attrs"]\n'
        '[project.scripts]\nx-train="x:main"\n')})
    steps = _instructions(generate(root, _opts()))
    runs = [json.loads(s[4:]) for s in steps if s.startswith('RUN ["python", "-m", "pip"')]
    # Sorted: reordering the list in pyproject.toml must not rebuild the layer.
    assert runs[0][-2:] == ["attrs", "torch>=2"]
    assert runs[1][-2:] == ["--no-deps", "."]
    copy_src = steps.index(f"COPY --chown={APP_UID}:{APP_UID} . .")
    assert steps.index('RUN ' + json.dumps(runs[0])) < copy_src < steps.index('RUN ' + json.dumps(runs[1]))
    # The one console script is the entrypoint, and arguments go to it.
    assert steps[-2:] == ['ENTRYPOINT ["x-train"]', "CMD []"]


def test_pyproject_with_dynamic_dependencies_installs_after_the_source(tmp_path: Path) -> None:
    root = _project(tmp_path / "p", {"train.py": "", "pyproject.toml": (
        '[project]\nname="x"\nversion="1"\ndynamic=["dependencies"]\n')})
    steps = _instructions(generate(root, _opts()))
    runs = [s for s in steps if s.startswith('RUN ["python", "-m", "pip"')]
    assert runs == ['RUN ["python", "-m", "pip", "install", "--no-cache-dir", "."]']
    assert steps.index(runs[0]) > steps.index(f"COPY --chown={APP_UID}:{APP_UID} . .")
    assert steps[-1] == 'CMD ["python", "train.py"]'


def test_wheels_and_index_from_config(tmp_path: Path) -> None:
    root = _project(tmp_path / "p", {"main.py": "", "requirements.txt": "greet\n",
                                     "wheels/greet-1.0-py3-none-any.whl": "x"})
    offline = generate(root, _opts({"builder": {"pip": {"wheels": "wheels/"}}}))
    assert 'COPY ["wheels", "wheels"]' in offline
    assert '"--find-links", "wheels", "--no-index", "-r"' in offline
    both = generate(root, _opts({"builder": {"pip": {
        "wheels": "wheels", "index-url": "https://pypi.example.com/simple",
        "extra-index-urls": ["https://extra.example.com/simple"]}}}))
    assert "--no-index" not in both
    assert '"--index-url", "https://pypi.example.com/simple", "--extra-index-url", ' \
           '"https://extra.example.com/simple"' in both
    with pytest.raises(SourceError, match="not a directory in the project"):
        generate(root, _opts({"builder": {"pip": {"wheels": "dist"}}}))


@pytest.mark.parametrize("key", ["index-url", "extra-index-urls"])
def test_index_url_with_credentials_is_refused_without_echoing_them(key: str) -> None:
    url = "https://alice:s3cret-token@pypi.example.com/simple"
    value: object = [url] if key == "extra-index-urls" else url
    with pytest.raises(ConfigError) as err:
        config_from_mapping({"builder": {"pip": {key: value}}})
    assert "credentials" in str(err.value) and "build secret" in str(err.value)
    assert "s3cret" not in str(err.value)
    with pytest.raises(ConfigError, match=r"expected an http\(s\):// index URL"):
        config_from_mapping({"builder": {"pip": {"index-url": "ftp://x/simple"}}})


def test_config_keys_are_validated() -> None:
    cfg = config_from_mapping({"builder": {
        "base-image": "python:{python}-slim", "entrypoint": ["python", "-m", "app"],
        "accelerator": {"base-image": "nvcr.io/nvidia/pytorch:24.01-py3"},
        "pip": {"wheels": "wheels"}}})
    assert cfg.builder.accelerator is not None
    assert cfg.to_mapping()["builder"]["accelerator"] == {"base-image": "nvcr.io/nvidia/pytorch:24.01-py3"}
    for bad, message in [
        ({"base-image": "Not An Image!"}, "builder.base-image"),
        ({"entrypoint": "python 'unclosed"}, "builder.entrypoint"),
        ({"entrypoint": []}, "builder.entrypoint"),
        ({"pip": {"wheels": "../wheels"}}, "builder.pip.wheels"),
        ({"pip": {"index": "x"}}, "builder.pip"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            config_from_mapping({"builder": bad})


def test_entrypoint_from_config_and_inferred(tmp_path: Path) -> None:
    root = _project(tmp_path / "p", {"train.py": ""})
    assert generate(root, _opts()).endswith('CMD ["python", "train.py"]\n')
    cfg = {"builder": {"entrypoint": "python -m trainer"}}
    assert generate(root, _opts(cfg)).endswith('CMD ["python", "-m", "trainer"]\n')
    # The request's option beats the config.
    assert generate(root, _opts(cfg, entrypoint=["python", "x.py"])).endswith(
        'CMD ["python", "x.py"]\n')


def test_nothing_to_start_says_what_to_add(tmp_path: Path) -> None:
    root = _project(tmp_path / "p", {"lib.py": "", "requirements.txt": "six\n"})
    with pytest.raises(SourceError) as err:
        generate(root, _opts())
    assert "cannot tell how to start it" in err.value.message
    assert "--entrypoint" in (err.value.hint or "") and "Dockerfile" in (err.value.hint or "")
    _project(root, {"main.py": "", "train.py": ""})
    with pytest.raises(SourceError, match=r"several candidates \(main.py, train.py\)"):
        generate(root, _opts())
    with pytest.raises(InputError, match="empty"):
        _opts(entrypoint="  ")


def test_a_project_with_a_dockerfile_is_left_alone(tmp_path: Path) -> None:
    root = _project(tmp_path / "p", {"main.py": "", "Dockerfile": "FROM scratch\n"})
    assert dockerfile_for(root, None, _opts()) is None
    bare = _project(tmp_path / "bare", {"main.py": ""})
    # A named Dockerfile is never replaced by a generated one, even if it is missing.
    assert dockerfile_for(bare, "docker/Dockerfile", _opts()) is None
    assert dockerfile_for(bare, None, _opts()) == generate(bare, _opts())


def test_symlinked_project_file_outside_the_project_is_refused(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("numpy\n")
    root = _project(tmp_path / "p", {"main.py": ""})
    (root / "requirements.txt").symlink_to(tmp_path / "secret")
    with pytest.raises(SourceError, match="outside the project"):
        generate(root, _opts())


# --- the generated Dockerfile in the context --------------------------------------------


def _members(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return {m.name: (tar.extractfile(m).read() if m.isfile() else b"")  # type: ignore[union-attr]
                for m in tar.getmembers()}


def test_context_carries_the_generated_dockerfile_and_the_tree_is_untouched(tmp_path: Path) -> None:
    root = _project(tmp_path / "p", {"train.py": "print(1)\n", "requirements.txt": "six\n"})
    before = sorted(p.name for p in root.iterdir())
    text = generate(root, _opts())
    inputs = BuildInputs.create(None, None, None, None, dockerfile_text=text)
    out = io.BytesIO()
    write_context(root, inputs, out)
    members = _members(out.getvalue())
    assert members["Dockerfile"] == text.encode()
    assert members["train.py"] == b"print(1)\n"
    assert sorted(p.name for p in root.iterdir()) == before
    # Deterministic bytes, and the hash moves with the text.
    again = io.BytesIO()
    write_context(root, inputs, again)
    assert again.getvalue() == out.getvalue()
    other = BuildInputs.create(None, None, None, None, dockerfile_text=text + "# x\n")
    assert source_hash(root, inputs) == source_hash(root, inputs)
    assert source_hash(root, inputs) != source_hash(root, other)


def test_virtual_dockerfile_replaces_a_file_of_its_name(tmp_path: Path) -> None:
    root = _project(tmp_path / "p", {"main.py": "", "Dockerfile": "FROM old\n"})
    inputs = BuildInputs.create(None, None, None, None, dockerfile_text="FROM new\n")
    out = io.BytesIO()
    write_context(root, inputs, out)
    with tarfile.open(fileobj=io.BytesIO(out.getvalue()), mode="r:gz") as tar:
        names = [m.name for m in tar.getmembers()]
    assert names.count("Dockerfile") == 1
    assert _members(out.getvalue())["Dockerfile"] == b"FROM new\n"


def test_shipping_a_source_without_dockerfile(tmp_path: Path) -> None:
    root = _project(tmp_path / "p", {"main.py": ""})
    inputs = BuildInputs.create(None, None, None, None)
    with pytest.raises(SourceError, match="no Dockerfile"):
        write_context(root, inputs, io.BytesIO())
    out = io.BytesIO()
    write_context(root, inputs, out, require_dockerfile=False)
    assert set(_members(out.getvalue())) == {"main.py"}
