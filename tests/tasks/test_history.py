"""buildq history: filters by status, repository and time, pages beyond the last N, and an
index that stays bounded (the records of hashes it drops go with them)."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import redis

import tasks.lock
from tasks import build_image, outcome
from tasks.keys import HISTORY, record_key
from tasks.lock import Lease, new_token
from tests.tasks.conftest import REPO, Cluster


def buildq(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tasks.cli", *args], cwd=REPO, env=cluster.env,
                          capture_output=True, text=True, timeout=120)


def _rows(run: subprocess.CompletedProcess[str]) -> list[dict]:
    assert run.returncode == 0, run.stderr
    return list(json.loads(run.stdout))


def _app(tmp_path: Path, base: str, step: str = "") -> Path:
    root = tmp_path / uuid.uuid4().hex[:8]
    root.mkdir()
    (root / "Dockerfile").write_text(f"FROM {base}\nCOPY msg.txt /msg.txt\n{step}")
    (root / "msg.txt").write_text(f"{uuid.uuid4()}\n")
    return root


def test_history_filters_and_pages(cluster: Cluster, tmp_path: Path, base_image: str) -> None:
    dest = f"{cluster.registry.host}/history/app-{uuid.uuid4().hex[:6]}"
    built = [build_image.delay(str(_app(tmp_path, base_image)), destination=dest).get(timeout=180)
             for _ in range(3)]
    failed = outcome(build_image.delay(str(_app(tmp_path, base_image, "RUN false\n")),
                                       destination=dest), timeout=180)
    # delay() would refuse it before queueing: sent as anybody could, the worker refuses it.
    refused = outcome(build_image.apply_async(args=[str(_app(tmp_path, base_image))],
                                              kwargs={"destination": "Not A Registry/x"}),
                      timeout=60)
    assert failed["status"] == "failed" and refused["status"] == "failed"

    mine = _rows(buildq(cluster, "history", "--repository", dest, "--json"))
    assert [r["id"] for r in mine] == [failed["id"], *[b["id"] for b in reversed(built)]]
    only_failed = _rows(buildq(cluster, "history", "--repository", dest, "--status", "failed",
                               "--json"))
    assert [r["id"] for r in only_failed] == [failed["id"]]
    # A request refused before it had a hash is in the history too.
    any_failed = _rows(buildq(cluster, "history", "--status", "failed", "-n", "500", "--json"))
    assert {failed["id"], refused["id"]} <= {r["id"] for r in any_failed}
    assert _rows(buildq(cluster, "history", "--repository", dest, "--since", "1h", "--json"))
    assert _rows(buildq(cluster, "history", "--since", "2099-01-01", "--json")) == []

    # Pages of one: every record once, newest first, until no cursor is printed.
    seen, cursor = [], None
    for _ in range(10):
        run = buildq(cluster, "history", "--repository", dest, "-n", "1", "--json",
                     *(["--before", cursor] if cursor else []))
        seen += [r["id"] for r in _rows(run)]
        if "more:" not in run.stderr:
            break
        cursor = run.stderr.split("--before ")[1].split()[0]
    assert seen == [r["id"] for r in mine]

    text = buildq(cluster, "history", "--repository", dest, "-n", "2")
    assert text.returncode == 0 and "more: add --before" in text.stderr
    assert len(text.stdout.strip().splitlines()) == 2


@pytest.mark.parametrize("args", [["--since", "3x"], ["--status", "odd"], ["-n", "0"]])
def test_history_refuses_bad_filters(cluster: Cluster, args: list[str]) -> None:
    run = buildq(cluster, "history", *args)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr


def test_the_index_is_bounded_and_drops_the_records_it_forgets(
        redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    monkeypatch.setattr(tasks.lock, "HISTORY_SIZE", 3)
    hashes = [uuid.uuid4().hex * 2 for _ in range(5)]
    for source_hash in hashes:
        request = f"req-{source_hash[:8]}"
        lease = Lease(client, source_hash, new_token(), 60, request)
        assert lease.acquire({"request_id": request})
        written = lease.write_record({"id": request, "status": "built"}, new_token(), 0)
        assert isinstance(written, tuple)
        assert lease.release([request])
    assert client.zrevrange(HISTORY, 0, -1) == list(reversed(hashes[2:]))
    assert [client.exists(record_key(h)) for h in hashes] == [0, 0, 1, 1, 1]
