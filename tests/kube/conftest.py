"""Fixtures for tests/kube: the real kaniko executor, built once from its Go module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import services
from tests.kube import kaniko


@pytest.fixture(scope="session")
def kaniko_executor() -> Path:
    """The static executor binary (a cold build takes minutes; later runs find it cached)."""
    return kaniko.build_executor(say=lambda _line: None)


@pytest.fixture(scope="session")
def kaniko_image(docker_engine: str, kaniko_executor: Path) -> str:
    """The executor packed as kaniko's own image is (a local reference: nothing is pulled)."""
    return kaniko.ensure_image(kaniko_executor, say=lambda _line: None)


#: The one login the push registry accepts (bcrypt in its htpasswd file).
PUSH_USER = ("kaniko-pusher", "push-secret-4d1e")


@pytest.fixture(scope="session")
def push_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[services.RegistryServer]:
    """A registry that refuses anonymous pulls and pushes: kaniko must use its docker config."""
    server = services.start_htpasswd_registry(tmp_path_factory.mktemp("push-registry"),
                                              dict([PUSH_USER]))
    yield server
    server.stop()
