"""One answer per request and one build per lease, at the level of the lock's scripts
against a real Redis: the repeats and duplicates a lost reply, a stage delivered twice or
a crashed Redis's lost writes produce, each played as the chain would meet it."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis

from config.settings import Settings
from tasks.keys import INFLIGHT, PENDING_INDEX, events_key, lock_key, pending_key, record_key
from tasks.lock import Lease, new_token, orphaned_hashes, take_over
from tasks.records import (
    AGAIN,
    FIRST,
    OTHER,
    backend_answer,
    claim_answer,
    count_late_build,
    rebuilt_reason,
)
from tasks.watchdog import redis_uptime, restart_orphans

HASH = "cd" * 32


@pytest.fixture
def client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url, decode_responses=True)


def lease(client: redis.Redis, request_id: str, token: str | None = None,
          entry: dict[str, Any] | None = None) -> Lease:
    return Lease(client, HASH, token or new_token(), 5.0, request_id, entry)


def dones(client: redis.Redis, request_id: str) -> list[str]:
    entries: Any = client.xrange(events_key(request_id))
    return [fields["status"] for _, fields in entries if fields.get("kind") == "done"]


def test_the_record_stage_repeated_after_a_lost_reply_answers_each_request_once(
        client: redis.Redis) -> None:
    holder, waiter = lease(client, "req-1"), lease(client, "req-2")
    holder.acquire({"request_id": "req-1"})
    waiter.acquire({"request_id": "req-2"})

    written = holder.write_record({"status": "built", "run": 1}, "attempt-1", 0)
    assert written is not None and not isinstance(written, str)
    record, pending = written
    assert set(pending) == {"req-1", "req-2"}
    # The done event goes with the answer of the request the chain ran for.
    claims = [claim_answer(client, "req-1", "attempt-1", "built"),
              claim_answer(client, "req-2", "attempt-1")]
    assert claims == [FIRST] * 2
    # The reply of the claims was lost: the same attempt repeats the whole stage. It gets the
    # record it wrote (not a second one) and may store its answers again, with no second done.
    again = holder.write_record({"status": "built", "run": 2}, "attempt-1", 0)
    assert again is not None and not isinstance(again, str)
    assert again[0] == record == {"status": "built", "run": 1}
    claims = [claim_answer(client, "req-1", "attempt-1", "built"),
              claim_answer(client, "req-2", "attempt-1")]
    assert claims == [AGAIN] * 2
    # A second delivery of the stage (same token, another attempt) neither writes nor answers.
    assert holder.write_record({"status": "built", "run": 3}, "attempt-2", 0) is None
    assert claim_answer(client, "req-1", "attempt-2", "built") == OTHER
    assert holder.release(set(pending))
    assert dones(client, "req-1") == ["built"] and dones(client, "req-2") == []
    assert json.loads(str(client.get(record_key(HASH)))) == {"status": "built", "run": 1}
    assert client.get(lock_key(HASH)) is None and not client.exists(pending_key(HASH))
    assert not client.sismember(PENDING_INDEX, HASH)


def test_a_holder_cut_off_while_answering_is_taken_over_for_the_unanswered_only(
        client: redis.Redis) -> None:
    holder = lease(client, "req-1")
    holder.acquire({"request_id": "req-1", "created_at": 1})
    lease(client, "req-2").acquire({"request_id": "req-2", "created_at": 2})
    lease(client, "req-3").acquire({"request_id": "req-3", "created_at": 3})
    written = holder.write_record({"status": "built"}, "attempt-1", 0)
    assert written is not None
    # It answered req-1 and died: its lease runs out with the others still pending.
    assert claim_answer(client, "req-1", "attempt-1", "built") == FIRST
    client.delete(lock_key(HASH))  # its lease ran out
    assert orphaned_hashes(client) == [HASH]
    claim = take_over(client, HASH, 5.0)
    assert claim is not None and set(claim[1]) == {"req-2", "req-3"}


def test_a_takeover_for_requests_all_answered_only_releases(client: redis.Redis) -> None:
    holder = lease(client, "req-1")
    holder.acquire({"request_id": "req-1"})
    claim_answer(client, "req-1", "attempt-1", "built")
    client.delete(lock_key(HASH))  # its lease ran out
    assert take_over(client, HASH, 5.0) is None
    assert client.get(lock_key(HASH)) is None and not client.exists(pending_key(HASH))
    assert orphaned_hashes(client) == []


def test_a_request_joining_after_the_record_waits_for_the_watchdog_not_in_vain(
        client: redis.Redis) -> None:
    holder = lease(client, "req-1")
    holder.acquire({"request_id": "req-1"})
    written = holder.write_record({"status": "built"}, "attempt-1", 0)
    assert written is not None and not isinstance(written, str)
    # Between the record and the release the lock is still held: a newcomer joins it.
    assert lease(client, "req-2").acquire({"request_id": "req-2"}) is False
    holder.release(set(written[1]))
    assert client.get(lock_key(HASH)) is None
    assert orphaned_hashes(client) == [HASH]
    claim = take_over(client, HASH, 5.0)
    assert claim is not None and set(claim[1]) == {"req-2"}


def test_one_build_per_lease_and_a_second_lease_build_is_counted_with_why(
        client: redis.Redis) -> None:
    first = lease(client, "req-1")
    first.acquire({"request_id": "req-1"})
    assert first.note_build("run-a", started=True)
    # The same stage delivered twice (same token): the copy must not build.
    assert not first.note_build("run-b", started=True)
    # The same run repeating its note (a lost reply) may.
    assert first.note_build("run-a", started=True)
    # Its lease runs out while it builds; the watchdog gives the lock to a new epoch.
    client.delete(lock_key(HASH))  # its lease ran out
    claim = take_over(client, HASH, 5.0)
    assert claim is not None
    second = Lease(client, HASH, claim[0], 5.0, "req-1")
    assert second.note_build("run-c", started=True)
    assert first.note_build("run-a", started=False)  # ends late, still counted
    notes = second.build_notes()
    assert len(notes) == 2
    reason = rebuilt_reason(notes)
    assert reason is not None and "built 2 times" in reason and "later lease" in reason
    # A note made after the count is noticed when the record is written.
    assert second.write_record({"builds": 1}, "attempt-1", 1) == "recount"


def test_a_build_whose_note_redis_lost_and_that_ends_after_the_record_is_counted(
        client: redis.Redis) -> None:
    holder = lease(client, "req-1")
    holder.acquire({"request_id": "req-1"})
    written = holder.write_record({"status": "built", "builds": 1, "rebuilt": None},
                                  "attempt-1", 0)
    assert written is not None and not isinstance(written, str)
    holder.release(set(written[1]))
    late = lease(client, "req-1")
    assert late.note_build("run-late", started=False) is False
    amended = count_late_build(client, HASH)
    assert amended is not None and amended["builds"] == 2 and "ended after" in amended["rebuilt"]
    # Noted once: the same run noting again is not counted twice.
    assert late.note_build("run-late", started=False) is True


def test_a_live_chain_writes_back_the_lock_and_entry_redis_lost(client: redis.Redis) -> None:
    entry = {"request_id": "req-1", "created_at": 1.0}
    holder = lease(client, "req-1", entry=entry)
    holder.acquire(entry)
    # A crashed Redis came back without the last second: the lock and the entry are gone.
    client.delete(lock_key(HASH), pending_key(HASH))
    client.srem(PENDING_INDEX, HASH)
    assert holder.extend() is True
    assert client.get(lock_key(HASH)) == holder.token
    assert json.loads(str(client.hget(pending_key(HASH), "req-1"))) == entry
    assert client.sismember(PENDING_INDEX, HASH)
    # Not for a request that was answered: its build ended, a late stage must stop.
    claim_answer(client, "req-1", "attempt-1", "built")
    client.delete(lock_key(HASH), pending_key(HASH))
    assert holder.extend() is False
    assert client.get(lock_key(HASH)) is None


def test_no_takeover_until_a_restarted_redis_has_been_up_a_lease(client: redis.Redis) -> None:
    lease(client, "req-1").acquire({"request_id": "req-1"})
    client.delete(lock_key(HASH))
    client.hset(INFLIGHT, "req-2", json.dumps({"request_id": "req-2"}))
    up = redis_uptime(client)
    # Every lease ran out while Redis was down, the live holders' too: wait one lease.
    assert restart_orphans(client, Settings(lock_lease=up + 60)) == 0
    assert client.get(lock_key(HASH)) is None and client.hexists(INFLIGHT, "req-2")


def test_an_answer_stored_with_its_claim_is_what_celery_reads_and_only_the_first(
        redis_url: str, client: redis.Redis) -> None:
    from celery import Celery, states

    # Not the current app: later tests' bare AsyncResult(...) must keep meaning buildq's.
    app = Celery("answers-test", broker="memory://", backend=redis_url, set_as_current=False)
    app.conf.result_extended = True
    listener = client.pubsub()
    try:
        entry = backend_answer(app.backend, "req-1", {"status": "built", "image": "a"},
                               states.SUCCESS)
        assert entry is not None
        key = entry[0]
        listener.subscribe(key)
        assert listener.get_message(timeout=5)["type"] == "subscribe"  # type: ignore[index]
        assert claim_answer(client, "req-1", "attempt-1", "built", store=entry) == FIRST
        # Published for a caller already waiting, and kept for one that asks later.
        heard = listener.get_message(timeout=5)
        assert heard is not None and json.loads(heard["data"])["result"]["image"] == "a"
        assert app.AsyncResult("req-1").get(timeout=10) == {"status": "built", "image": "a"}
        assert 0 < client.ttl(key) <= int(app.backend.expires)
        # The same document Celery's own store writes, but for the time it was written.
        app.backend.store_result("req-celery", {"status": "built", "image": "a"}, states.SUCCESS)
        ours = json.loads(str(client.get(key)))
        theirs = json.loads(str(client.get(app.backend.get_key_for_task("req-celery"))))
        for document in (ours, theirs):
            document.pop("date_done")
        assert ours == {**theirs, "task_id": "req-1"}
        # Another attempt's claim stores nothing: the first answer stands.
        other = backend_answer(app.backend, "req-1", {"status": "failed"}, states.SUCCESS)
        assert claim_answer(client, "req-1", "attempt-2", "failed", store=other) == OTHER
        assert app.AsyncResult("req-1").get(timeout=10) == {"status": "built", "image": "a"}
        # A failure is stored as Celery stores an exception, under its failure lifetime.
        failed = backend_answer(app.backend, "req-2", ValueError("no such base image"),
                                states.FAILURE)
        assert failed is not None
        assert claim_answer(client, "req-2", "attempt-1", "failed", store=failed) == FIRST
        error = app.AsyncResult("req-2").get(timeout=10, propagate=False)
        assert isinstance(error, ValueError) and str(error) == "no such base image"
    finally:
        listener.close()
        app.close()
