"""The per-hash lock's scripts against a real Redis."""

from __future__ import annotations

import json
import time

import pytest
import redis

from tasks import inflight
from tasks.events import add_started
from tasks.keys import (
    INFLIGHT,
    PENDING_INDEX,
    answered_key,
    cancel_key,
    events_key,
    lease_key,
    lock_key,
    pending_key,
    record_key,
)
from tasks.lock import Lease, new_token, orphaned_hashes, take_over
from tasks.records import FIRST, add_claim, claim_answer
from tasks.scripts import SOURCES, script
from tasks.state import BuildState

HASH = "ab" * 32


@pytest.fixture
def client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url, decode_responses=True)


def lease(client: redis.Redis, request_id: str, seconds: float = 5.0, token: str | None = None) -> Lease:
    return Lease(client, HASH, token or new_token(), seconds, request_id)


def test_second_request_waits_and_receives_the_holders_pending_list(client: redis.Redis) -> None:
    holder, waiter = lease(client, "req-1"), lease(client, "req-2")
    assert holder.acquire({"request_id": "req-1"}) is True
    assert waiter.acquire({"request_id": "req-2"}) is False
    assert client.get(lock_key(HASH)) == holder.token

    pending = holder.finish({"status": "built"})
    assert pending is not None and set(pending) == {"req-1", "req-2"}
    assert client.get(lock_key(HASH)) is None
    assert json.loads(client.get(record_key(HASH)) or "{}") == {"status": "built"}
    assert not client.sismember(PENDING_INDEX, HASH)


def test_the_lock_takes_a_request_out_of_the_in_flight_map_in_the_same_step(
        client: redis.Redis) -> None:
    for request_id in ("req-1", "req-2"):
        inflight.register(client, BuildState(request_id=request_id, source={}), 5.0)
        assert client.hexists(INFLIGHT, request_id) and client.exists(lease_key(request_id))
    # The holder and a waiter alike: the pending map keeps each restartable from here on.
    assert lease(client, "req-1").acquire({"request_id": "req-1"}) is True
    assert lease(client, "req-2").acquire({"request_id": "req-2"}) is False
    for request_id in ("req-1", "req-2"):
        assert not client.hexists(INFLIGHT, request_id)
        assert not client.exists(lease_key(request_id))
        assert client.hexists(pending_key(HASH), request_id)


def test_only_the_owner_can_finish(client: redis.Redis) -> None:
    holder = lease(client, "req-1")
    holder.acquire({})
    intruder = lease(client, "req-2")
    assert intruder.finish({"status": "failed"}) is None
    assert client.get(lock_key(HASH)) == holder.token
    assert client.get(record_key(HASH)) is None


def test_heartbeat_keeps_the_lock_past_its_lease(client: redis.Redis) -> None:
    holder = lease(client, "req-1", seconds=0.6)
    holder.acquire({})
    with holder.heartbeat():
        time.sleep(1.5)
        assert client.get(lock_key(HASH)) == holder.token
    assert not holder.lost.is_set()


def test_frozen_holder_cannot_release_or_overwrite_its_successor(client: redis.Redis) -> None:
    frozen = lease(client, "req-1", seconds=0.3)
    frozen.acquire({"request_id": "req-1", "created_at": 1})
    lease(client, "req-2").acquire({"request_id": "req-2", "created_at": 2})
    time.sleep(0.5)  # the frozen holder's lease runs out

    assert orphaned_hashes(client) == [HASH]
    claim = take_over(client, HASH, 5.0)
    assert claim is not None
    token, pending = claim
    assert set(pending) == {"req-1", "req-2"}
    # Only one waiter can take over.
    assert take_over(client, HASH, 5.0) is None

    # The frozen holder wakes up: it can neither renew, nor write, nor release.
    assert frozen.extend() is False
    assert frozen.lost.is_set()
    assert frozen.finish({"status": "built", "by": "frozen"}) is None
    assert client.get(lock_key(HASH)) == token
    assert client.get(record_key(HASH)) is None

    successor = Lease(client, HASH, token, 5.0, "req-1")
    assert successor.finish({"status": "built", "by": "successor"}) is not None
    assert json.loads(client.get(record_key(HASH)) or "{}")["by"] == "successor"


def test_redelivered_stage_retakes_an_expired_lease_while_its_request_is_pending(
        client: redis.Redis) -> None:
    holder = lease(client, "req-1", seconds=0.2)
    holder.acquire({"request_id": "req-1"})
    time.sleep(0.35)
    assert client.get(lock_key(HASH)) is None
    assert holder.extend() is True
    assert client.get(lock_key(HASH)) == holder.token


def test_stage_of_a_finished_build_cannot_retake_the_lock(client: redis.Redis) -> None:
    holder = lease(client, "req-1")
    holder.acquire({"request_id": "req-1"})
    assert holder.finish({"status": "built"}) is not None
    late = Lease(client, HASH, holder.token, 5.0, "req-1")
    assert late.extend() is False
    assert client.get(lock_key(HASH)) is None


def test_no_takeover_while_the_holder_is_alive(client: redis.Redis) -> None:
    lease(client, "req-1").acquire({"request_id": "req-1"})
    lease(client, "req-2").acquire({"request_id": "req-2"})
    assert orphaned_hashes(client) == []
    assert take_over(client, HASH, 5.0) is None


# -- scripts sent with other commands in one round trip (a stage boundary) --------------


def _stage_events(client: redis.Redis, request_id: str) -> list[tuple[str, str]]:
    return [(f["stage"], f["state"]) for _, f in client.xrange(events_key(request_id))]


