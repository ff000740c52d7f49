"""BuildKit on the docker pool: its features, its errors, its cache, and when it is not used.

Builds run against the real Docker Engine (and, where a test says so, a second dockerd
with its own data root standing in for another build host) and a real registry.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from config.errors import BuildError, ConfigError
from config.settings import Settings
from tests import services
from tests.workers.test_docker_builder import context
from workers.builders.base import BuildRequest
from workers.builders.buildkit import (
    BuildKitDriver,
    Cli,
    Progress,
    declared_args,
    is_official_frontend,
    peek_dockerfile,
    secret_mounts,
    syntax_directive,
    without_syntax,
    write_docker_config,
)
from workers.builders.docker import DockerBuilder
from workers.secrets import SecretUsageError

USER, PASSWORD = "puller", "Pull-Pa55-never-logged"


def request(image: str, files: dict[str, str], **kwargs: object) -> BuildRequest:
    return BuildRequest(image=image, open_context=context(files), network_mode="none",
                        **kwargs)  # type: ignore[arg-type]


def run(image: str, script: str, engine: str | None = None) -> str:
    done = subprocess.run(["docker", *(["-H", engine] if engine else []), "run", "--rm",
                           "--network", "none", image, "sh", "-c", script],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def builder(docker_engine: str, tmp_path_factory: pytest.TempPathFactory) -> DockerBuilder:
    built = DockerBuilder(docker_config=tmp_path_factory.mktemp("docker-config"))
    assert built.frontend == "buildkit", built.legacy_reason
    return built


@pytest.fixture(scope="module")
def frontend_builder(docker_engine: str, dockerfile_frontend: str,
                     tmp_path_factory: pytest.TempPathFactory) -> DockerBuilder:
    """A build host whose BUILDQ_DOCKERFILE_FRONTEND names the frontend built from its module."""
    built = DockerBuilder(docker_config=tmp_path_factory.mktemp("frontend-config"),
                          frontend_image=dockerfile_frontend)
    assert built.frontend == "buildkit", built.legacy_reason
    return built


@pytest.fixture
def lines() -> list[str]:
    return []


# --------------------------------------------------------------------------- features

FEATURES = """FROM {base} AS tools
RUN --mount=type=cache,target=/cache echo tools-{nonce} > /cache/t && cp /cache/t /tools.txt
FROM {base} AS data
RUN echo data-{nonce} > /data.txt
FROM {base}
COPY --from=tools /tools.txt /tools.txt
COPY --from=data /data.txt /data.txt
COPY --chmod=750 run.sh /run.sh
COPY --link input.txt /linked.txt
RUN --mount=type=bind,source=input.txt,target=/mnt/input.txt cp /mnt/input.txt /copied.txt
RUN --mount=type=secret,id=TOKEN sha256sum /run/secrets/TOKEN | grep -q ^{digest} \
    && echo secret-ok > /secret.txt
