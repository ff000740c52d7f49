"""DockerBuilder against the real Docker Engine and a real registry.

Every test runs with each frontend a build host may have: BuildKit through Debian's
docker CLI (``DOCKER_BUILDKIT=1 docker build``), BuildKit through the buildx plugin, and
the legacy builder where the only docker CLI has no BuildKit (the static 28.x client).
"""

from __future__ import annotations

import base64
import io
import logging
import os
import random
import tarfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import BinaryIO

import docker
import pytest

from config.errors import (
    BuildCancelledError,
    BuildError,
    BuildqError,
    InputError,
    RegistryError,
    ServiceError,
    TransientRegistryError,
)
from tests import services
from workers.builders.base import BuildRequest, engine_available
from workers.builders.docker import DockerBuilder, split_image
from workers.builders.noop import NoopBuilder

USER, PASSWORD = "builder", "s3cret-Push-Pa55"


def context(files: dict[str, str]) -> Callable[[], AbstractContextManager[BinaryIO]]:
    """A gzipped tar build context opened afresh on each call, like a store's reader."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    payload = buffer.getvalue()

    @contextmanager
    def open_context() -> Iterator[BinaryIO]:
        yield io.BytesIO(payload)

    return open_context


def request(image: str, dockerfile: str, **kwargs: object) -> BuildRequest:
    files = {"Dockerfile": dockerfile, "hello.txt": "hello from buildq\n"}
    return BuildRequest(image=image, open_context=context(files), network_mode="none",
                        **kwargs)  # type: ignore[arg-type]


#: frontend → what the builder must report for it.
FRONTENDS = {"buildkit": "buildkit", "buildx": "buildkit", "legacy": "legacy"}


def make_builder(kind: str, scratch: Path) -> DockerBuilder:
    """A DockerBuilder that finds the docker CLI ``kind`` names, or skips loudly without it."""
    if kind == "buildkit":
        built = DockerBuilder(docker_config=scratch / "no-config")
    elif kind == "legacy":
        search = services.docker_cli_without_buildkit(scratch / "legacy-cli")
        if search is None:
            pytest.skip("no docker CLI without BuildKit on this machine")
        built = DockerBuilder(cli_path=search, docker_config=scratch / "no-config")
    else:
        config = services.buildx_config_dir()
        if config is None:
            pytest.skip("the buildx plugin cannot be built here (no Go toolchain)")
        cli = services.docker_cli_without_buildkit(scratch / "buildx-cli")
        built = DockerBuilder(cli_path=cli, docker_config=config)
    assert built.frontend == FRONTENDS[kind], built.legacy_reason
    return built


@pytest.fixture(scope="module", params=list(FRONTENDS))
def builder(request: pytest.FixtureRequest, docker_engine: str,
            tmp_path_factory: pytest.TempPathFactory) -> DockerBuilder:
    return make_builder(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[services.RegistryServer]:
    server = services.start_htpasswd_registry(tmp_path_factory.mktemp("auth-registry"),
                                              {USER: PASSWORD})
    yield server
    server.stop()


@pytest.fixture
def lines() -> list[str]:
    return []


def test_build_then_push_returns_the_registrys_digest(
    builder: DockerBuilder, registry: services.RegistryServer, base_image: str, lines: list[str]
) -> None:
    image = f"{registry.host}/team/app:push1"
    nonce = uuid.uuid4().hex  # defeats the build cache, so the RUN step really runs
    dockerfile = f"FROM {base_image}\nCOPY hello.txt /hello.txt\nRUN echo run-{nonce}\n"
    image_id = builder.build(request(image, dockerfile), lines.append)
    assert image_id.startswith("sha256:")
    assert builder.has_image(image)
    # The step's output line, as the build printed it (BuildKit prefixes step and time).
    assert any(line.endswith(f"run-{nonce}") for line in lines), lines

    digest = builder.push(image, None, lines.append)

    assert digest.startswith("sha256:")
    assert digest == registry.digest("team/app", "push1")


def test_build_applies_build_args_target_and_labels(
    builder: DockerBuilder, base_image: str, lines: list[str]
) -> None:
    dockerfile = (
        f"FROM {base_image} AS first\nARG GREETING=unset\nENV GREETING=$GREETING\n"
        "LABEL stage=first\n"
        f"FROM {base_image} AS second\nLABEL stage=second\n"
    )
    image = "buildq-test/options:1"
    builder.build(
        request(image, dockerfile, build_args={"GREETING": "hi there"}, target="first",
                labels={"org.example.team": "ml"}),
        lines.append,
    )
    config = docker.from_env().api.inspect_image(image)["Config"]
    assert "GREETING=hi there" in config["Env"]
    assert config["Labels"]["stage"] == "first"
    assert config["Labels"]["org.example.team"] == "ml"
    builder.remove_image(image)
    assert not builder.has_image(image)


def test_dockerfile_syntax_error_quotes_dockers_message_and_line(
    builder: DockerBuilder, base_image: str, lines: list[str]
) -> None:
    with pytest.raises(BuildError) as caught:
        builder.build(request("buildq-test/bad:1", f"FROM {base_image}\nFROBNICATE now\n"),
                      lines.append)
    message = str(caught.value)
    assert "line 2" in message
    assert "unknown instruction" in message.lower()
    assert "Dockerfile" in message


def test_failing_run_names_the_step_exit_code_and_last_output(
    builder: DockerBuilder, base_image: str, lines: list[str]
) -> None:
    dockerfile = (f"FROM {base_image}\nRUN echo preparing\n"
                  "RUN echo compiling && echo 'error: widget missing' >&2 && exit 7\n")
    with pytest.raises(BuildError) as caught:
        builder.build(request("buildq-test/fails:1", dockerfile), lines.append)
    message = caught.value.message
    assert "step 3/3" in message
    assert "exit code 7" in message
    assert "error: widget missing" in message
    assert "\n" not in message
    assert caught.value.hint


def test_missing_base_image_says_it_cannot_be_pulled(
    builder: DockerBuilder, registry: services.RegistryServer, lines: list[str]
) -> None:
    missing = f"{registry.host}/nobody/nothing:404"
    with pytest.raises(BuildError) as caught:
        builder.build(request("buildq-test/orphan:1", f"FROM {missing}\nRUN true\n"),
                      lines.append)
    message = caught.value.message
    assert missing in message
    assert "cannot be pulled" in message
    assert "FROM" in (caught.value.hint or "")


def sleeping(seconds: int) -> list[str]:
    """Pids of processes running ``sleep SECONDS`` (a step's, seen from the host)."""
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if cmdline == f"sleep\0{seconds}\0".encode():
                found.append(pid)
    return found


def test_build_past_its_timeout_is_cancelled_within_seconds(
    builder: DockerBuilder, base_image: str, lines: list[str]
) -> None:
    # A sleep of its own length, to find its process among whatever else runs here.
    seconds = random.randint(300, 999)
    dockerfile = (f"FROM {base_image}\nRUN echo started-{uuid.uuid4().hex} && "
                  f"sleep {seconds}\n")
    # Long enough for the step to start on a loaded host: the point is that a running
    # step is stopped, so it must have run before the timeout.
    started = time.monotonic()
    with pytest.raises(BuildError) as caught:
        builder.build(request("buildq-test/slow:1", dockerfile, timeout=15.0), lines.append)
    assert time.monotonic() - started < 21
    assert "15 s" in caught.value.message
    assert "BUILDQ_BUILD_TIMEOUT" in str(caught.value)
    assert any("started-" in line for line in lines), "the step never ran"
    # The engine must have stopped the step, not merely lost its audience.
    client = docker.from_env()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        running = [c for c in client.containers.list()
                   if f"sleep {seconds}" in " ".join(c.attrs["Config"].get("Cmd") or [])]
        if not running and not sleeping(seconds):
            break
        time.sleep(0.2)
    assert not running and not sleeping(seconds)
    assert not builder.has_image("buildq-test/slow:1")


def test_a_cancelled_build_is_stopped_on_the_engine(
    builder: DockerBuilder, base_image: str, lines: list[str]
) -> None:
    seconds = random.randint(300, 999)
    marker = f"started-{uuid.uuid4().hex}"
    dockerfile = f"FROM {base_image}\nRUN echo {marker} && sleep {seconds}\n"
    cancel = threading.Event()

    def cancel_once_running() -> None:
        # When the step's own process runs on the host (its output may lag behind it).
        deadline = time.monotonic() + 120
        while not sleeping(seconds) and time.monotonic() < deadline:
            time.sleep(0.1)
        cancel.set()

    threading.Thread(target=cancel_once_running, daemon=True).start()
    slow = request("buildq-test/cancelled:1", dockerfile, timeout=600.0)
    slow.cancel = cancel
    with pytest.raises(BuildCancelledError) as caught:
        builder.build(slow, lines.append)
    assert cancel.is_set() and "cancelled" in caught.value.message
    # The engine stopped the step (it would sleep for minutes): give it a few seconds.
    deadline = time.monotonic() + 20
    while sleeping(seconds) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not sleeping(seconds)
    assert not builder.has_image("buildq-test/cancelled:1")


def test_push_with_wrong_credentials_is_a_registry_error_with_a_hint(
    builder: DockerBuilder, auth_registry: services.RegistryServer, base_image: str,
    lines: list[str],
) -> None:
    image = f"{auth_registry.host}/team/app:denied"
    builder.build(request(image, f"FROM {base_image}\nCOPY hello.txt /\n"), lines.append)
    with pytest.raises(RegistryError) as caught:
        builder.push(image, {"username": USER, "password": "wrong"}, lines.append)
    assert not isinstance(caught.value, TransientRegistryError)
    assert auth_registry.host in caught.value.message
    assert "BUILDQ_REGISTRY_USERNAME" in (caught.value.hint or "")


def test_push_to_an_unreachable_registry_is_transient(
    builder: DockerBuilder, base_image: str, lines: list[str]
) -> None:
    image = f"127.0.0.1:{services.free_port()}/team/app:nowhere"
    builder.build(request(image, f"FROM {base_image}\n"), lines.append)
    with pytest.raises(TransientRegistryError) as caught:
        builder.push(image, None, lines.append)
    assert "connection refused" in caught.value.message
    builder.remove_image(image)


def test_no_credential_appears_in_anything_logged(
    builder: DockerBuilder, auth_registry: services.RegistryServer, base_image: str,
    lines: list[str], caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    image = f"{auth_registry.host}/team/app:secret"
    builder.build(request(image, f"FROM {base_image}\nCOPY hello.txt /\n"), lines.append)
    digest = builder.push(image, {"username": USER, "password": PASSWORD}, lines.append)
    assert digest.startswith("sha256:")
    encoded = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    logged = "\n".join(lines) + "\n" + caplog.text
    assert lines
    assert PASSWORD not in logged
    assert encoded not in logged
    assert encoded[:16] not in logged  # no fragment of the X-Registry-Auth payload either


def test_unreachable_engine_is_a_service_error_with_a_hint(tmp_path: Path) -> None:
    socket_path = f"unix://{tmp_path / 'no-docker.sock'}"
    assert not engine_available(socket_path)
    with pytest.raises(ServiceError) as caught:
        DockerBuilder(socket_path)
    assert isinstance(caught.value, BuildqError)
    assert "no-docker.sock" in caught.value.message
    assert "dockerd" in (caught.value.hint or "")


def test_engine_available_answers_for_the_running_engine(docker_engine: str) -> None:
    assert engine_available()
    assert engine_available(f"unix://{services.DOCKER_SOCKET}")


def test_noop_builder_refuses_and_says_how_to_enable_building() -> None:
    noop = NoopBuilder()
    with pytest.raises(InputError) as caught:
        noop.build(request("x/y:1", "FROM scratch\n"), print)
    assert "builder.type: noop" in caught.value.message
    assert "builder.type: docker" in (caught.value.hint or "")
    assert "kaniko" in (caught.value.hint or "")
    with pytest.raises(InputError):
        noop.push("x/y:1", None, print)


@pytest.mark.parametrize(("image", "expected"), [
    ("127.0.0.1:5000/team/app:abc", ("127.0.0.1:5000/team/app", "abc")),
    ("127.0.0.1:5000/team/app", ("127.0.0.1:5000/team/app", "latest")),
    ("app:1", ("app", "1")),
])
def test_split_image_tells_a_port_from_a_tag(image: str, expected: tuple[str, str]) -> None:
    assert split_image(image) == expected
