"""buildq flower: a login by default, --no-auth only on loopback, the API and /metrics work."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests import services

REPO = Path(__file__).resolve().parents[2]


def _flower(env: dict[str, str], *args: str, **kwargs: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "tasks.cli", "flower", *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)  # type: ignore[call-overload]


@pytest.fixture
def env(redis_url: str) -> dict[str, str]:
    import os

    env = {**os.environ, "BUILDQ_REDIS_URL": redis_url, "PYTHONPATH": str(REPO)}
    env.pop("BUILDQ_FLOWER_BASIC_AUTH", None)
    return env


def test_refuses_to_start_without_a_login(env: dict[str, str]) -> None:
    proc = _flower(env, "--port", str(services.free_port()))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert b"Flower needs a login" in err and b"BUILDQ_FLOWER_BASIC_AUTH" in err


@pytest.mark.parametrize("args", [["--no-auth", "--address", "0.0.0.0"],
                                  ["--basic-auth", "nopassword"],
                                  ["--basic-auth", "u:p", "--basic_auth=x:y"]])
def test_bad_auth_options_are_refused(env: dict[str, str], args: list[str]) -> None:
    proc = _flower(env, "--port", str(services.free_port()), *args)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    assert b"error:" in err and b"Traceback" not in err


@pytest.fixture
def login_flower(env: dict[str, str]) -> Iterator[str]:
    port = services.free_port()
    proc = _flower({**env, "BUILDQ_FLOWER_BASIC_AUTH": "alice:s3cret-pass"}, "--port", str(port),
                   "--address", "127.0.0.1")
    url = f"http://127.0.0.1:{port}"
    try:
        services.wait_for(lambda: requests.get(f"{url}/healthcheck", timeout=1).ok, 30, "flower")
        # The password went through the environment, never onto Flower's command line.
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        assert b"s3cret-pass" not in cmdline and b"flower" in cmdline
        yield url
    finally:
        proc.terminate()
        proc.wait(15)


def test_login_is_required_and_metrics_work(login_flower: str) -> None:
    assert requests.get(f"{login_flower}/api/workers", timeout=10).status_code == 401
    assert requests.get(f"{login_flower}/tasks", auth=("alice", "wrong"), timeout=10).status_code == 401
    ok = requests.get(f"{login_flower}/api/workers", auth=("alice", "s3cret-pass"), timeout=30)
    assert ok.status_code == 200 and isinstance(ok.json(), dict)
    metrics = requests.get(f"{login_flower}/metrics", timeout=10)
    assert metrics.status_code == 200 and "# HELP flower_" in metrics.text


def test_no_auth_listens_on_loopback_only(env: dict[str, str]) -> None:
    port = services.free_port()
    proc = _flower(env, "--port", str(port), "--no-auth")
    try:
        services.wait_for(lambda: requests.get(f"http://127.0.0.1:{port}/healthcheck",
                                               timeout=1).ok, 30, "flower")
        assert requests.get(f"http://127.0.0.1:{port}/api/workers", timeout=30).status_code == 200
        listening = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True,
                                   text=True).stdout
        local = [line.split()[3] for line in listening.splitlines() if line.strip()]
        assert local and all(addr.startswith("127.0.0.1:") for addr in local), listening
    finally:
        proc.terminate()
        proc.wait(15)
