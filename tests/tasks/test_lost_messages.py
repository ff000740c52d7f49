"""A request whose message the broker lost before any worker ran it is sent again.

A Redis crash between a worker's pop of the message and kombu's record of it as unacked
drops the message: this test takes it out of the queue the same way (a pop nobody
acknowledges) with no worker running, then starts the workers.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tasks import build_image
from tasks.keys import SUBMITTED, answered_key, events_key
from tests import services
from tests.tasks.conftest import Cluster, make_cluster, use_cluster

LEASE = 3


@pytest.fixture
def idle(tmp_path: Path, docker_engine: str,
         registry: services.RegistryServer) -> Iterator[Cluster]:
    (tmp_path / "cluster").mkdir()
    cluster = make_cluster(tmp_path / "cluster", registry, lease=LEASE)
    use_cluster(cluster)
    try:
        yield cluster
    finally:
        cluster.stop_all()
        cluster.redis.stop()


def test_a_message_lost_before_any_worker_took_it_is_sent_again_and_answered_once(
        idle: Cluster, tmp_path: Path, base_image: str) -> None:
    app = tmp_path / "app"
    app.mkdir()
    (app / "Dockerfile").write_text(f"FROM {base_image}\nCOPY msg.txt /msg.txt\n")
    (app / "msg.txt").write_text(f"lost {uuid.uuid4()}\n")
    lost = build_image.delay(str(app), destination=f"{idle.registry.host}/chain/lost")
    kept = build_image.delay(str(app), destination=f"{idle.registry.host}/chain/lost")
    client = idle.client()
    assert client.llen("control") == 2
    assert client.hexists(SUBMITTED, lost.id)
    # The oldest message, popped and never acknowledged: gone from Redis altogether.
    assert lost.id in str(client.rpop("control"))

    idle.start_worker("control")
    idle.start_worker("docker")
    records = [lost.get(timeout=180), kept.get(timeout=180)]
    assert [r["id"] for r in records] == [lost.id, kept.id]
    assert sorted(r["status"] for r in records) == ["built", "skipped"] or \
        [r["attached"] for r in records].count(True) == 1, records
    assert records[0]["digest"] == records[1]["digest"]
    assert client.hlen(SUBMITTED) == 0
    # One answer each, claimed once: the resent request's events end at most once (a
    # request answered as attached to the other's build has no "done" of its own).
    assert client.get(answered_key(lost.id)) is not None
    done = [f for _, f in client.xrange(events_key(lost.id)) if f.get("kind") == "done"]
    assert len(done) <= 1, done
