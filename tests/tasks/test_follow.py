"""``buildq build --detach`` + ``buildq logs --follow``: lines as they are written, the
final status line, the exit code of ``buildq build``; Ctrl-C stops only the following."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from tasks import outcome
from tasks.app import app
from tests import services
from tests.tasks.conftest import REPO, Cluster, tiny_app


def _app(tmp_path: Path, base: str, name: str, step: str) -> Path:
    return tiny_app(tmp_path, base, name, step)


def _cli(cluster: Cluster, *args: str) -> list[str]:
    return [sys.executable, "-m", "tasks.cli", *args]


def _detach(cluster: Cluster, app: Path, repo: str) -> str:
    sent = subprocess.run(_cli(cluster, "build", str(app), "--destination",
                               f"{cluster.registry.host}/{repo}", "--detach"),
                          cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=120)
    assert sent.returncode == 0, sent.stderr
    return sent.stdout.strip().splitlines()[-1]


def _follow(cluster: Cluster, request_id: str) -> subprocess.Popen[str]:
    # PYTHONFAULTHANDLER: a follower that hangs can be made to print where (see _stopped).
    return subprocess.Popen(_cli(cluster, "logs", "--follow", request_id), cwd=REPO,
                            env={**cluster.env, "PYTHONFAULTHANDLER": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _stopped(follower: subprocess.Popen[str], seconds: float) -> int:
    """The follower's exit code; if it is still running after ``seconds``, a failure that
    shows each of its threads' stacks (SIGABRT makes the fault handler print them)."""
    try:
        return follower.wait(seconds)
    except subprocess.TimeoutExpired:
        follower.send_signal(signal.SIGABRT)
        _, err = follower.communicate(timeout=30)
        raise AssertionError(f"the follower still ran {seconds} s after Ctrl-C:\n{err}") from None


def _follow_until(cluster: Cluster, request_id: str, word: str) -> subprocess.Popen[str]:
    """A follower that has shown the build step's own ``word`` line (not the RUN echoing it)."""
    follower = _follow(cluster, request_id)
    assert follower.stdout is not None
    for line in follower.stdout:
        if line.rstrip().endswith(word) and "echo" not in line:
            break
    return follower


def _uptime() -> float:
    # The kernel's clock, which a RUN step reads too (/proc/uptime is not namespaced).
    return float(Path("/proc/uptime").read_text().split()[0])


def test_follow_shows_lines_as_they_are_written_then_the_status(
        cluster: Cluster, tmp_path: Path, base_image: str) -> None:
    step = ('RUN for i in 1 2 3 4 5 6 7 8; do echo "tick $i $(cut -d" " -f1 /proc/uptime)"; '
            "sleep 0.5; done\n")
    request_id = _detach(cluster, _app(tmp_path, base_image, "ticks", step), "follow/ticks")
    follower = _follow(cluster, request_id)
    assert follower.stdout is not None
    delays = []
    lines = []
    for line in follower.stdout:
        lines.append(line.rstrip("\n"))
        words = line.split()
        if len(words) >= 3 and words[-3] == "tick" and "echo" not in line:
            delays.append(_uptime() - float(words[-1]))
    code = follower.wait(60)
    assert code == 0, (lines, follower.stderr.read() if follower.stderr else "")
    assert len(delays) == 8, lines
    # The issue asks for each line within 1 s of its writing; 0.5 s more for a machine whose
    # two cores other test runs share (the measured delays are printed).
    print(f"\nfollow delays: {[round(d, 2) for d in delays]}")
    assert max(delays) < 1.5, delays
    assert any(line.startswith("… build") or "build" in line for line in lines)
    assert lines[-1].startswith("built: ") and "follow/ticks" in lines[-1], lines[-5:]


def test_follow_ends_with_the_exit_code_of_a_failed_and_a_cancelled_build(
        cluster: Cluster, tmp_path: Path, base_image: str) -> None:
    failing = _detach(cluster, _app(tmp_path, base_image, "failing", "RUN sh -c 'exit 3'\n"),
                      "follow/failing")
    follower = _follow(cluster, failing)
    out, err = follower.communicate(timeout=180)
    assert follower.returncode == 1, (out, err)
    assert out.strip().splitlines()[-1].startswith("failed: ") and "exit code 3" in out

    # Counted from when the step starts: the cancel lands while it runs.
    long_step = "RUN echo started && sleep 60\n"
    running = _detach(cluster, _app(tmp_path, base_image, "cancelled", long_step),
                      "follow/cancelled")
    follower = _follow_until(cluster, running, "started")
    assert follower.stdout is not None
    cancelled = subprocess.run(_cli(cluster, "cancel", running), cwd=REPO, env=cluster.env,
                               capture_output=True, text=True, timeout=60)
    assert cancelled.returncode == 0, cancelled.stderr
    rest = follower.stdout.read()
    assert follower.wait(60) == 1
    assert rest.strip().splitlines()[-1].startswith("cancelled: "), rest


def test_ctrl_c_stops_following_not_the_build(cluster: Cluster, tmp_path: Path,
                                             base_image: str) -> None:
    # Long enough that the follower (a CLI starting on a loaded machine) is interrupted
    # while the build still runs, counted from when the step starts, not from now.
    step = "RUN echo waiting && sleep 30\n"
    request_id = _detach(cluster, _app(tmp_path, base_image, "interrupted", step),
                         "follow/interrupted")
    follower = _follow_until(cluster, request_id, "waiting")
    follower.send_signal(signal.SIGINT)
    assert _stopped(follower, 20) == 130
    assert follower.stderr is not None and "stopped following" in follower.stderr.read()
    # Taken, not answered: status says where it stands rather than "no record".
    shown = subprocess.run(_cli(cluster, "status", request_id), cwd=REPO, env=cluster.env,
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    standing = json.loads(shown.stdout)
    assert standing["status"] == "running" and standing["stages"] == ["build"], standing
    assert standing["tag"] and standing["source_hash"].startswith(standing["tag"]), standing
    record = outcome(app.AsyncResult(request_id), timeout=120)
    assert record["status"] == "built", record
    ended = subprocess.run(_cli(cluster, "status", request_id), cwd=REPO, env=cluster.env,
                           capture_output=True, text=True, timeout=60)
    assert json.loads(ended.stdout)["digest"] == record["digest"], ended.stdout
    services.wait_for(lambda: cluster.registry.digest("follow/interrupted", record["tag"]), 10,
                      "the image")
