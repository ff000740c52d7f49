"""Sources: parsing what users type, unpacking hostile archives, cloning real git repos."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from config.errors import SourceError
from workers.sources import FetchedSource, SourceSpec, fetch_source, parse_source
from workers.sources.archive import fetch_archive

# --- parse_source -------------------------------------------------------------------


def test_local_directory_becomes_an_absolute_resolved_directory_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "app").mkdir()
    monkeypatch.chdir(tmp_path)
    assert parse_source("./app") == SourceSpec("directory", str((tmp_path / "app").resolve()))


def test_local_tarball_becomes_an_archive_source(tmp_path: Path) -> None:
    for name in ("ctx.tar", "ctx.tar.gz", "ctx.tgz"):
        (tmp_path / name).write_bytes(b"")
        assert parse_source(str(tmp_path / name)).kind == "archive"


def test_missing_local_path_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="nowhere/app"):
        parse_source(str(tmp_path / "nowhere" / "app"))


def test_local_file_that_is_not_an_archive_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(SourceError, match="neither a directory"):
        parse_source(str(tmp_path / "notes.txt"))


@pytest.mark.parametrize(
    ("source", "kind", "location"),
    [
        ("image:python:3.11-slim", "image", "python:3.11-slim"),
        ("s3://bucket/ctx/app.tar.gz", "archive", "s3://bucket/ctx/app.tar.gz"),
        ("gs://bucket/app.tgz", "archive", "gs://bucket/app.tgz"),
        ("file:///srv/ctx/app.tar", "archive", "file:///srv/ctx/app.tar"),
        ("https://acct.blob.core.windows.net/c/app.tar.gz", "archive",
         "https://acct.blob.core.windows.net/c/app.tar.gz"),
        ("https://github.com/org/repo.git", "git", "https://github.com/org/repo.git"),
        ("http://git.internal/org/repo", "git", "http://git.internal/org/repo"),
        ("ssh://git@github.com/org/repo.git", "git", "ssh://git@github.com/org/repo.git"),
        ("git://git.internal/repo", "git", "git://git.internal/repo"),
        ("file:///srv/repos/app.git", "git", "file:///srv/repos/app.git"),
        ("git+https://github.com/org/repo", "git", "https://github.com/org/repo"),
        ("git@github.com:org/repo.git", "git", "git@github.com:org/repo.git"),
    ],
)
def test_urls_map_to_their_kind(source: str, kind: str, location: str) -> None:
    spec = parse_source(source)
    assert (spec.kind, spec.location) == (kind, location)


@pytest.mark.parametrize("ref", ["main", "release/1.2", "v1.2.0", "3f2c1ab", "a" * 40])
def test_ordinary_refs_and_commit_shas_are_accepted(ref: str) -> None:
    assert parse_source("https://github.com/org/repo.git", ref).ref == ref


@pytest.mark.parametrize(
    ("ref", "reason"),
    [
        ("--upload-pack=touch /tmp/pwned", "option"),
        ("-x", "option"),
        ("main..evil", r"'\.\.'"),
        ("my branch", "space"),
        ("main@{1}", "@\\{"),
        ("bad\nref", "control"),
        ("feature.lock", r"\.lock"),
        ("refs/heads/", "ends with '/'"),
        ("a:b", "one of"),
    ],
)
def test_hostile_or_malformed_refs_are_refused_with_a_reason(ref: str, reason: str) -> None:
    with pytest.raises(SourceError, match=reason) as caught:
        parse_source("https://github.com/org/repo.git", ref)
    assert caught.value.hint


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        ("ext::sh -c touch% /tmp/pwned", "remote-helper"),
        ("fd::17", "remote-helper"),
        ("--upload-pack=evil", "begins with '-'"),
        ("ftp://host/repo", "unsupported scheme"),
        ("ssh://-oProxyCommand=evil/repo", "begins with '-'"),
        ("https://user:token@github.com/org/repo.git", "credentials"),
        ("s3://bucket/folder", "does not name"),
        ("http://host/ctx.tar.gz", "unsupported scheme"),
        ("git@host:-upload", "begins with '-'"),
    ],
)
def test_hostile_or_unsupported_urls_are_refused(source: str, reason: str) -> None:
    with pytest.raises(SourceError, match=reason):
        parse_source(source)


def test_ref_on_a_non_git_source_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="only applies to git"):
        parse_source(str(tmp_path), ref="main")


def test_spec_round_trips_through_a_dict() -> None:
    spec = parse_source("https://github.com/org/repo.git", "v1")
    assert SourceSpec.from_dict(spec.to_dict()) == spec


def test_spec_from_a_queue_is_checked_again() -> None:
    hostile = {"kind": "git", "location": "https://h/r.git", "ref": "--upload-pack=x"}
    with pytest.raises(SourceError, match="option"):
        SourceSpec.from_dict(hostile)
    with pytest.raises(SourceError, match="unknown source kind"):
        SourceSpec.from_dict({"kind": "svn", "location": "x"})


# --- directory ----------------------------------------------------------------------


def test_directory_is_used_in_place_and_never_deleted(tmp_path: Path) -> None:
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "Dockerfile").write_text("FROM scratch\n")
    fetched = fetch_source(parse_source(str(tmp_path / "app")), tmp_path)
    assert (fetched.root, fetched.owned, fetched.commit) == ((tmp_path / "app").resolve(),
                                                             False, None)
    fetched.cleanup()
    assert (tmp_path / "app" / "Dockerfile").exists()


def test_image_source_has_nothing_to_fetch(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no files to fetch"):
        fetch_source(parse_source("image:busybox"), tmp_path)


# --- archives -----------------------------------------------------------------------

Member = tuple[tarfile.TarInfo, bytes]


def _file(name: str, data: bytes = b"data", mode: int = 0o644) -> Member:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    return info, data


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, b""


def _special(name: str, kind: bytes) -> Member:
    info = tarfile.TarInfo(name)
    info.type = kind
    return info, b""


def _archive(path: Path, members: list[Member]) -> Path:
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    return path


def test_archive_unpacks_files_modes_and_internal_links(tmp_path: Path, workdir: Path) -> None:
    archive = _archive(tmp_path / "ctx.tar.gz", [
        _file("./Dockerfile", b"FROM scratch\n"),
        _file("./bin/run", b"#!/bin/sh\n", 0o755),
        _link("./bin/alias", "run"),
        _link("./copy", "Dockerfile", tarfile.LNKTYPE),
    ])
    fetched = fetch_source(parse_source(str(archive)), workdir)
    try:
        assert fetched.owned and fetched.root.parent == workdir.resolve()
        assert (fetched.root / "Dockerfile").read_bytes() == b"FROM scratch\n"
        assert os.access(fetched.root / "bin" / "run", os.X_OK)
        assert os.readlink(fetched.root / "bin" / "alias") == "run"
        assert (fetched.root / "copy").read_bytes() == b"FROM scratch\n"
    finally:
        fetched.cleanup()
    assert not fetched.root.exists()


def test_archive_from_a_file_store_url_is_unpacked(tmp_path: Path, workdir: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    _archive(store / "ctx.tar.gz", [_file("Dockerfile", b"FROM scratch\n")])
    spec = parse_source(f"file://{store}/ctx.tar.gz")
    fetched = fetch_source(spec, workdir)
    try:
        assert (fetched.root / "Dockerfile").read_bytes() == b"FROM scratch\n"
    finally:
        fetched.cleanup()


@pytest.mark.parametrize(
    ("members", "member", "reason"),
    [
        ([_file("ok"), _file("../evil")], "../evil", r"'\.\.'"),
        ([_file("/etc/cron.d/evil")], "/etc/cron.d/evil", "absolute path"),
        ([_link("out", "../../outside")], "out", "outside the archive"),
        ([_link("passwd", "/etc/passwd")], "passwd", "absolute path"),
        ([_link("hard", "../outside", tarfile.LNKTYPE)], "hard", "outside the archive"),
        ([_link("hard", "/etc/passwd", tarfile.LNKTYPE)], "hard", "absolute path"),
        ([_link("here", "."), _link("here/up", "../x")], "here/up", "outside the archive"),
        ([_special("tty", tarfile.CHRTYPE)], "tty", "device or FIFO"),
        ([_special("disk", tarfile.BLKTYPE)], "disk", "device or FIFO"),
        ([_special("pipe", tarfile.FIFOTYPE)], "pipe", "device or FIFO"),
        ([_file("bad\nname")], "'bad\\nname'", "control character"),
        ([_file("a", b"x" * 600), _file("b", b"x" * 600)], "b", "over the limit of 1000"),
    ],
    ids=["dotdot", "absolute", "symlink-out", "symlink-absolute", "hardlink-out",
         "hardlink-absolute", "symlink-chain", "char-device", "block-device", "fifo",
         "newline-in-name", "oversized"],
)
def test_hostile_archive_is_refused_and_nothing_is_left(
    tmp_path: Path, workdir: Path, members: list[Member], member: str, reason: str
) -> None:
    archive = _archive(tmp_path / "evil.tar.gz", members)
    with pytest.raises(SourceError, match=reason) as caught:
        fetch_archive(parse_source(str(archive)), workdir, max_bytes=1000)
    assert member in caught.value.message
    assert list(workdir.iterdir()) == []
    assert not (tmp_path / "outside").exists() and not (tmp_path / "evil").exists()


def test_archive_with_too_many_members_is_refused(tmp_path: Path, workdir: Path) -> None:
    archive = _archive(tmp_path / "many.tar", [_file(f"f{i}") for i in range(20)])
    with pytest.raises(SourceError, match="more than 10 members"):
        fetch_archive(parse_source(str(archive)), workdir, max_members=10)
    assert list(workdir.iterdir()) == []


def test_corrupt_archive_is_a_source_error(tmp_path: Path, workdir: Path) -> None:
    (tmp_path / "junk.tar.gz").write_bytes(b"\x1f\x8b" + os.urandom(200))
    with pytest.raises(SourceError, match="not a readable tar archive"):
        fetch_source(parse_source(str(tmp_path / "junk.tar.gz")), workdir)
    assert list(workdir.iterdir()) == []


# --- git ----------------------------------------------------------------------------


def _run(*args: str, cwd: Path) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com",
         "-c", "init.defaultBranch=main", *args],
        cwd=cwd, check=True, capture_output=True, text=True,
    ).stdout.strip()


@pytest.fixture(scope="module")
def bare_repo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A bare repo with main (2 commits), tag v1 on the first, branch feature."""
    base = tmp_path_factory.mktemp("git")
    work = base / "work"
    work.mkdir()
    _run("init", "--quiet", ".", cwd=work)
    (work / "Dockerfile").write_text("FROM scratch\n")
    (work / "version").write_text("1\n")
    _run("add", ".", cwd=work)
    _run("commit", "--quiet", "-m", "one", cwd=work)
    first = _run("rev-parse", "HEAD", cwd=work)
    _run("tag", "v1", cwd=work)
    _run("checkout", "--quiet", "-b", "feature", cwd=work)
    (work / "version").write_text("feature\n")
    _run("commit", "--quiet", "-am", "feature", cwd=work)
    feature = _run("rev-parse", "HEAD", cwd=work)
    _run("checkout", "--quiet", "main", cwd=work)
    (work / "version").write_text("2\n")
    _run("commit", "--quiet", "-am", "two", cwd=work)
    second = _run("rev-parse", "HEAD", cwd=work)
    _run("clone", "--quiet", "--bare", str(work), str(base / "repo.git"), cwd=base)
    return {"url": f"file://{base}/repo.git", "first": first, "second": second,
            "feature": feature}


