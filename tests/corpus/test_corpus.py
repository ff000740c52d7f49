"""The bad-input corpus: every file in ``cases/`` through the real ``buildq build``.

Each case must end with its exit code (2 for bad input, 1 for a build that ran and
failed), one short paragraph that names the problem and the fix, no traceback, and
nothing left in the scratch workdir or context store. A good build runs beside the whole
corpus on the same Docker Engine and registry, and must come out built and pushed.

Runs are the CLI in embedded mode (no Redis), each in a fork of one warm interpreter
(see ``forkserver.py``; ``BUILDQ_CORPUS_FRESH=1`` starts a new process per case): config
and source cases fail before anything is built, so the corpus stays fast.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests import services
from tests.corpus.recipes import Case, Materialiser, load_cases
from tests.tasks.test_embedded import REPO, Run, embedded_env, leftovers, make_app, run_buildq

CASES = load_cases()
#: Prefixes of the lines a user reads about the problem.
MESSAGE_PREFIXES = ("error: ", "hint: ", "failed: ")


def test_the_corpus_is_big_enough_and_covers_every_group() -> None:
    assert len(CASES) >= 40, len(CASES)
    groups = {c.group for c in CASES}
    assert {"config", "source", "dockerfile", "destination", "kaniko-config"} <= groups, groups


Runner = Callable[[list[str], dict[str, str], Path], Run]


@pytest.fixture(scope="module")
def run_cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runner]:
    """How a case runs ``buildq``: a fork of the warm server, or a fresh process."""
    if os.environ.get("BUILDQ_CORPUS_FRESH"):
        yield lambda args, env, _: run_buildq(args, env, timeout=120)
        return
    home = tmp_path_factory.mktemp("forkserver")
    server = subprocess.Popen([sys.executable, "-m", "tests.corpus.forkserver"],
                              env=embedded_env(home), cwd=REPO, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    stdin, stdout = server.stdin, server.stdout
    assert stdin is not None and stdout is not None

    def run(args: list[str], env: dict[str, str], scratch: Path) -> Run:
        out, err = scratch / "cli.stdout", scratch / "cli.stderr"
        request = {"args": args, "env": env, "cwd": str(REPO), "timeout": 120,
                   "stdout": str(out), "stderr": str(err)}
        stdin.write(json.dumps(request) + "\n")
        stdin.flush()
        code = json.loads(stdout.readline())["code"]
        run = Run(code, out.read_text(errors="replace"), err.read_text(errors="replace"))
        out.unlink()
        err.unlink()
        return run

    yield run
    stdin.close()
    server.wait(30)


@dataclass
class GoodBuild:
    proc: subprocess.Popen[str]
    root: Path
    repo: str
    started: float


@pytest.fixture(scope="module")
def good_build(tmp_path_factory: pytest.TempPathFactory, registry: services.RegistryServer,
               docker_engine: str) -> Iterator[GoodBuild]:
    """A normal build started before the first case and checked after the last one."""
    base_image = docker_engine  # the session fixture's value is the base image's name
    root = tmp_path_factory.mktemp("corpus-good")
    # The sleep keeps it running while the engine-bound cases (failing RUN, missing base,
    # syntax errors) build and fail on the same engine.
    app = make_app(root / "src", base_image, "RUN sleep 8\n")
    repo = f"corpus/good-{app.name}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tasks.cli", "build", str(app), "--destination",
         f"{registry.host}/{repo}", "--json"],
        env=embedded_env(root), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    good = GoodBuild(proc, root, repo, time.monotonic())
    yield good
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def message_of(run: Run, has_record: bool) -> list[str]:
    """The paragraph about the problem: the ``failed:`` line of a record, else stderr."""
    if has_record:
        return [line for line in run.output.splitlines() if line.startswith("failed: ")]
    lines = [line for line in run.stderr.splitlines() if not line.startswith("warning: ")]
    # A multi-problem config report continues its error line with one line per problem.
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_case(case: Case, tmp_path: Path, registry: services.RegistryServer, base_image: str,
              good_build: GoodBuild, run_cli: Runner) -> None:
    materialiser = Materialiser(tmp_path / "case", base_image, registry.host)
    materialiser.tmp.mkdir()
    prepared = materialiser.prepare(case)
    expect: dict[str, Any] = {k: _filled(v, materialiser.fill) for k, v in case.expect.items()}
    env = embedded_env(tmp_path, **prepared.env)

    run = run_cli([*prepared.args, "--json"], env, tmp_path)

    assert "Traceback" not in run.output, run
    assert run.code == expect["exit"], run
    has_record = "kind" in expect
    lines = message_of(run, has_record)
    assert lines, run
    message = "\n".join(lines)
    # One paragraph: no blank line, a few lines at most, and short enough to read.
    assert all(line.strip() for line in lines), message
    assert len(lines) <= expect.get("max_lines", 2), message
    assert len(message) < 1000, message
    if not has_record:
        assert lines[0].startswith("error: "), message
        assert run.stdout.strip() == "", f"refused input must queue nothing:\n{run}"
    else:
        record = run.record()
        assert record["status"] == "failed", record
        assert record["error_kind"] == expect["kind"], record
        assert record["digest"] is None, record
        assert lines == [f"failed: {record['error']}"], (lines, record)
    for fragment in expect["problem"]:
        assert fragment in message, f"problem {fragment!r} not named in:\n{message}"
    for fragment in expect["fix"]:
        assert fragment in message, f"fix {fragment!r} not named in:\n{message}"
    if "regex" in expect:
        assert re.search(expect["regex"], message), (expect["regex"], message)
    for secret in expect.get("hidden", []):
        assert secret not in run.output, f"{secret!r} was echoed:\n{run}"
    assert leftovers(tmp_path) == [], leftovers(tmp_path)
    for path in prepared.absent:
        assert not path.exists() and not path.is_symlink(), f"{path} was created"


def _filled(value: Any, fill: Callable[[str], str]) -> Any:
    """Expectations may name the registry or scratch paths through the same placeholders."""
    if isinstance(value, str):
        return fill(value)
    if isinstance(value, list):
        return [_filled(v, fill) for v in value]
    return value


def test_the_good_build_beside_the_corpus_finished_normally(
        good_build: GoodBuild, registry: services.RegistryServer) -> None:
    stdout, stderr = good_build.proc.communicate(timeout=180)
    run = Run(good_build.proc.returncode, stdout, stderr)
    assert run.code == 0, run
    assert "Traceback" not in run.output
    record = run.record()
    assert record["status"] == "built", record
    assert record["digest"] == registry.digest(good_build.repo, record["tag"]), record
    assert leftovers(good_build.root) == [], leftovers(good_build.root)


def test_a_command_line_destination_completes_a_kaniko_config(tmp_path: Path) -> None:
    # The corpus's kaniko-without-destination case is refused only because nothing names a
    # destination; --destination (or build_image(destination=...)) must satisfy the rule.
    from config.settings import Settings
    from tasks.operations import new_request

    cfg = tmp_path / "kaniko.yaml"
    cfg.write_text("builder:\n  type: kaniko\n  build-context-store: s3://contexts/ctx\n")
    app = make_app(tmp_path / "src", "local/busybox:base")
    env = embedded_env(tmp_path)
    run = run_buildq(["kaniko-job", str(app), "--destination", "registry.example.com/team/app",
                      "--config", str(cfg)], env, timeout=60)
    assert run.code == 0, run
    assert "--destination=registry.example.com/team/app:" in run.stdout, run

    settings = Settings.from_env(env)
    for config in (str(cfg), {"builder": {"type": "kaniko",
                                          "build-context-store": "s3://contexts/ctx"}}):
        state = new_request("r", str(app), settings, destination="registry.example.com/team/app",
                            ref=None, dockerfile=None, build_args=None, target=None, platform=None,
                            builder=None, config=config)
        assert state.error is None, state.error
        assert (state.builder, state.destination) == ("kaniko", "registry.example.com/team/app")


def test_kaniko_job_prints_one_job_per_platform_with_the_tags_buildq_hash_prints(
        tmp_path: Path) -> None:
    import yaml

    cfg = tmp_path / "kaniko.yaml"
    cfg.write_text("builder:\n  type: kaniko\n  build-context-store: s3://contexts/ctx\n"
                   "  destination: registry.example.com/team/app\n")
    app = make_app(tmp_path / "src", "local/busybox:base")
    env = embedded_env(tmp_path)
    options = ["--platform", "linux/amd64,linux/arm64", "--base-policy", "tag", "--config", str(cfg)]
    run = run_buildq(["kaniko-job", str(app), *options], env, timeout=60)
    assert run.code == 0, run
    jobs = list(yaml.safe_load_all(run.stdout))
    hashed = run_buildq(["hash", str(app), *options], env, timeout=60)
    assert hashed.code == 0, hashed
    tags = dict(line.split(" ", 1) for line in hashed.stdout.splitlines())
    assert len(jobs) == 2
    for job, platform in zip(jobs, ("linux/amd64", "linux/arm64"), strict=True):
        pod = job["spec"]["template"]["spec"]
        args = pod["containers"][0]["args"]
        assert f"--custom-platform={platform}" in args
        assert f"--destination=registry.example.com/team/app:{tags[platform]}" in args
        assert pod["nodeSelector"] == {"kubernetes.io/os": "linux",
                                       "kubernetes.io/arch": platform.split("/")[1]}
    # Each platform's Job has its own name: its own hash.
    assert len({job["metadata"]["name"] for job in jobs}) == 2
