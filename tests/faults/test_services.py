"""Services failing under running builds: Redis restarted, the registry down (for 30 s,
then for good), the context store down during an upload."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tasks import build_image, outcome
from tests.faults.conftest import (
    MAX_RETRIES,
    RETRY_BASE,
    FaultCluster,
    Gates,
    assert_nothing_left,
    assert_one_image,
    events,
    git_app,
    retry_budget,
    step_runs,
    wait_quiet,
)

pytestmark = pytest.mark.faults


def _retries(faults: FaultCluster, request_id: str, stage: str) -> list[dict[str, str]]:
    return [e for e in events(faults.client(), request_id)
            if e.get("kind") == "retry" and e.get("stage") == stage]


def _assert_backoff(retries: list[dict[str, str]]) -> None:
    """The n-th pause is drawn from [base * 2**n / 2, base * 2**n] (full jitter, doubling)."""
    for n, event in enumerate(retries):
        ceiling = RETRY_BASE * 2 ** n
        assert ceiling / 2 - 0.05 <= float(event["countdown"]) <= ceiling + 0.05, (n, event)


def _no_locks(faults: FaultCluster) -> None:
    client = faults.client()
    assert list(client.scan_iter(match="buildq:lock:*")) == []
    assert client.scard("buildq:pending") == 0
    assert client.hlen("buildq:inflight") == 0


def test_redis_restarted_with_ten_builds_in_flight_builds_each_once(
        faults: FaultCluster, tmp_path: Path, base_image: str) -> None:
    markers = [f"ran-redis-build-{i}" for i in range(10)]
    sources = [git_app(tmp_path, base_image, f"RUN echo {m} && sleep 1\n") for m in markers]
    results = [build_image.delay(source, destination=f"{faults.registry.host}/faults/redis-{i}")
               for i, source in enumerate(sources)]

    def building() -> bool:
        return any(e.get("stage") == "build" for r in results for e in events(faults.client(), r.id))

    deadline = time.monotonic() + 60
    while not building():
        assert time.monotonic() < deadline, "no build started"
        time.sleep(0.1)
    # Some build runs, others wait in the queues: restart Redis under all of them.
    faults.restart_redis()

    records = [r.get(timeout=240) for r in results]
    wait_quiet(faults, timeout=60)
    client = faults.client()
    for i, (result, record, marker) in enumerate(zip(results, records, markers, strict=True)):
        assert record["status"] == "built", record["error"]
        assert_one_image(faults, f"faults/redis-{i}", record)
        # "built" says the step ran; the log says it ran no second time. (Not "== 1": a log
        # line written while Redis was restarting is dropped, so the one run may not show.)
        assert step_runs(client, record["source_hash"], marker) <= 1, i
        assert [e["kind"] for e in events(client, result.id) if e["kind"] == "done"] == ["done"]
        assert_nothing_left(faults, record)
    _no_locks(faults)


def _held_at_push(faults: FaultCluster, gates: Gates, tmp_path: Path, base_image: str,
                  repository: str) -> Any:
    source = git_app(tmp_path, base_image, "RUN echo pushed-after-a-fault\n")
    gates.arm("push")
    result = build_image.delay(source, destination=f"{faults.registry.host}/{repository}")
    gates.wait_held("push")
    return result


def test_registry_down_for_30s_during_a_push_is_retried_with_backoff(
        faults: FaultCluster, gates: Gates, tmp_path: Path, base_image: str) -> None:
    result = _held_at_push(faults, gates, tmp_path, base_image, "faults/registry-blip")
    faults.registry.stop()
    gates.release("push")
    time.sleep(30)
    faults.restart_registry()

    record = result.get(timeout=retry_budget() + 60)
    assert record["status"] == "built", record["error"]
    assert_one_image(faults, "faults/registry-blip", record)
    retries = _retries(faults, result.id, "push")
    assert len(retries) >= 2, retries
    assert faults.registry.host in retries[0]["error"]
    _assert_backoff(retries)
    wait_quiet(faults)
    assert_nothing_left(faults, record)


def test_registry_down_for_good_fails_naming_it_within_the_retry_budget(
        faults: FaultCluster, gates: Gates, tmp_path: Path, base_image: str) -> None:
    result = _held_at_push(faults, gates, tmp_path, base_image, "faults/registry-gone")
    faults.registry.stop()
    down_at = time.monotonic()
    gates.release("push")

    record = outcome(result, timeout=retry_budget() + 90)
    elapsed = time.monotonic() - down_at
    assert record["status"] == "failed", record
    assert faults.registry.host in record["error"], record["error"]
    assert "Traceback" not in record["error"]
    retries = _retries(faults, result.id, "push")
    assert len(retries) == MAX_RETRIES, retries
    _assert_backoff(retries)
    # The pauses, plus a few seconds per refused push attempt.
    assert elapsed <= retry_budget() + 5 * (MAX_RETRIES + 1), elapsed
    wait_quiet(faults)
    assert_nothing_left(faults, record)


def test_context_store_down_during_upload_is_retried_then_succeeds(
        faults: FaultCluster, gates: Gates, tmp_path: Path, base_image: str) -> None:
    proxy = faults.store_proxy
    assert proxy is not None
    source = git_app(tmp_path, base_image, "RUN echo uploaded-after-a-fault\n")
    gates.arm("upload")
    result = build_image.delay(source, destination=f"{faults.registry.host}/faults/store-blip")
    gates.wait_held("upload")
    proxy.down()
    gates.release("upload")
    time.sleep(10)
    refused = proxy.refused
    proxy.up()

    record = result.get(timeout=retry_budget() + 60)
    assert refused > 0, "the upload never tried the store while it was down"
    assert record["status"] == "built", record["error"]
    assert_one_image(faults, "faults/store-blip", record)
    wait_quiet(faults)
    assert_nothing_left(faults, record)