@pytest.mark.parametrize(
    ("ref", "version", "commit"),
    [
        (None, "2\n", "second"),
        ("main", "2\n", "second"),
        ("feature", "feature\n", "feature"),
        ("v1", "1\n", "first"),
        ("<first>", "1\n", "first"),
        ("<first-short>", "1\n", "first"),
    ],
    ids=["default-branch", "branch", "other-branch", "tag", "commit", "short-commit"],
)
def test_git_checks_out_the_ref_and_records_the_commit(
    bare_repo: dict[str, str], workdir: Path, ref: str | None, version: str, commit: str
) -> None:
    if ref == "<first>":
        ref = bare_repo["first"]
    elif ref == "<first-short>":
        ref = bare_repo["first"][:10]
    fetched = fetch_source(parse_source(bare_repo["url"], ref), workdir)
    try:
        assert fetched.commit == bare_repo[commit]
        assert (fetched.root / "version").read_text() == version
        assert fetched.owned
        assert not (fetched.root / ".git").exists()
    finally:
        fetched.cleanup()
    assert list(workdir.iterdir()) == []


def test_same_commit_from_two_clones_hashes_the_same(
    bare_repo: dict[str, str], workdir: Path
) -> None:
    from workers.context import BuildInputs, source_hash

    one = fetch_source(parse_source(bare_repo["url"], "v1"), workdir)
    two = fetch_source(parse_source(bare_repo["url"], bare_repo["first"]), workdir)
    try:
        assert source_hash(one.root, BuildInputs()) == source_hash(two.root, BuildInputs())
    finally:
        one.cleanup()
        two.cleanup()


