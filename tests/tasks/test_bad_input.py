"""Bad input through the ``buildq`` CLI: an exit code, a short message naming the problem, no traceback.

Exit 2 is bad input or an unreachable service, exit 1 a build that ran and failed. Every case is a
real subprocess of the CLI (embedded mode unless the case says otherwise); a final test sends the
same kinds of bad requests to a running cluster next to a good one.
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tasks import build_image, outcome
from tests import services
from tests.tasks.conftest import REPO, Cluster
from tests.tasks.test_embedded import Run, embedded_env, leftovers, make_app, run_buildq


@dataclass
class Setup:
    """What a case runs: CLI arguments, extra environment, and a check made afterwards."""

    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    after: Callable[[], None] | None = None


@dataclass
class Env:
    tmp: Path
    base: str
    registry: str

    def dest(self) -> str:
        return f"{self.registry}/bad/{uuid.uuid4().hex[:8]}"

    def app(self, extra: str = "") -> Path:
        return make_app(self.tmp / "src", self.base, extra)

    def config(self, text: str) -> Path:
        path = self.tmp / f"config-{uuid.uuid4().hex[:6]}.yaml"
        path.write_text(text)
        return path

    def build(self, source: str | Path, *extra: str) -> list[str]:
        return ["build", str(source), "--destination", self.dest(), *extra]


def tar_of(path: Path, names: list[str]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name in names:
            data = b"FROM scratch\n"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def bare_repo(e: Env) -> Path:
    work = e.app()
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q", "-b", "main", str(work)], check=True)
    subprocess.run([*git, "-C", str(work), "add", "."], check=True)
    subprocess.run([*git, "-C", str(work), "commit", "-qm", "one"], check=True)
    bare = e.tmp / f"repo-{uuid.uuid4().hex[:6]}.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], check=True)
    return bare


# --- the cases ---------------------------------------------------------------------------


def malformed_yaml(e: Env) -> Setup:
    cfg = e.config("builder: [unclosed\n  type: : docker\n")
    return Setup(e.build(e.app(), "--config", str(cfg)))


def unknown_builder_type(e: Env) -> Setup:
    cfg = e.config("builder:\n  type: podman\n")
    return Setup(e.build(e.app(), "--config", str(cfg)))


def aws_without_region(e: Env) -> Setup:
    cfg = e.config("environment:\n  type: aws\n")
    return Setup(e.build(e.app(), "--config", str(cfg)))


ECR_WEST = "123456789012.dkr.ecr.us-west-2.amazonaws.com/app"


def ecr_region_mismatch_in_config(e: Env) -> Setup:
    cfg = e.config("environment:\n  type: aws\n  region: us-east-1\n"
                   f"builder:\n  type: docker\n  destination: {ECR_WEST}\n")
    return Setup(["build", str(e.app()), "--config", str(cfg)])


def ecr_region_mismatch_on_command_line(e: Env) -> Setup:
    cfg = e.config("environment:\n  type: aws\n  region: us-east-1\n")
    return Setup(["build", str(e.app()), "--destination", ECR_WEST, "--config", str(cfg)],
                 # Were the check skipped, the build would try to reach ECR: keep that short.
                 {"BUILDQ_MAX_RETRIES": "1", "BUILDQ_RETRY_BASE": "0.1"})


def unknown_top_level_key(e: Env) -> Setup:
    cfg = e.config("buildr:\n  type: docker\n")
    return Setup(e.build(e.app(), "--config", str(cfg)))


def missing_config_file(e: Env) -> Setup:
    return Setup(e.build(e.app(), "--config", str(e.tmp / "nowhere.yaml")))


def destination_with_tag(e: Env) -> Setup:
    return Setup(["build", str(e.app()), "--destination", "127.0.0.1:1/a:latest"])


def no_destination(e: Env) -> Setup:
    return Setup(["build", str(e.app())])


def missing_source_path(e: Env) -> Setup:
    return Setup(e.build(e.tmp / "no-such-app"))


def build_arg_without_equals(e: Env) -> Setup:
    return Setup(e.build(e.app(), "--build-arg", "ONLYNAME"))


def secret_name_that_is_a_path(e: Env) -> Setup:
    return Setup(e.build(e.app(), "--secret", "../../etc/passwd"))


def platform_that_is_not_one(e: Env) -> Setup:
    return Setup(e.build(e.app(), "--platform", "linux"))


def ref_on_a_directory(e: Env) -> Setup:
    return Setup(e.build(e.app(), "--ref", "main"))


def git_ref_that_is_an_option(e: Env) -> Setup:
    return Setup(e.build(bare_repo(e).as_uri(), "--ref=--upload-pack=x"))


def git_remote_helper_url(e: Env) -> Setup:
    marker = Path(f"/tmp/buildq-pwned-{uuid.uuid4().hex}")

    def not_created() -> None:
        assert not marker.exists(), f"the ext:: helper ran and created {marker}"

    return Setup(e.build(f"ext::sh -c touch% {marker}"), after=not_created)


def archive_with_dotdot_member(e: Env) -> Setup:
    archive = tar_of(e.tmp / "dotdot.tar.gz", ["Dockerfile", "../evil-dotdot"])

    def not_created() -> None:
        assert not list(e.tmp.rglob("evil-dotdot"))

    return Setup(e.build(archive), after=not_created)


def archive_with_absolute_member(e: Env) -> Setup:
    target = Path(f"/tmp/buildq-absolute-{uuid.uuid4().hex}")
    archive = tar_of(e.tmp / "absolute.tar.gz", ["Dockerfile", str(target)])

    def not_created() -> None:
        assert not target.exists()

    return Setup(e.build(archive), after=not_created)


def symlink_escaping_the_context(e: Env) -> Setup:
    app = e.app()
    (app / "leaked-passwd").symlink_to("/etc/passwd")
    return Setup(e.build(app))


def dockerfile_syntax_error(e: Env) -> Setup:
    return Setup(e.build(e.app("COPYY msg.txt /again.txt\n")))


def failing_run_step(e: Env) -> Setup:
    return Setup(e.build(e.app("RUN sh -c 'exit 3'\n")))


UNREACHABLE_PORT = services.free_port()


def unreachable_registry(e: Env) -> Setup:
    return Setup(["build", str(e.app()), "--destination", f"127.0.0.1:{UNREACHABLE_PORT}/x"],
                 {"BUILDQ_MAX_RETRIES": "1", "BUILDQ_RETRY_BASE": "0.1"})


def unreachable_redis(e: Env) -> Setup:
    return Setup(e.build(e.app()),
                 {"BUILDQ_REDIS_URL": f"redis://127.0.0.1:{UNREACHABLE_PORT}/0"})


@dataclass
class Case:
    setup: Callable[[Env], Setup]
    code: int
    #: Fragments the problem message must contain (key path, file, member, ref ...).
    fragments: list[str]
    #: ``error_kind`` of the failed record; None when the CLI refuses before any record.
    kind: str | None = None


CASES = [
    pytest.param(Case(malformed_yaml, 2, ["config-", ".yaml", "line 2", "not valid YAML"]),
                 id="malformed-yaml"),
    pytest.param(Case(unknown_builder_type, 2, ["builder.type", "podman", "docker"]),
                 id="unknown-builder-type"),
    pytest.param(Case(aws_without_region, 2, ["environment.region", "AWS region"]),
                 id="aws-without-region"),
    pytest.param(Case(ecr_region_mismatch_in_config, 2,
                      ["builder.destination", "us-west-2", "us-east-1"]),
                 id="ecr-region-mismatch-in-config"),
    pytest.param(Case(ecr_region_mismatch_on_command_line, 2, ["us-west-2", "us-east-1"], "config"),
                 id="ecr-region-mismatch-on-command-line"),
    pytest.param(Case(unknown_top_level_key, 2, ["buildr", "Did you mean 'builder'"]),
                 id="unknown-top-level-key"),
    pytest.param(Case(missing_config_file, 2, ["nowhere.yaml", "does not exist"]),
                 id="missing-config-file"),
    pytest.param(Case(destination_with_tag, 2, ["127.0.0.1:1/a:latest", "tag"], "config"),
                 id="destination-with-tag"),
    pytest.param(Case(no_destination, 2, ["no destination"], "input"), id="no-destination"),
    pytest.param(Case(missing_source_path, 2, ["no-such-app", "does not exist"], "source"),
                 id="missing-source-path"),
    pytest.param(Case(build_arg_without_equals, 2, ["--build-arg", "ONLYNAME", "KEY=VALUE"]),
                 id="build-arg-without-equals"),
    pytest.param(Case(secret_name_that_is_a_path, 2, ["../../etc/passwd", "secret name"], "input"),
                 id="secret-name-path"),
    pytest.param(Case(platform_that_is_not_one, 2, ["'linux'", "os/arch"], "input"),
                 id="platform-not-one"),
    pytest.param(Case(ref_on_a_directory, 2, ["only applies to git"], "source"),
                 id="ref-on-a-directory"),
    pytest.param(Case(git_ref_that_is_an_option, 2, ["--upload-pack=x", "option"], "source"),
                 id="git-ref-option"),
    pytest.param(Case(git_remote_helper_url, 2, ["ext::", "remote-helper"], "source"),
                 id="git-ext-helper-url"),
    pytest.param(Case(archive_with_dotdot_member, 2, ["dotdot.tar.gz", "../evil-dotdot", "'..'"],
                      "source"), id="archive-dotdot-member"),
    pytest.param(Case(archive_with_absolute_member, 2, ["absolute.tar.gz", "/tmp/buildq-absolute-",
                                                        "absolute path"], "source"),
                 id="archive-absolute-member"),
    pytest.param(Case(symlink_escaping_the_context, 2, ["leaked-passwd", "/etc/passwd",
                                                        "outside the build context"], "source"),
                 id="symlink-out-of-context"),
    pytest.param(Case(dockerfile_syntax_error, 1, ["Dockerfile", "line 3", "COPYY"], "build"),
                 id="dockerfile-syntax-error"),
    pytest.param(Case(failing_run_step, 1, ["RUN sh -c 'exit 3'", "exit code 3"], "build"),
                 id="failing-run-step"),
    pytest.param(Case(unreachable_registry, 1, [f"127.0.0.1:{UNREACHABLE_PORT}", "reached"],
                      "registry"),
                 id="unreachable-registry"),
    pytest.param(Case(unreachable_redis, 2, ["Redis", f"redis://127.0.0.1:{UNREACHABLE_PORT}/0"]),
                 id="unreachable-redis"),
]


def problem_paragraph(run: Run) -> str:
    """The lines a user reads about the problem: ``error:``/``hint:`` or ``failed:``."""
    lines = [line for line in run.output.splitlines()
             if line.startswith(("error: ", "hint: ", "failed: "))]
    return "\n".join(lines)


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gets_an_exit_code_and_a_short_message_naming_it(
        case: Case, tmp_path: Path, registry: services.RegistryServer, base_image: str) -> None:
    setup = case.setup(Env(tmp_path, base_image, registry.host))
    env = embedded_env(tmp_path, **setup.env)

    run = run_buildq([*setup.args, "--json"], env, timeout=120)

    assert "Traceback" not in run.output, run
    assert run.code == case.code, run
    message = problem_paragraph(run)
    assert message, run
    # One short paragraph: a message (and at most a hint), not a dump.
    assert len(message.splitlines()) <= 2 and len(message) < 700, message
    for fragment in case.fragments:
        assert fragment in message, (fragment, message)
    if case.kind is None:
        # Refused before anything was queued: no record on stdout.
        assert run.stdout.strip() == "", run
    else:
        record = run.record()
        assert record["status"] == "failed", record
        assert record["error_kind"] == case.kind, record
        assert record["digest"] is None
        assert message.startswith("failed: ") and record["error"] in message
    assert leftovers(tmp_path) == [], leftovers(tmp_path)
    if setup.after:
        setup.after()


# --- the same kinds of bad requests on a running cluster -------------------------------------


def test_bad_requests_on_a_cluster_fail_alone_and_good_builds_go_through(
        cluster: Cluster, tmp_path: Path, base_image: str) -> None:
    e = Env(tmp_path, base_image, cluster.registry.host)
    good_repo = f"bad/good-{uuid.uuid4().hex[:8]}"
    good_cli_repo = f"bad/good-cli-{uuid.uuid4().hex[:8]}"
    hostile = tar_of(tmp_path / "hostile.tar.gz", ["Dockerfile", "../escaped-on-cluster"])
    bare = bare_repo(e)
    dead_registry = f"127.0.0.1:{UNREACHABLE_PORT}"

    # The good CLI build runs in remote mode, through Redis, at the same time as the rest.
    cli = subprocess.Popen(
        [sys.executable, "-m", "tasks.cli", "build", str(e.app()), "--destination",
         f"{cluster.registry.host}/{good_cli_repo}", "--json"],
        env=cluster.env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    good = build_image.delay(str(e.app()), destination=f"{cluster.registry.host}/{good_repo}")
    bad: dict[str, tuple[Any, str, list[str]]] = {
        "hostile-archive": (build_image.delay(str(hostile), destination=e.dest()),
                            "source", ["hostile.tar.gz", "../escaped-on-cluster"]),
        # delay() would refuse it before queueing: sent as anybody could, the worker must.
        "git-ref-option": (build_image.apply_async(args=[bare.as_uri()], kwargs={
                               "ref": "--upload-pack=x", "destination": e.dest()}),
                           "source", ["--upload-pack=x", "option"]),
        "failing-run": (build_image.delay(str(e.app("RUN sh -c 'exit 3'\n")), destination=e.dest()),
                        "build", ["exit code 3", "RUN sh -c 'exit 3'"]),
        "syntax-error": (build_image.delay(str(e.app("COPYY msg.txt /x\n")), destination=e.dest()),
                         "build", ["COPYY", "line 3"]),
        "unreachable-registry": (build_image.delay(str(e.app()), destination=f"{dead_registry}/x"),
                                 "registry", [dead_registry]),
    }
    with ThreadPoolExecutor(len(bad) + 1) as pool:
        futures = {name: pool.submit(outcome, result, timeout=180) for name, (result, _, _) in bad.items()}
        good_record = pool.submit(good.get, timeout=180).result()
        records = {name: future.result() for name, future in futures.items()}
    stdout, stderr = cli.communicate(timeout=180)

    assert good_record["status"] == "built", good_record
    assert good_record["digest"] == cluster.registry.digest(good_repo, good_record["tag"])

    assert cli.returncode == 0, (stdout, stderr)
    assert "Traceback" not in stdout + stderr
    cli_record = Run(cli.returncode, stdout, stderr).record()
    assert cli_record["status"] == "built", cli_record
    assert cli_record["digest"] == cluster.registry.digest(good_cli_repo, cli_record["tag"])

    for name, (_, kind, fragments) in bad.items():
        record = records[name]
        assert record["status"] == "failed", (name, record)
        assert record["error_kind"] == kind, (name, record)
        assert record["digest"] is None, (name, record)
        error = record["error"]
        assert "Traceback" not in error and len(error) < 700, (name, error)
        for fragment in fragments:
            assert fragment in error, (name, fragment, error)

    assert not list(tmp_path.rglob("escaped-on-cluster"))
    assert not list((cluster.root / "contexts").rglob("*.tar.gz")), \
        "contexts or uploaded sources were left in the store"