RUN test ! -e /run/secrets/TOKEN && test ! -e /mnt/input.txt
"""


def test_buildkit_only_dockerfile_builds_and_its_image_has_the_files(
    frontend_builder: DockerBuilder, dockerfile_frontend: str, base_image: str,
    lines: list[str]
) -> None:
    nonce, token = uuid.uuid4().hex[:8], f"tok-{uuid.uuid4().hex}"
    dockerfile = FEATURES.format(base=base_image, nonce=nonce,
                                 digest=hashlib.sha256(token.encode()).hexdigest())
    image = f"buildq-test/features:{nonce}"
    frontend_builder.build(request(image, {"Dockerfile": dockerfile, "run.sh": "echo hi\n",
                                           "input.txt": f"input-{nonce}\n"},
                                   secrets={"TOKEN": token}), lines.append)
    shown = run(image, "cat /tools.txt /data.txt /copied.txt /secret.txt /linked.txt; "
                       "ls -l /run.sh")
    assert f"tools-{nonce}\ndata-{nonce}\ninput-{nonce}\nsecret-ok\ninput-{nonce}\n" in shown
    assert shown.splitlines()[-1].startswith("-rwxr-x---")
    assert token not in "\n".join(lines)
    # The two independent stages ran as steps of their own.
    assert any("[tools 2/2] RUN" in line for line in lines), lines
    assert any("[data 2/2] RUN" in line for line in lines), lines
    # The configured frontend parsed the file, pulled from the registry.
    assert frontend_builder.dockerfile_frontend == dockerfile_frontend
    assert any(f"resolve image config for {dockerfile_frontend}" in line for line in lines), lines
    assert any("COPY --link input.txt /linked.txt" in line for line in lines), lines
    frontend_builder.remove_image(image)


def test_secret_is_in_no_layer_config_or_history_and_masked_in_the_log(
    builder: DockerBuilder, base_image: str, lines: list[str]
) -> None:
    token, nonce = f"tok-{uuid.uuid4().hex}-never-shown", uuid.uuid4().hex[:8]
    # The nonce makes the step run: BuildKit's cache keys leave secret values out.
    dockerfile = (f"FROM {base_image}\n"
                  f"RUN --mount=type=secret,id=TOKEN echo {nonce} && "
                  "echo \"got $(cat /run/secrets/TOKEN)\" && wc -c < /run/secrets/TOKEN > /length\n")
    image = f"buildq-test/secret:{nonce}"
    builder.build(request(image, {"Dockerfile": dockerfile}, secrets={"TOKEN": token}),
                  lines.append)
    assert run(image, "cat /length").strip() == str(len(token))
    assert any(line.endswith("got ***") for line in lines), lines
    saved = subprocess.run(["docker", "save", image], capture_output=True, timeout=60).stdout
    history = subprocess.run(["docker", "history", "--no-trunc", image], capture_output=True,
                             timeout=60).stdout
    assert saved and history
    assert token.encode() not in saved and token.encode() not in history
    assert b"TOKEN=" not in history  # a mount, not a build arg
    builder.remove_image(image)


def test_secret_read_only_as_a_build_arg_is_refused_with_the_mount_to_use(
    builder: DockerBuilder, base_image: str, lines: list[str]
) -> None:
    dockerfile = f"FROM {base_image}\nARG PIP_TOKEN\nRUN echo ${{#PIP_TOKEN}}\n"
    with pytest.raises(SecretUsageError) as caught:
        builder.build(request("buildq-test/argsecret:1", {"Dockerfile": dockerfile},
                              secrets={"PIP_TOKEN": "value-not-shown"}), lines.append)
    assert "ARG PIP_TOKEN" in caught.value.message
    assert "RUN --mount=type=secret,id=PIP_TOKEN" in (caught.value.hint or "")
    assert "value-not-shown" not in str(caught.value)


def test_cache_mount_keeps_its_entries_across_builds_on_one_host(
    builder: DockerBuilder, base_image: str, lines: list[str]
) -> None:
    cache_id = f"buildq-test-{uuid.uuid4().hex[:8]}"
    dockerfile = (f"FROM {base_image}\nCOPY stamp.txt /stamp.txt\n"
                  f"RUN --mount=type=cache,target=/cache,id={cache_id} "
                  "cat /stamp.txt >> /cache/entries && cp /cache/entries /seen.txt\n")
    image = f"buildq-test/cachemount:{cache_id}"
    builder.build(request(image, {"Dockerfile": dockerfile, "stamp.txt": "first\n"}),
                  lines.append)
    assert run(image, "cat /seen.txt") == "first\n"
    # A changed late layer: the RUN step runs again and finds the first build's entry.
    builder.build(request(image, {"Dockerfile": dockerfile, "stamp.txt": "second\n"}),
                  lines.append)
    assert run(image, "cat /seen.txt") == "first\nsecond\n"
    builder.remove_image(image)


def test_copy_link_on_this_engines_built_in_frontend_says_what_it_needs(
    builder: DockerBuilder, base_image: str, lines: list[str]
) -> None:
    dockerfile = f"FROM {base_image}\nCOPY --link hello.txt /hello.txt\n"
    with pytest.raises(BuildError) as caught:
        builder.build(request("buildq-test/link:1", {"Dockerfile": dockerfile,
                                                      "hello.txt": "hi\n"}), lines.append)
    if "link" not in caught.value.message.lower():
        pytest.fail(f"not about --link: {caught.value}")
    hint = caught.value.hint or ""
    assert "BUILDQ_DOCKERFILE_FRONTEND" in hint, hint
    assert "# syntax=docker/dockerfile:1" in hint and "23.0" in hint, hint


def test_copy_link_builds_with_the_configured_frontend_for_an_official_syntax_line(
    frontend_builder: DockerBuilder, dockerfile_frontend: str, base_image: str,
    lines: list[str]
) -> None:
    # docker/dockerfile:1 cannot be pulled here: the configured frontend stands in for it.
    nonce = uuid.uuid4().hex[:8]
    dockerfile = (f"# syntax=docker/dockerfile:1\nFROM {base_image}\n"
                  "COPY --link hello.txt /hello.txt\n")
    image = f"buildq-test/link:{nonce}"
    frontend_builder.build(request(image, {"Dockerfile": dockerfile,
                                           "hello.txt": f"hi-{nonce}\n"}), lines.append)
    assert run(image, "cat /hello.txt") == f"hi-{nonce}\n"
    assert frontend_builder.dockerfile_frontend == dockerfile_frontend
    warning = [line for line in lines if line.startswith("warning: the frontend image")]
    assert warning and "docker/dockerfile:1 " in warning[0], lines
    assert dockerfile_frontend in warning[0] and "BUILDQ_DOCKERFILE_FRONTEND" in warning[0]
    frontend_builder.remove_image(image)


def test_copy_link_builds_with_the_configured_frontend_through_buildx_too(
    dockerfile_frontend: str, base_image: str, lines: list[str], tmp_path: Path
) -> None:
    config = services.buildx_config_dir()
    if config is None:
        pytest.skip("the buildx plugin cannot be built here (no Go toolchain)")
    host = DockerBuilder(cli_path=services.docker_cli_without_buildkit(tmp_path / "cli"),
                         docker_config=config, frontend_image=dockerfile_frontend)
    assert host.frontend == "buildkit", host.legacy_reason
    nonce = uuid.uuid4().hex[:8]
    image = f"buildq-test/link-buildx:{nonce}"
    host.build(request(image, {"Dockerfile": f"FROM {base_image}\nCOPY --link --chmod=750 "
                                             "a /a\n", "a": f"a-{nonce}\n"}), lines.append)
    assert any("buildx build" in line for line in lines[:1]), lines
    assert run(image, "cat /a; ls -l /a").startswith(f"a-{nonce}\n-rwxr-x---")
    assert host.dockerfile_frontend == dockerfile_frontend
    host.remove_image(image)


def test_failing_step_through_the_configured_frontend_is_reported_as_on_the_built_in_one(
    frontend_builder: DockerBuilder, base_image: str, lines: list[str]
) -> None:
    dockerfile = (f"FROM {base_image}\nCOPY --link hello.txt /hello.txt\n"
                  f"RUN echo {uuid.uuid4().hex} && echo about to fail && exit 3\n")
    with pytest.raises(BuildError) as caught:
        frontend_builder.build(request("buildq-test/link-fails:1", {
            "Dockerfile": dockerfile, "hello.txt": "hi\n"}), lines.append)
    message = caught.value.message
    assert message.startswith("step 3/3 of Dockerfile (RUN echo"), message
    assert "failed with exit code 3" in message and "about to fail" in message, message


def test_configured_frontend_that_cannot_be_pulled_falls_back_to_the_built_in_one(
    docker_engine: str, base_image: str, lines: list[str], tmp_path: Path
) -> None:
    missing = f"127.0.0.1:{services.free_port()}/nowhere/dockerfile:{uuid.uuid4().hex[:8]}"
    host = DockerBuilder(docker_config=tmp_path / "config", frontend_image=missing)
    nonce = uuid.uuid4().hex[:8]
    image = f"buildq-test/no-frontend:{nonce}"
    files = {"Dockerfile": f"FROM {base_image}\nRUN echo {nonce} > /out.txt\n"}
    host.build(request(image, files), lines.append)
    assert run(image, "cat /out.txt") == f"{nonce}\n"
    assert host.dockerfile_frontend == "built-in"
    warning = [line for line in lines if line.startswith("warning: the frontend image")]
    assert warning and missing in warning[0] and "built-in" in warning[0], lines
    # A flag only newer frontends know names the image that could not be pulled.
    with pytest.raises(BuildError) as caught:
        host.build(request("buildq-test/no-frontend:link", {
            "Dockerfile": f"FROM {base_image}\nCOPY --link a /a\n", "a": "a\n"}), lines.append)
    assert missing in caught.value.message and "BUILDQ_DOCKERFILE_FRONTEND" in \
        caught.value.message, caught.value
    assert missing in (caught.value.hint or "")
    host.remove_image(image)


def test_network_modes_buildkit_lacks_are_refused_with_the_setting(
    builder: DockerBuilder, base_image: str, lines: list[str]
) -> None:
    with pytest.raises(BuildError) as caught:
        builder.build(BuildRequest(image="buildq-test/net:1",
                                   open_context=context({"Dockerfile": f"FROM {base_image}\n"}),
                                   network_mode="my-overlay"), lines.append)
    assert "my-overlay" in caught.value.message and "BUILDQ_NETWORK_MODE" in str(caught.value)


def test_build_args_target_platform_and_labels_reach_the_image(
    builder: DockerBuilder, base_image: str, lines: list[str]
) -> None:
    dockerfile = (f"FROM {base_image} AS first\nARG GREETING=unset\nENV GREETING=$GREETING\n"
                  "LABEL stage=first\n"
                  f"FROM {base_image} AS second\nLABEL stage=second\n")
    image = f"buildq-test/options:{uuid.uuid4().hex[:8]}"
    builder.build(request(image, {"Dockerfile": dockerfile}, build_args={"GREETING": "hi there"},
                          target="first", platform="linux/amd64",
                          labels={"buildq.source-hash": "abc"}), lines.append)
    info = docker.from_env().api.inspect_image(image)
    assert "GREETING=hi there" in info["Config"]["Env"]
    assert info["Config"]["Labels"] == {"stage": "first", "buildq.source-hash": "abc"}
    assert info["Architecture"] == "amd64"
    builder.remove_image(image)


# --------------------------------------------------------------------------- # syntax=


def test_official_frontend_that_cannot_be_pulled_falls_back_to_the_built_in_one(
    builder: DockerBuilder, base_image: str, lines: list[str]
) -> None:
    nonce = uuid.uuid4().hex[:8]
    dockerfile = (f"# syntax=docker/dockerfile:1.4\nFROM {base_image}\n"
                  f"RUN --mount=type=cache,target=/c echo fallback-{nonce} > /out.txt\n")
    image = f"buildq-test/syntax:{nonce}"
    builder.build(request(image, {"Dockerfile": dockerfile}), lines.append)
    assert run(image, "cat /out.txt") == f"fallback-{nonce}\n"
    warning = [line for line in lines if line.startswith("warning: the frontend image")]
    assert warning and "docker/dockerfile:1.4" in warning[0], lines
    assert any("resolve image config for docker.io/docker/dockerfile:1.4" in line
               for line in lines), lines
    # The next build does not wait for the same frontend again.
    again: list[str] = []
    builder.build(request(image, {"Dockerfile": dockerfile + "RUN true\n"}), again.append)
    assert any(line.startswith("warning: the frontend image") for line in again), again
    assert not any("resolve image config" in line for line in again), again
    builder.remove_image(image)


def test_other_frontend_that_cannot_be_pulled_says_so_and_how_to_proceed(
    builder: DockerBuilder, base_image: str, lines: list[str]
) -> None:
    dockerfile = f"# syntax=example.invalid/frontends/dockerfile:9\nFROM {base_image}\n"
    with pytest.raises(BuildError) as caught:
        builder.build(request("buildq-test/syntax:other", {"Dockerfile": dockerfile}),
                      lines.append)
    message, hint = caught.value.message, caught.value.hint or ""
    assert "example.invalid/frontends/dockerfile:9" in message
    assert "# syntax=" in message and "cannot be pulled" in message
    assert "docker load" in hint and "remove the '# syntax=' line" in hint
    assert "Traceback" not in str(caught.value)


# --------------------------------------------------------------------------- registries


@pytest.fixture(scope="module")
def auth_registry(tmp_path_factory: pytest.TempPathFactory,
                  docker_engine: str) -> Iterator[services.RegistryServer]:
    base_image = docker_engine  # the session fixture's value is the base image's name
    server = services.start_htpasswd_registry(tmp_path_factory.mktemp("pull-registry"),
                                              {USER: PASSWORD})
    client = docker.from_env()
    private = f"{server.host}/team/base:1"
    client.api.tag(base_image, private)
    for _ in client.api.push(private, auth_config={"username": USER, "password": PASSWORD},
                             stream=True, decode=True):
        pass
    client.api.remove_image(private)
    yield server
    server.stop()


def test_private_base_image_is_pulled_with_the_login_given_never_shown(
    builder: DockerBuilder, auth_registry: services.RegistryServer, lines: list[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    dockerfile = f"FROM {auth_registry.host}/team/base:1\nRUN echo pulled\n"
    files = {"Dockerfile": dockerfile}
    with pytest.raises(BuildError) as caught:
        builder.build(request("buildq-test/private:anon", files), lines.append)
    assert "cannot be pulled" in caught.value.message
    image = f"buildq-test/private:{uuid.uuid4().hex[:8]}"
    builder.build(request(image, files, registry_logins={
        auth_registry.host: {"username": USER, "password": PASSWORD}}), lines.append)
    assert builder.has_image(image)
    logged = "\n".join(lines) + caplog.text
    assert PASSWORD not in logged
    assert base64_of(f"{USER}:{PASSWORD}") not in logged
    builder.remove_image(image)


def base64_of(text: str) -> str:
    import base64

    return base64.b64encode(text.encode()).decode()


def test_missing_cache_source_is_a_warning_and_the_build_goes_on(
    builder: DockerBuilder, registry: services.RegistryServer, base_image: str,
    lines: list[str],
) -> None:
    missing = f"{registry.host}/team/never-pushed:nothing"
    image = f"buildq-test/nocache:{uuid.uuid4().hex[:8]}"
    builder.build(request(image, {"Dockerfile": f"FROM {base_image}\nRUN echo ok\n"},
                          cache_from=[missing]), lines.append)
    assert builder.has_image(image)
    warnings = [line for line in lines if line.startswith("warning: the layer cache of")]
    assert warnings and missing in warnings[0], lines
    builder.remove_image(image)


# --------------------------------------------------------------------------- other hosts


EXPENSIVE = """FROM {base}
RUN echo {nonce} > /nonce && sleep 2 && dd if=/dev/urandom of=/generated bs=1k count=256 2>/dev/null
COPY late.txt /late.txt
"""


@pytest.fixture(scope="module")
def other_host(tmp_path_factory: pytest.TempPathFactory,
               docker_engine: str) -> Iterator[services.SecondEngine]:
    engine = services.start_second_engine(tmp_path_factory.mktemp("host-b"))
    services.copy_image(docker_engine, engine.socket)
    yield engine
    engine.stop()


def test_another_host_reuses_the_layers_pushed_from_this_one(
    builder: DockerBuilder, other_host: services.SecondEngine, registry: services.RegistryServer,
    base_image: str, lines: list[str], tmp_path: Path,
) -> None:
    nonce = uuid.uuid4().hex[:8]
    dockerfile = EXPENSIVE.format(base=base_image, nonce=nonce)
    first = f"{registry.host}/team/shared:{nonce}-a"
    builder.build(request(first, {"Dockerfile": dockerfile, "late.txt": "a\n"}), lines.append)
    builder.push(first, None, lines.append)

    host_b = DockerBuilder(other_host.socket, docker_config=tmp_path / "config")
    assert host_b.frontend == "buildkit"
    b_lines: list[str] = []
    second = f"{registry.host}/team/shared:{nonce}-b"
    host_b.build(request(second, {"Dockerfile": dockerfile, "late.txt": "b\n"},
                         cache_from=[first]), b_lines.append)
    log = "\n".join(b_lines)
    assert f"importing cache manifest from {first}" in log, log
    steps = Progress(lambda _: None)
    for line in b_lines:
        steps.feed(line)
    cached = steps.cached_steps()
    assert any(f"echo {nonce} > /nonce" in step for step in cached), cached
    assert not any("COPY late.txt" in step for step in cached), cached
    assert run(second, "cat /nonce /late.txt", other_host.socket) == f"{nonce}\nb\n"


def test_engine_with_buildkit_turned_off_builds_with_the_legacy_builder(
    tmp_path: Path, base_image: str, lines: list[str]
) -> None:
    engine = services.start_second_engine(tmp_path / "legacy-host", buildkit=False)
    try:
        services.copy_image(base_image, engine.socket)
        legacy = DockerBuilder(engine.socket, docker_config=tmp_path / "config")
        assert legacy.frontend == "legacy"
        assert "buildkit: false" in legacy.legacy_reason
        image = "buildq-test/legacy:1"
        legacy.build(request(image, {"Dockerfile": f"FROM {base_image}\nRUN echo plain\n"}),
                     lines.append)
        assert legacy.has_image(image)
        assert any("Step 2/2 : RUN echo plain" in line for line in lines), lines
        with pytest.raises(BuildError) as caught:
            legacy.build(request("buildq-test/legacy:2", {"Dockerfile": (
                f"FROM {base_image}\nRUN --mount=type=cache,target=/c true\n")}), lines.append)
        assert "BuildKit" in caught.value.message
        assert "buildkit" in (caught.value.hint or "").lower()
    finally:
        engine.stop()


def test_cli_without_buildkit_builds_legacy_and_names_buildkit_for_its_features(
    base_image: str, lines: list[str], tmp_path: Path
) -> None:
    search = services.docker_cli_without_buildkit(tmp_path / "cli")
    if search is None:
        pytest.skip("no docker CLI without BuildKit on this machine")
    legacy = DockerBuilder(cli_path=search, docker_config=tmp_path / "config")
    assert legacy.frontend == "legacy" and "no docker CLI on PATH has BuildKit" in \
        legacy.legacy_reason
    with pytest.raises(BuildError) as caught:
        legacy.build(request("buildq-test/legacy-cli:1", {"Dockerfile": (
            f"FROM {base_image}\nCOPY --chmod=755 a /a\n"), "a": "a\n"}), lines.append)
    assert "needs BuildKit" in caught.value.message
    assert "buildx" in (caught.value.hint or "")


# --------------------------------------------------------------------------- units


def test_progress_keeps_each_steps_output_and_tells_cache_imports_from_failures() -> None:
    logged: list[str] = []
    progress = Progress(logged.append)
    for line in [
        "#1 [internal] load remote build context", "#1 DONE 0.0s",
        "#4 importing cache manifest from reg/app:old",
        "#4 ERROR: reg/app:old: not found",
        "#5 [stage-0 2/3] RUN make", "#5 sha256:0123", "#5 0.100 compiling",
        "#6 [stage-0 1/3] FROM docker.io/library/python", "#6 CACHED",
        "#5 0.200 error: boom", "#5 ERROR: executor failed running [/bin/sh -c make]: exit code: 2",
        "------", " > [stage-0 2/3] RUN make:", "------",
        "executor failed running [/bin/sh -c make]: exit code: 2",
    ]:
        progress.feed(line + "\n")
    failed = progress.failed()
    assert failed is not None and failed.name == "[stage-0 2/3] RUN make"
    assert list(failed.tail) == ["compiling", "error: boom"]
    assert progress.cached_steps() == ["[stage-0 1/3] FROM docker.io/library/python"]
    assert not any("sha256:0123" in line for line in logged)
    assert any(line.startswith("warning: the layer cache of reg/app:old") for line in logged)
    assert progress.final_message() == "executor failed running [/bin/sh -c make]: exit code: 2"


@pytest.mark.parametrize(("text", "expected"), [
    ("# syntax=docker/dockerfile:1\nFROM x\n", ("docker/dockerfile:1", 0)),
    ("# escape=`\n#   SYNTAX = docker/dockerfile:1.4-labs\nFROM x\n",
     ("docker/dockerfile:1.4-labs", 1)),
    ("FROM x\n# syntax=docker/dockerfile:1\n", None),
    ("# a comment\n# syntax=docker/dockerfile:1\nFROM x\n", None),
    ("\n# syntax=docker/dockerfile:1\nFROM x\n", None),
])
def test_syntax_directive_is_read_only_from_the_leading_directives(
        text: str, expected: tuple[str, int] | None) -> None:
    assert syntax_directive(text) == expected


def test_only_the_stable_official_frontend_falls_back() -> None:
    assert all(map(is_official_frontend, ["docker/dockerfile:1", "docker/dockerfile:1.4",
                                          "docker.io/docker/dockerfile:1.4.3"]))
    assert not any(map(is_official_frontend, [
        "docker/dockerfile:1.4-labs", "docker/dockerfile-upstream:master",
        "example.com/docker/dockerfile:1", "docker/dockerfile:2"]))
    text = "# syntax=docker/dockerfile:1\nFROM x\nRUN y\n"
    replaced = without_syntax(text, 0, "docker/dockerfile:1")
    assert syntax_directive(replaced) is None
    assert replaced.splitlines()[1:] == text.splitlines()[1:]


def test_frontend_setting_is_an_image_reference_and_orders_the_frontends_tried() -> None:
    ref = "registry.example.com/tools/dockerfile:1.6"
    assert Settings.from_env({"BUILDQ_DOCKERFILE_FRONTEND": ref}).dockerfile_frontend == ref
    assert Settings.from_env({}).dockerfile_frontend is None
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"BUILDQ_DOCKERFILE_FRONTEND": "Not An Image"})
    assert "BUILDQ_DOCKERFILE_FRONTEND" in caught.value.message
    driver = BuildKitDriver(Cli("/usr/bin/docker", buildx=False), frontend_image=ref)
    plain = BuildRequest(image="x", open_context=context({}))

    def order(syntax: tuple[str, int] | None) -> list[str]:
        return [f.shown for f in driver._frontends(plain, syntax)]

    assert order(None) == [ref, "built-in"]
    assert order(("docker/dockerfile:1.4", 0)) == ["docker/dockerfile:1.4", ref, "built-in"]
    # Any other frontend is never replaced, by the setting either.
    assert order(("docker/dockerfile:1.4-labs", 0)) == ["docker/dockerfile:1.4-labs"]
    assert [f.shown for f in BuildKitDriver(driver.cli)._frontends(plain, None)] == ["built-in"]


def test_secret_mounts_and_build_args_are_read_from_instructions() -> None:
    text = ("FROM x\nARG A=1 B\n# ARG C\nRUN --mount=type=secret,id=A \\\n"
            "    --mount=type=secret,target=/run/secrets/D,required=true cat /run/secrets/A\n"
            "RUN --mount=type=cache,id=E,target=/c true\n")
    assert declared_args(text) == {"A", "B"}
    assert secret_mounts(text) == {"A", "D"}


def test_docker_config_adds_logins_that_win_over_a_credential_store(tmp_path: Path) -> None:
    source = tmp_path / "worker"
    (source / "cli-plugins").mkdir(parents=True)
    (source / "config.json").write_text(json.dumps({
        "credsStore": "desktop", "auths": {"other.example": {"auth": "b3RoZXI6eA=="}}}))
    write_docker_config(tmp_path / "build", source, {"reg.example:5000": {
        "username": "u", "password": "p"}, "docker.io": {"username": "h", "password": "q"}})
    config = json.loads((tmp_path / "build" / "config.json").read_text())
    assert config["auths"]["reg.example:5000"] == {"auth": base64_of("u:p")}
    assert config["auths"]["https://index.docker.io/v1/"] == {"auth": base64_of("h:q")}
    assert config["auths"]["other.example"] == {"auth": "b3RoZXI6eA=="}
    assert config["credHelpers"] == {"reg.example:5000": "", "https://index.docker.io/v1/": ""}
    assert (tmp_path / "build" / "config.json").stat().st_mode & 0o077 == 0
    assert (tmp_path / "build" / "cli-plugins").resolve() == source / "cli-plugins"


def test_peeking_at_the_dockerfile_keeps_every_byte_of_the_context() -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in (("a.bin", b"x" * 300_000), ("docker/Dockerfile", b"FROM y\n"),
                           ("z.txt", b"tail")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    payload = buffer.getvalue()
    stream, copy = io.BytesIO(payload), io.BytesIO()
    assert peek_dockerfile(stream, "./docker/Dockerfile", copy) == "FROM y\n"
    assert copy.getvalue() + stream.read() == payload
    assert peek_dockerfile(io.BytesIO(b"not a tarball"), "Dockerfile", io.BytesIO()) is None


def test_cache_from_a_private_registry_reached_through_an_endpoint_uses_its_login(
    builder: DockerBuilder, other_host: services.SecondEngine,
    auth_registry: services.RegistryServer, base_image: str, lines: list[str], tmp_path: Path,
) -> None:
    nonce = uuid.uuid4().hex[:8]
    dockerfile = EXPENSIVE.format(base=base_image, nonce=nonce)
    login = {"username": USER, "password": PASSWORD}
    pushed = f"{auth_registry.host}/team/cached:{nonce}"
    builder.build(request(pushed, {"Dockerfile": dockerfile, "late.txt": "a\n"}), lines.append)
    builder.push(pushed, login, lines.append)

    # Host B knows the registry by a name only the endpoint mapping resolves.
    logical = "registry.buildq.invalid"
    host_b = DockerBuilder(other_host.socket, endpoints={logical: auth_registry.host},
                           docker_config=tmp_path / "config")
    b_lines: list[str] = []
    host_b.build(request(f"buildq-test/endpoint:{nonce}",
                         {"Dockerfile": dockerfile, "late.txt": "b\n"},
                         cache_from=[f"{logical}/team/cached:{nonce}"],
                         registry_logins={logical: login}), b_lines.append)
    log = "\n".join(b_lines)
    assert f"importing cache manifest from {pushed}" in log, log
    assert "warning: the layer cache" not in log, log
    progress = Progress(lambda _: None)
    for line in b_lines:
        progress.feed(line)
    assert any(f"echo {nonce} > /nonce" in step for step in progress.cached_steps()), log
    assert PASSWORD not in log


def test_run_step_on_an_engine_without_its_default_network_names_the_setting(
    other_host: services.SecondEngine, base_image: str, lines: list[str], tmp_path: Path,
) -> None:
    host_b = DockerBuilder(other_host.socket, docker_config=tmp_path / "config")
    with pytest.raises(BuildError) as caught:
        host_b.build(BuildRequest(image="buildq-test/default-net:1", open_context=context(
            {"Dockerfile": f"FROM {base_image}\nRUN echo {uuid.uuid4().hex}\n"})), lines.append)
    assert "network bridge not found" in caught.value.message
    assert "BUILDQ_NETWORK_MODE" in (caught.value.hint or "")
