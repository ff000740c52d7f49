"""Redis crashing under running builds: SIGKILLed (no shutdown, nothing flushed on the way
out), kept down longer than the lock's lease, restarted on the same port and directory.

With the append-only file on, every request still gets exactly one answer, each source is
built at most once per lease epoch, and a second build is reported in the record. Without
persistence the crash loses the requests, which these tests pin as well, as the README says.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery.exceptions import TimeoutError as ResultTimeout

from tasks import build_image
from tests.faults.conftest import (
    BUCKET,
    LEASE,
    POOLS,
    AofTail,
    BuildCounter,
    FaultCluster,
    assert_nothing_left,
    events,
    git_app,
    s3,
    wait_quiet,
)

pytestmark = pytest.mark.faults

#: How long Redis stays down: past every lease, so each lock and in-flight lease has run out
#: when it is back, the live holders' too.
DOWN_FOR = LEASE + 4


@pytest.fixture
def counter(faults: FaultCluster) -> Iterator[BuildCounter]:
    """A build counter, and docker workers whose builds can reach it (the host's network)."""
    for pgid, (pool, _) in list(faults.workers.items()):
        if pool == "docker":
            _stop(faults, pgid)
    for _ in range(POOLS["docker"]):
        faults.start_worker("docker", env={"BUILDQ_NETWORK_MODE": "host"})
    counting = BuildCounter()
    yield counting
    counting.close()
    for pgid, (pool, _) in list(faults.workers.items()):
        if pool == "docker":
            _stop(faults, pgid)


def _stop(faults: FaultCluster, pgid: int) -> None:
    """Stop a worker as its supervisor would (it is idle: nothing is lost)."""
    proc = faults.workers.pop(pgid)[1]
    if proc.poll() is None:
        os.killpg(pgid, signal.SIGTERM)
        try:
            proc.wait(30)
        except Exception:
            os.killpg(pgid, signal.SIGKILL)
            proc.wait(10)


def _sources(tmp_path: Path, base_image: str, counter: BuildCounter, n: int,
             seconds: int = 3) -> list[tuple[str, str]]:
    """(git URL, marker) of ``n`` sources whose build step reports each run to ``counter``,
    then takes ``seconds``."""
    made = []
    for i in range(n):
        marker = f"crash-build-{i}-{time.monotonic_ns()}"
        step = f"RUN {counter.step(marker)} && sleep {seconds}\n"
        made.append((git_app(tmp_path, base_image, step), marker))
    return made


def _first_build_running(faults: FaultCluster, counter: BuildCounter, markers: list[str],
                         timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not any(counter.runs(m) for m in markers):
        assert time.monotonic() < deadline, "no build started"
        time.sleep(0.05)


def _answer(faults: FaultCluster, result: Any, timeout: float) -> dict[str, Any]:
    """The request's answer; if none comes, what Redis knows of it, to say why."""
    try:
        return dict(result.get(timeout=timeout))
    except ResultTimeout:
        client = faults.client()
        known = {"events": events(client, result.id),
                 "answered": client.get(f"buildq:answered:{result.id}"),
                 "inflight": client.hget("buildq:inflight", result.id),
                 "locks": {k: client.get(k) for k in client.scan_iter(match="buildq:lock:*")},
                 "pending": {k: client.hkeys(k) for k in client.scan_iter(match="buildq:pending:*")},
                 "queues": {q: client.llen(q) for q in ("control", "docker")}}
        raise AssertionError(f"request {result.id} got no answer: {known}") from None


def _check_builds(faults: FaultCluster, repositories: list[str], results: list[Any],
                  records: list[dict[str, Any]], markers: list[str], counter: BuildCounter) -> None:
    """One answer and one done per request; every real build counted by its record."""
    client = faults.client()
    for i, (repository, result, record, marker) in enumerate(
            zip(repositories, results, records, markers, strict=True)):
        assert record["status"] in ("built", "skipped"), record["error"]
        assert faults.registry.tags(repository) == [record["tag"]]
        assert faults.registry.digest(repository, record["tag"]) == record["digest"]
        done = [e for e in events(client, result.id) if e.get("kind") == "done"]
        assert [e["status"] for e in done] == [record["status"]], (i, done)
        # The answer stored for the request is the one its caller received.
        assert build_image.AsyncResult(result.id).get(timeout=5) == record
        stored = faults.client().get(f"buildq:record:{record['source_hash']}")
        assert stored is not None
        # A build step that really ran (not a cache hit) is counted by the record written
        # for it; any second one says why. (A cache hit may count without a run.)
        builds = _stored(faults, record)["builds"]
        assert counter.runs(marker) >= 1, (i, "the build step never ran")
        assert counter.runs(marker) <= builds, (i, counter.runs(marker), _stored(faults, record))
        if builds > 1:
            assert "built" in str(_stored(faults, record)["rebuilt"]), _stored(faults, record)
        else:
            assert _stored(faults, record)["rebuilt"] is None
        assert_nothing_left(faults, record)
    assert list(client.scan_iter(match="buildq:lock:*")) == []
    assert list(client.scan_iter(match="buildq:answering:*")) == []
    assert client.scard("buildq:pending") == 0
    assert client.hlen("buildq:inflight") == 0


def _stored(faults: FaultCluster, record: dict[str, Any]) -> dict[str, Any]:
    import json

    raw = faults.client().get(f"buildq:record:{record['source_hash']}")
    return dict(json.loads(str(raw)))


@pytest.mark.parametrize("lose", [0.0, 1.0], ids=["process-killed", "last-second-lost"])
def test_redis_killed_mid_build_and_down_past_the_lease_answers_each_request_once(
        faults: FaultCluster, counter: BuildCounter, tmp_path: Path, base_image: str,
        lose: float) -> None:
    client = faults.client()
    # What the README asks of an operator: append-only, fsync every second at least.
    client.config_set("appendfsync", "everysec")
    assert client.config_get("appendonly")["appendonly"] == "yes"
    sources = _sources(tmp_path, base_image, counter, 8)
    repositories = [f"faults/crash-{int(lose * 1000)}ms-{i}" for i in range(len(sources))]
    results = [build_image.delay(source, destination=f"{faults.registry.host}/{repository}")
               for (source, _), repository in zip(sources, repositories, strict=True)]
    sent = time.monotonic()
    markers = [m for _, m in sources]
    tail = AofTail(faults.redis.directory, lose) if lose else None
    _first_build_running(faults, counter, markers)
    # A request sent in the second a crash loses is lost with it (the README says so): the
    # ones here were sent before.
    time.sleep(max(0.0, sent + lose + 0.5 - time.monotonic()))
    # Mid-build: one build runs, others are queued, being hashed, or wait for a docker worker.
    faults.crash_redis(DOWN_FOR, tail)

    records = [_answer(faults, r, timeout=300) for r in results]
    wait_quiet(faults, timeout=120)
    _check_builds(faults, repositories, results, records, markers, counter)


def test_without_persistence_a_redis_crash_loses_what_waited_in_redis(
        faults: FaultCluster, counter: BuildCounter, tmp_path: Path, base_image: str) -> None:
    """What the README says happens without the append-only file: Redis comes back empty.
    A build a worker is running writes its state back and answers its request; a request
    attached to it and a stage queued for the docker pool were only in Redis: nothing
    restarts them, their callers wait until their own timeout, and the queued one's
    uploaded context stays in the store."""
    client = faults.client()
    client.config_set("appendonly", "no")
    before = set(faults.store_objects())
    try:
        # Three builds for two docker workers: two run, the third waits in the docker queue.
        sources = _sources(tmp_path, base_image, counter, 3, seconds=10)
        results = [build_image.delay(source,
                                     destination=f"{faults.registry.host}/faults/lost-{i}")
                   for i, (source, _) in enumerate(sources)]
        markers = [m for _, m in sources]
        deadline = time.monotonic() + 90
        while sum(1 for m in markers if counter.runs(m)) < 2 or not client.llen("docker"):
            assert time.monotonic() < deadline, "two builds never ran with a third queued"
            time.sleep(0.05)
        running = [i for i, m in enumerate(markers) if counter.runs(m)]
        (queued,) = set(range(3)) - set(running)
        # A second request for a running build waits in its pending map.
        attached = build_image.delay(sources[running[0]][0],
                                     destination=f"{faults.registry.host}/faults/lost-{running[0]}")
        deadline = time.monotonic() + 30
        while not any(e.get("kind") == "attached" for e in events(client, attached.id)):
            assert time.monotonic() < deadline, "the second request never attached"
            time.sleep(0.05)
        faults.crash_redis(DOWN_FOR, appendonly=False)
        client = faults.client()
        # Redis came back empty: the queued stage is gone. (Not "no lock": a running build's
        # heartbeat may already have written its own lock back, as extend.lua does by design.)
        assert client.llen("docker") == 0

        for i in running:
            record = results[i].get(timeout=120)
            assert record["status"] == "built" and counter.runs(markers[i]) == 1, record
        # No answer comes for the others, not after several leases (every watchdog looked).
        for lost in (attached, results[queued]):
            with pytest.raises(ResultTimeout):
                lost.get(timeout=3 * LEASE)
        assert counter.runs(markers[queued]) == 0
        wait_quiet(faults, timeout=120)
        assert list(client.scan_iter(match="buildq:lock:*")) == []
        assert client.scard("buildq:pending") == 0
        assert client.hlen("buildq:inflight") == 0
        assert sorted(p.name for p in faults.workdir.iterdir()) == []
        left = sorted(set(faults.store_objects()) - before)
        assert len(left) == 1 and left[0].startswith("contexts/"), left
    finally:
        # Back to the session's Redis: append-only, rewritten from what it holds now.
        faults.client().config_set("appendonly", "yes")
        faults.redis.appendonly = True
        s3_client = s3(faults.s3_endpoint)
        for key in faults.store_objects():
            s3_client.delete_object(Bucket=BUCKET, Key=key)
