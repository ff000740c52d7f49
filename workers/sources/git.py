"""A git repository, cloned shallow into a temp dir that we own.

URL and ref were checked by ``check_spec``; here git is also told never to run
remote helpers, never to prompt, and where its options end.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from config.errors import SourceError
from workers.sources.base import (
    FetchedSource,
    SourceSpec,
    check_git_url,
    check_ref,
    remove_tree,
    scratch_dir,
)

#: Seconds one git command may run before the fetch is abandoned.
GIT_TIMEOUT = 900

#: Options on every git command: no ``ext::`` helpers, whatever the host's config says.
_GIT = ("git", "-c", "protocol.ext.allow=never", "-c", "advice.detachedHead=false")

_FULL_SHA = re.compile(r"^[0-9a-f]{40}$")
_SHORT_SHA = re.compile(r"^[0-9a-f]{7,39}$")


class _GitFailed(Exception):
    def __init__(self, stderr: str) -> None:
        super().__init__(stderr)
        self.stderr = stderr


def fetch_git(spec: SourceSpec, workdir: Path, timeout: float = GIT_TIMEOUT) -> FetchedSource:
    """Check out ``spec.ref`` (or the default branch) and record the commit.

    The ``.git`` directory is removed afterwards: its packs and index differ between
    clones of the same commit, and BuildKit leaves it out of git contexts too.
    """
    check_git_url(spec.location)
    if spec.ref is not None:
        check_ref(spec.ref)
    dest = scratch_dir(workdir, "git")
    try:
        commit = _checkout(spec.location, spec.ref, dest, timeout)
        remove_tree(dest / ".git")
    except _GitFailed as exc:
        remove_tree(dest)
        what = f"{spec.location} at {spec.ref}" if spec.ref else spec.location
        raise SourceError(f"git could not fetch {what}: {exc.stderr}",
                          "Check the URL, the ref and the build host's access to the "
                          "repository.") from None
    except BaseException:
        remove_tree(dest)
        raise
    return FetchedSource(root=dest, owned=True, commit=commit)


def _checkout(url: str, ref: str | None, dest: Path, timeout: float) -> str:
    if ref is None:
        _git(["clone", "--depth", "1", "--", url, str(dest)], None, timeout)
    elif _FULL_SHA.match(ref):
        _fetch_commit(url, ref, dest, timeout)
    elif _SHORT_SHA.match(ref):
        # Could be a branch called "cafe123" or an abbreviated commit; git can only
        # fetch full SHAs, so an abbreviation needs the whole history.
        try:
            _git(["clone", "--depth", "1", f"--branch={ref}", "--", url, str(dest)], None,
                 timeout)
        except _GitFailed:
            _remove_contents(dest)
            _git(["clone", "--no-checkout", "--", url, str(dest)], None, timeout)
            _git(["checkout", "--detach", ref], dest, timeout)
    else:
        _git(["clone", "--depth", "1", f"--branch={ref}", "--", url, str(dest)], None, timeout)
    commit = _git(["rev-parse", "HEAD"], dest, timeout).strip()
    if ref is not None and _FULL_SHA.match(ref) and commit != ref:
        raise _GitFailed(f"checked out {commit}, not the requested commit {ref}.")
    return commit


def _fetch_commit(url: str, sha: str, dest: Path, timeout: float) -> None:
    _git(["init", "--quiet", "--", str(dest)], None, timeout)
    _git(["remote", "add", "origin", "--", url], dest, timeout)
    try:
        _git(["fetch", "--depth", "1", "origin", sha], dest, timeout)
    except _GitFailed:
        # Servers without uploadpack.allowReachableSHA1InWant refuse a bare SHA.
        _git(["fetch", "--tags", "origin", "+refs/heads/*:refs/remotes/origin/*"], dest, timeout)
    _git(["checkout", "--detach", sha], dest, timeout)


def _remove_contents(path: Path) -> None:
    """Empty ``path`` for a second clone (git may or may not have tidied up after itself)."""
    path.mkdir(exist_ok=True)
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            remove_tree(child)
        else:
            child.unlink()


def _git(args: list[str], cwd: Path | None, timeout: float) -> str:
    env = {
        **os.environ,
        "GIT_TERMINAL_PROMPT": "0",
        # Keeps ssh from asking about unknown hosts on a worker nobody watches.
        "GIT_SSH_COMMAND": os.environ.get("GIT_SSH_COMMAND", "ssh -o BatchMode=yes"),
        "LC_ALL": "C",
    }
    try:
        done = subprocess.run(
            [*_GIT, *args], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
            capture_output=True, text=True, errors="replace", timeout=timeout, check=False,
        )
    except subprocess.TimeoutExpired:
        raise _GitFailed(f"git {args[0]} did not finish within {timeout:.0f} s.") from None
    except FileNotFoundError:
        raise _GitFailed("git is not installed on this build host.") from None
    if done.returncode != 0:
        raise _GitFailed(_one_paragraph(done.stderr) or f"git {args[0]} exited "
                         f"with status {done.returncode}.")
    return done.stdout


def _one_paragraph(stderr: str, limit: int = 2000) -> str:
    """git's stderr as one line a record can hold; the end says most about the failure."""
    text = " ".join(line.strip() for line in stderr.splitlines() if line.strip())
    return text if len(text) <= limit else "…" + text[-limit:]
