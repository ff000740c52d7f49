"""The tag check started while a source is hashed (tasks/operations.py ``_check_ahead``),
against the real registry behind a proxy the tests can take down: its answer stands only
for the very image hashed, "absent" is asked again after the lock, and its failure is the
tag check's failure."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from config.errors import TransientRegistryError
from config.references import parse_image_ref
from config.settings import Settings
from tasks import operations
from tasks.state import BuildState
from tests import services
from tests.faults.proxy import FaultProxy
from tests.workers.test_registries import push_base


@pytest.fixture
def proxy(registry: services.RegistryServer) -> Iterator[FaultProxy]:
    host, port = registry.host.rsplit(":", 1)
    fronted = FaultProxy(host, int(port))
    try:
        yield fronted
    finally:
        fronted.up()
        fronted.close()


@pytest.fixture(autouse=True)
def _forget_checks() -> Iterator[None]:
    yield
    operations._last_tags.clear()
    operations._ahead.clear()


def _request(host: str, repository: str, source: str) -> BuildState:
    state = BuildState(request_id=str(uuid.uuid4()), source={"location": source, "ref": None})
    state.ref = parse_image_ref(f"{host}/{repository}")
    return state


def _hashed(state: BuildState, tag: str) -> None:
    """What the hash stage leaves in the state, and what it remembers of it."""
    assert state.ref is not None
    state.tag = tag
    state.ref = state.ref.tagged(tag)
    state.image = str(state.ref)
    operations._remember_tag(state)


def _hashed_before(registry: services.RegistryServer, proxy: FaultProxy, base_image: str,
                   source: str) -> tuple[str, str, str]:
    """A source hashed to ``t1`` before, pushed as such, in a repository reached through
    ``proxy``: (registry host as the requests name it, repository, pushed digest)."""
    repository = f"ahead/{uuid.uuid4().hex[:8]}"
    pushed = push_base(registry.host, repository, "t1", base_image)
    host = f"127.0.0.1:{proxy.port}"
    _hashed(_request(host, repository, source), "t1")
    return host, repository, pushed


def test_the_check_ahead_answers_for_the_image_hashed_and_only_for_it(
        registry: services.RegistryServer, proxy: FaultProxy, base_image: str) -> None:
    host, repository, pushed = _hashed_before(registry, proxy, base_image, "/src/app")
    settings = Settings.from_env({})

    # The source changed: it hashes to another tag, which is asked of the registry, not
    # answered by the check made (and found) for the old one.
    changed = _request(host, repository, "/src/app")
    ahead = operations._check_ahead(changed, settings)
    assert ahead is not None and ahead[1].result(timeout=30) == pushed
    _hashed(changed, "t2")
    operations._hand_ahead(changed, ahead)
    assert operations.exists(changed, settings) == "upload"

    same = _request(host, repository, "/src/app")
    _hashed(_request(host, repository, "/src/app"), "t1")
    ahead = operations._check_ahead(same, settings)
    assert ahead is not None and ahead[0] == f"{host}/{repository}:t1"
    assert ahead[1].result(timeout=30) == pushed
    # The registry is out of reach from here on: only the answer already in hand can do.
    proxy.down()
    _hashed(same, "t1")
    operations._hand_ahead(same, ahead)
    assert operations.exists(same, settings) == "record"
    assert same.status == "skipped" and same.digest == pushed
    assert proxy.refused == 0


def test_absent_is_asked_again_after_the_lock(
        registry: services.RegistryServer, base_image: str) -> None:
    # Another request pushed this very hash between the check ahead and our lock: building
    # it again would be a second build of one hash.
    repository = f"ahead/{uuid.uuid4().hex[:8]}"
    settings = Settings.from_env({})
    _hashed(_request(registry.host, repository, "/src/late"), "late")
    state = _request(registry.host, repository, "/src/late")
    ahead = operations._check_ahead(state, settings)
    assert ahead is not None and ahead[1].result(timeout=30) is None
    pushed = push_base(registry.host, repository, "late", base_image)
    _hashed(state, "late")
    operations._hand_ahead(state, ahead)
    assert operations.exists(state, settings) == "record"
    assert state.status == "skipped" and state.digest == pushed


def test_a_failed_check_ahead_fails_as_the_tag_check_and_is_not_reused(
        registry: services.RegistryServer, proxy: FaultProxy, base_image: str) -> None:
    host, repository, pushed = _hashed_before(registry, proxy, base_image, "/src/down")
    settings = Settings.from_env({})
    state = _request(host, repository, "/src/down")
    proxy.down()
    ahead = operations._check_ahead(state, settings)
    assert ahead is not None and isinstance(ahead[1].exception(timeout=30),
                                            TransientRegistryError)
    _hashed(state, "t1")
    operations._hand_ahead(state, ahead)
    # Transient: the stage is tried again, and that try asks the registry itself.
    with pytest.raises(TransientRegistryError):
        operations.exists(state, settings)
    proxy.up()
    assert operations.exists(state, settings) == "record"
    assert state.digest == pushed


def test_nothing_is_checked_ahead_for_a_new_source_or_a_forced_build(
        registry: services.RegistryServer) -> None:
    settings = Settings.from_env({})
    repository = f"ahead/{uuid.uuid4().hex[:8]}"
    assert operations._check_ahead(_request(registry.host, repository, "/src/new"),
                                   settings) is None
    _hashed(_request(registry.host, repository, "/src/new"), "t1")
    forced = _request(registry.host, repository, "/src/new")
    forced.force = True
    assert operations._check_ahead(forced, settings) is None
    # Another destination repository for the same source expects nothing either.
    assert operations._check_ahead(_request(registry.host, repository + "-other", "/src/new"),
                                   settings) is None