def test_scripts_sent_with_other_commands_run_even_after_redis_forgot_them(
        client: redis.Redis) -> None:
    holder = lease(client, "req-1", seconds=5.0)
    assert holder.acquire({"request_id": "req-1"})
    # As after a Redis restart: the server knows no script this client loaded.
    client.script_flush()
    client.pexpire(lock_key(HASH), 100)
    pipe = client.pipeline(transaction=True)
    extended = holder.add_extend(pipe)
    started = add_started(pipe, client, "req-1", "exists", look=True, lock=lock_key(HASH),
                          token=holder.token)
    replies = pipe.execute(raise_on_error=False)
    assert all(isinstance(r, redis.exceptions.NoScriptError) for r in replies), replies
    assert extended(replies[0]) is True
    assert started(replies[1]) is True
    assert client.pttl(lock_key(HASH)) > 1000  # renewed to the full lease again
    assert _stage_events(client, "req-1") == [("exists", "started")]


def test_a_release_sent_behind_the_claims_never_overtakes_one_that_did_not_run(
        client: redis.Redis) -> None:
    # Redis restarted and another client loaded release.lua again, but not answer.lua: in
    # the claims' round trip, the claim fails (NOSCRIPT) and the release would run. It must
    # not: the request would be neither answered nor pending, an answer lost for good.
    holder = lease(client, "req-1")
    assert holder.acquire({"request_id": "req-1"})
    assert lease(client, "req-2").acquire({"request_id": "req-2"}) is False
    written = holder.write_record({"status": "built"}, "attempt-1", 0)
    assert written is not None and not isinstance(written, str)
    client.script_flush()
    # Loads release.lua only (with a lock key nobody holds: it releases nothing).
    script(client, "release")(keys=["unrelated"], args=["no-such-token", HASH, 1])
    pipe = client.pipeline(transaction=False)
    claimed = [add_claim(pipe, client, r, "attempt-1", store=(f"result-{r}", "answer", 60))
               for r in ("req-1", "req-2")]
    released = holder.add_release(pipe, ["req-1", "req-2"])
    replies = pipe.execute(raise_on_error=False)
    assert [type(r) for r in replies[:2]] == [redis.exceptions.NoScriptError] * 2, replies
    assert replies[2] == -1  # released nothing, with the claims not there
    assert client.get(lock_key(HASH)) == holder.token
    assert set(client.hkeys(pending_key(HASH))) == {"req-1", "req-2"}
    # The readers, in order: each claim runs on its own, then the release goes through.
    assert [read(reply) for read, reply in zip(claimed, replies, strict=False)] == [FIRST, FIRST]
    assert released(replies[2]) is True
    assert client.get(lock_key(HASH)) is None
    assert client.hkeys(pending_key(HASH)) == []
    assert client.get("result-req-2") == "answer"


def test_a_claim_that_fails_half_way_leaves_its_request_unanswered_and_the_lock_held(
        client: redis.Redis) -> None:
    # The claim's script stops at an error (here its events key holds a string, so XADD
    # fails): what it wrote before stays, but it must not have marked the request answered,
    # or the release sent behind it would drop a request whose answer was never stored.
    holder = lease(client, "req-1")
    assert holder.acquire({"request_id": "req-1"})
    assert holder.write_record({"status": "built"}, "attempt-1", 0) is not None
    client.set(events_key("req-1"), "not a stream")
    for name in ("answer", "release"):
        client.script_load(SOURCES[name])
    pipe = client.pipeline(transaction=False)
    claimed = add_claim(pipe, client, "req-1", "attempt-1", done="built",
                        store=("result-req-1", "answer", 60))
    released = holder.add_release(pipe, ["req-1"])
    replies = pipe.execute(raise_on_error=False)
    assert isinstance(replies[0], redis.exceptions.ResponseError), replies
    assert not isinstance(replies[0], redis.exceptions.NoScriptError)
    assert replies[1] == -1
    assert client.get(answered_key("req-1")) is None
    assert client.get(lock_key(HASH)) == holder.token
    with pytest.raises(redis.exceptions.ResponseError):
        claimed(replies[0])
    # The chain repeats its record stage: the same attempt answers and releases.
    client.delete(events_key("req-1"))
    assert claim_answer(client, "req-1", "attempt-1", done="built",
                        store=("result-req-1", "answer", 60)) == FIRST
    assert released(replies[1]) is True
    assert client.get("result-req-1") == "answer"
    assert client.get(lock_key(HASH)) is None


def test_a_started_event_is_written_only_for_a_stage_that_will_run(client: redis.Redis) -> None:
    def enter(request_id: str, look: bool, token: str = "") -> bool:
        pipe = client.pipeline(transaction=True)
        started = add_started(pipe, client, request_id, "hash", look=look,
                              lock=lock_key(HASH) if token else "", token=token)
        return started(pipe.execute(raise_on_error=False)[0])

    assert enter("free", look=True) is True
    client.set(cancel_key("cancelled"), json.dumps({"by": "someone", "at": 1.0}))
    assert enter("cancelled", look=True) is False
    # The record stage runs whatever the flag says (it cleans up and answers).
    assert enter("cancelled", look=False) is True
    holder = lease(client, "req-1")
    assert holder.acquire({"request_id": "req-1"})
    assert enter("holder", look=True, token=holder.token) is True
    assert enter("stale", look=True, token=new_token()) is False
    assert _stage_events(client, "free") == [("hash", "started")]
    assert _stage_events(client, "cancelled") == [("hash", "started")]
    assert _stage_events(client, "holder") == [("hash", "started")]
    assert _stage_events(client, "stale") == []
