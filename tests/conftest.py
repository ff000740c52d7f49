"""Session-wide real services. Started once; torn down at the end."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import services


@pytest.fixture(scope="session")
def docker_engine() -> str:
    services.ensure_docker_engine()
    return services.ensure_base_image()


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[services.RegistryServer]:
    server = services.start_registry(tmp_path_factory.mktemp("registry"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[services.RedisServer]:
    server = services.start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: services.RedisServer) -> Iterator[str]:
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    yield redis_server.url
    client.close()


@pytest.fixture
def base_image(docker_engine: str) -> str:
    return docker_engine


@pytest.fixture
def app_dir(tmp_path: Path, base_image: str) -> Path:
    """A small app whose image prints a line."""
    root = tmp_path / "app"
    root.mkdir()
    (root / "Dockerfile").write_text(
        f"FROM {base_image}\nCOPY hello.txt /hello.txt\nCMD [\"cat\", \"/hello.txt\"]\n"
    )
    (root / "hello.txt").write_text("hello from buildq\n")
    return root


# --- storage stand-ins for the context stores ---------------------------------------------


def _stand_in(factory: object, root: Path, **kwargs: object) -> services.StandIn:
    # Skip (loudly) only when the stand-in cannot be installed; anything else is a failure.
    try:
        return factory(root, **kwargs)  # type: ignore[operator]
    except (ImportError, FileNotFoundError) as exc:
        pytest.skip(f"storage stand-in unavailable: {exc}")


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[services.StandIn]:
    server = _stand_in(services.start_moto, tmp_path_factory.mktemp("moto"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[services.StandIn]:
    server = _stand_in(services.start_gcs_emulator, tmp_path_factory.mktemp("gcs"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[services.StandIn]:
    server = _stand_in(services.start_azurite, tmp_path_factory.mktemp("azurite"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def azurite_https(tmp_path_factory: pytest.TempPathFactory) -> Iterator[services.StandIn]:
    server = _stand_in(services.start_azurite, tmp_path_factory.mktemp("azurite-https"), https=True)
    yield server
    server.stop()


# --- Kubernetes API stand-in for the kaniko pool (see tests/k8s_standin.py) ---------------


@pytest.fixture(scope="session")
def kube_standin(docker_engine: str) -> Iterator[object]:
    """The API stand-in and its docker kubelet, shared by the kaniko tests."""
    from tests.k8s_standin import KubeStandIn

    server = KubeStandIn().start()
    yield server
    server.stop()