def test_unknown_branch_reports_gits_words_and_leaves_nothing(
    bare_repo: dict[str, str], workdir: Path
) -> None:
    with pytest.raises(SourceError, match="nope") as caught:
        fetch_source(parse_source(bare_repo["url"], "nope"), workdir)
    assert "not found" in caught.value.message
    assert "\n" not in caught.value.message
    assert list(workdir.iterdir()) == []


def test_unknown_commit_is_a_source_error(bare_repo: dict[str, str], workdir: Path) -> None:
    with pytest.raises(SourceError, match="git could not fetch"):
        fetch_source(parse_source(bare_repo["url"], "0" * 40), workdir)
    assert list(workdir.iterdir()) == []


Spec = Callable[[Path], SourceSpec]


@pytest.mark.parametrize(
    "make_spec",
    [
        lambda marker: SourceSpec("git", f"ext::sh -c touch% {marker}"),
        lambda marker: SourceSpec("git", "file:///nonexistent.git",
                                  f"--upload-pack=touch {marker}"),
        lambda marker: SourceSpec("git", f"--upload-pack=touch {marker}"),
        lambda marker: SourceSpec("git", "file:///nonexistent.git", "-x"),
    ],
    ids=["ext-transport", "upload-pack-ref", "upload-pack-url", "dash-ref"],
)
def test_hostile_git_spec_is_refused_before_git_runs(
    tmp_path: Path, workdir: Path, make_spec: Spec
) -> None:
    marker = tmp_path / "pwned"
    with pytest.raises(SourceError):
        fetch_source(make_spec(marker), workdir)
    assert not marker.exists()
    assert list(workdir.iterdir()) == []


def test_fetched_source_cleanup_never_raises(tmp_path: Path) -> None:
    FetchedSource(root=tmp_path / "gone", owned=True).cleanup()
