"""The build context: what it contains, its hash, and its tarball — on real files."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from config.errors import SourceError
from workers.context import (
    BIG_FILE,
    SMALL_FILE,
    BuildInputs,
    image_tag,
    read_dockerfile,
    source_hash,
    write_context,
)

DEFAULT = BuildInputs()

#: A small app: (relative path, contents, executable).
FILES: list[tuple[str, bytes, bool]] = [
    ("Dockerfile", b"FROM busybox\nCOPY . /app\n", False),
    ("app/main.py", b"print('hello')\n", False),
    ("app/run.sh", b"#!/bin/sh\nexec python main.py\n", True),
    ("app/data/table.csv", b"a,b\n1,2\n", False),
    ("README.md", b"# demo\n", False),
]


def make_tree(root: Path, *, reverse: bool = False, mtime: int = 1_600_000_000) -> Path:
    """Write FILES under root in the given order, every file with the given mtime."""
    root.mkdir(parents=True)
    for rel, data, executable in reversed(FILES) if reverse else FILES:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(0o755 if executable else 0o644)
        os.utime(path, (mtime, mtime))
    os.symlink("main.py", root / "app" / "current.py")
    return root


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "ctx")


def files_in(archive: bytes) -> dict[str, tuple[str, int, bytes | str]]:
    """name -> (type, mode, content or link target) of a .tar.gz."""
    out: dict[str, tuple[str, int, bytes | str]] = {}
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        for member in tar:
            if member.isfile():
                extracted = tar.extractfile(member)
                assert extracted is not None
                out[member.name] = ("f", member.mode, extracted.read())
            elif member.issym():
                out[member.name] = ("l", member.mode, member.linkname)
            else:
                out[member.name] = ("d", member.mode, b"")
    return out


# --- determinism ---------------------------------------------------------------------


def test_same_content_different_mtimes_and_creation_order_same_hash(tmp_path: Path) -> None:
    first = make_tree(tmp_path / "one", mtime=1_000_000_000)
    second = make_tree(tmp_path / "elsewhere" / "two", reverse=True, mtime=1_700_000_000)
    assert source_hash(first, DEFAULT) == source_hash(second, DEFAULT)


def test_hash_is_64_lowercase_hex_and_tag_is_its_first_24(tree: Path) -> None:
    digest = source_hash(tree, DEFAULT)
    assert len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)
    assert image_tag(digest) == digest[:24]


def test_image_tag_refuses_something_that_is_not_a_hash() -> None:
    with pytest.raises(ValueError):
        image_tag("main")


def test_hash_with_a_thread_pool_equals_single_threaded(tree: Path) -> None:
    assert source_hash(tree, DEFAULT, threads=3) == source_hash(tree, DEFAULT, threads=1)


def test_build_arg_order_does_not_matter(tree: Path) -> None:
    one = BuildInputs.create(None, {"A": "1", "B": "2"}, None, None)
    two = BuildInputs.create(None, {"B": "2", "A": "1"}, None, None)
    assert one == two
    assert source_hash(tree, one) == source_hash(tree, two)


# --- the format is pinned --------------------------------------------------------------


def make_pinned_tree(root: Path) -> Path:
    """Every kind of entry the hash covers: plain, executable, empty and big (chunked) files,
    modes beyond the executable bit, an empty directory, a non-ASCII name, and symlinks to
    a file and to a directory."""
    root.mkdir()
    (root / "Dockerfile").write_bytes(b"FROM busybox\nCOPY . /app\n")
    (root / "app" / "data").mkdir(parents=True)
    (root / "app" / "main.py").write_bytes(b"print('hello')\n")
    (root / "app" / "run.sh").write_bytes(b"#!/bin/sh\nexec python main.py\n")
    (root / "app" / "run.sh").chmod(0o750)
    (root / "app" / "empty.txt").write_bytes(b"")
    (root / "app" / "data" / "table.csv").write_bytes(b"a,b\n1,2\n")
    (root / "app" / "data" / "table.csv").chmod(0o600)
    (root / "cache" / "empty").mkdir(parents=True)
    # 8 MiB + 4 KiB: BIG_FILE when the hash was pinned (a size, not the constant, so tuning
    # the constant cannot change the tree).
    (root / "model.bin").write_bytes(hashlib.sha256(b"pinned").digest() * (((8 << 20) + 4096) // 32))
    (root / "n\u00e4me with space.txt").write_bytes("caf\u00e9\n".encode())
    os.symlink("main.py", root / "app" / "current.py")
    os.symlink("app/data", root / "data-link")
    return root


#: The hashes of ``make_pinned_tree`` as every earlier release computed them. A change of
#: either means every existing tag stops matching its source: bump HASH_VERSION instead.
PINNED_TREE_HASH = "f5222fd6401e0dca4a3ab31802cdcc99129759af316b9dea86255a391d816893"
PINNED_FULL_INPUTS_HASH = "140ed1eed79de285d6232c8a57648e48fd9e067d37c7f7b6c3dc36f27d8134bd"


@pytest.mark.parametrize("threads", [1, 2])
def test_hash_of_a_known_tree_is_pinned(tmp_path: Path, threads: int) -> None:
    from dataclasses import replace

    from workers.context import clear_stat_cache

    clear_stat_cache()
    root = make_pinned_tree(tmp_path / "ctx")
    full = replace(BuildInputs.create("Dockerfile", {"B": "2", "A": "1"}, "runtime",
                                      "linux/arm64", secrets=["TOKEN"]),
                   bases=(("local/busybox:base", "sha256:" + "a" * 64),))
    assert source_hash(root, DEFAULT, threads=threads) == PINNED_TREE_HASH
    assert source_hash(root, full, threads=threads) == PINNED_FULL_INPUTS_HASH
    # Again, answered from what this process remembers of the tree.
    assert source_hash(root, DEFAULT, threads=threads) == PINNED_TREE_HASH


def make_pinned_mixed_tree(root: Path) -> Path:
    """A tree that crosses every size boundary and batch boundary of the hashing code as it
    was when pinned (BATCH_FILES 256, SMALL_FILE 256 KiB, READ_CHUNK 1 MiB, BIG_FILE 8 MiB;
    literal sizes, so retuning those constants cannot change the tree): several batches of
    small files, files at and just past SMALL_FILE, one read in several READ_CHUNKs with a
    partial last one, one at and one past 8 MiB, plus an executable, symlinks and an empty
    directory among them. Contents are deterministic."""
    root.mkdir()
    (root / "Dockerfile").write_bytes(b"FROM busybox\nCOPY . /srv\n")
    seed = hashlib.sha256(b"pinned mixed tree").digest()
    block = b"".join(hashlib.sha256(seed + bytes([i])).digest() for i in range(256)) * 8  # 64 KiB
    for i in range(2 * 256 + 37):
        folder = root / f"pkg{i % 7}" / f"mod{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        size = (i * 7919) % 9000  # 0 .. 9 KB, one empty
        reps = size // len(block) + 1
        (folder / f"file{i:04d}.py").write_bytes(i.to_bytes(4, "big") + (block * reps)[: max(size - 4, 0)])
    kib, mib = 1 << 10, 1 << 20
    sizes = {"at-small": 256 * kib, "past-small": 256 * kib + 1,
             "chunks": 3 * mib + 17, "at-big": 8 * mib, "past-big": 8 * mib + 4099}
    big = block * ((8 * mib + 4099) // len(block) + 1)
    for name, size in sizes.items():
        (root / "blobs").mkdir(exist_ok=True)
        (root / "blobs" / f"{name}.bin").write_bytes(name.encode() + big[: size - len(name)])
    (root / "pkg0" / "mod0" / "file0000.py").chmod(0o755)
    (root / "empty" / "nested").mkdir(parents=True)
    os.symlink("../blobs/chunks.bin", root / "pkg1" / "chunks-link")
    os.symlink("pkg2", root / "pkg-link")
    return root


#: The hash of ``make_pinned_mixed_tree`` as computed before the hashing code was tuned for
#: speed (batching, read sizes, threads): any such change must keep it.
PINNED_MIXED_TREE_HASH = "1a7ef4265f472258c2b57b9999bf51071778b621931aa4e83fa4c5971748a06a"


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_hash_of_a_mixed_tree_across_size_and_batch_boundaries_is_pinned(
        tmp_path: Path, threads: int) -> None:
    from workers.context import clear_stat_cache

    clear_stat_cache()
    root = make_pinned_mixed_tree(tmp_path / "ctx")
    assert source_hash(root, DEFAULT, threads=threads) == PINNED_MIXED_TREE_HASH
    clear_stat_cache()
    assert source_hash(root, DEFAULT, threads=threads) == PINNED_MIXED_TREE_HASH


# --- every input changes the hash ------------------------------------------------------


def test_content_change_changes_hash(tree: Path) -> None:
    before = source_hash(tree, DEFAULT)
    (tree / "app" / "main.py").write_bytes(b"print('bye')\n")
    assert source_hash(tree, DEFAULT) != before


def test_executable_bit_change_changes_hash(tree: Path) -> None:
    before = source_hash(tree, DEFAULT)
    (tree / "app" / "main.py").chmod(0o755)
    assert source_hash(tree, DEFAULT) != before


def test_permission_change_other_than_executable_keeps_hash(tree: Path) -> None:
    # Modes are normalised to 0644/0755 in hash and tarball alike, so umask is irrelevant.
    before = source_hash(tree, DEFAULT)
    (tree / "app" / "main.py").chmod(0o600)
    assert source_hash(tree, DEFAULT) == before


def test_renamed_file_changes_hash(tree: Path) -> None:
    before = source_hash(tree, DEFAULT)
    (tree / "README.md").rename(tree / "README.txt")
    assert source_hash(tree, DEFAULT) != before


def test_new_empty_directory_changes_hash(tree: Path) -> None:
    before = source_hash(tree, DEFAULT)
    (tree / "empty").mkdir()
    assert source_hash(tree, DEFAULT) != before


def test_symlink_target_change_changes_hash(tree: Path) -> None:
    before = source_hash(tree, DEFAULT)
    (tree / "app" / "current.py").unlink()
    os.symlink("run.sh", tree / "app" / "current.py")
    assert source_hash(tree, DEFAULT) != before


def test_dockerfile_change_changes_hash(tree: Path) -> None:
    before = source_hash(tree, DEFAULT)
    (tree / "Dockerfile").write_bytes(b"FROM busybox\nCOPY . /srv\n")
    assert source_hash(tree, DEFAULT) != before


def test_dockerfile_path_change_changes_hash(tree: Path) -> None:
    (tree / "docker").mkdir()
    (tree / "docker" / "Dockerfile").write_bytes((tree / "Dockerfile").read_bytes())
    other = BuildInputs.create("docker/Dockerfile", None, None, None)
    assert source_hash(tree, other) != source_hash(tree, DEFAULT)


@pytest.mark.parametrize(
    "changed",
    [
        BuildInputs.create(None, {"VERSION": "2"}, None, None),
        BuildInputs.create(None, None, "runtime", None),
        BuildInputs.create(None, None, None, "linux/arm64"),
    ],
    ids=["build-arg", "target", "platform"],
)
def test_build_arg_target_and_platform_each_change_hash(tree: Path, changed: BuildInputs) -> None:
    base = BuildInputs.create(None, {"VERSION": "1"}, None, None) if changed.build_args else DEFAULT
    assert source_hash(tree, changed) != source_hash(tree, base)


def test_a_resolved_base_digest_changes_hash_and_no_bases_keeps_it(tree: Path) -> None:
    from dataclasses import replace

    digest = "sha256:" + "a" * 64
    moved = "sha256:" + "b" * 64
    with_base = replace(DEFAULT, bases=(("local/busybox:base", digest),))
    assert source_hash(tree, with_base) != source_hash(tree, DEFAULT)
    assert source_hash(tree, replace(DEFAULT, bases=(("local/busybox:base", moved),))) \
        != source_hash(tree, with_base)
    assert source_hash(tree, replace(DEFAULT, bases=())) == source_hash(tree, DEFAULT)


def test_build_arg_value_cannot_pose_as_another_arg(tree: Path) -> None:
    one = BuildInputs.create(None, {"A": "1B2"}, None, None)
    two = BuildInputs.create(None, {"A": "1", "B": "2"}, None, None)
    assert source_hash(tree, one) != source_hash(tree, two)


def test_big_file_hashed_in_chunks_sees_its_last_byte(tree: Path) -> None:
    big = tree / "model.bin"
    data = bytearray(hashlib.sha256(b"seed").digest() * ((BIG_FILE + 12345) // 32))
    big.write_bytes(data)
    before = source_hash(tree, DEFAULT)
    data[-1] ^= 0xFF
    big.write_bytes(data)
    assert source_hash(tree, DEFAULT) != before


# --- a tree that changes while it is hashed ------------------------------------------


def hash_changing_after_walk(root: Path, rel: str, change: Any, threads: int) -> str:
    """The source hash of ``root`` where ``change(path)`` runs on ``rel`` right after the
    walk yields it, before its contents are read (files are read a batch later)."""
    from workers.context import _hash_entries, _Walker, clear_stat_cache

    clear_stat_cache()
    walker = _Walker(root, DEFAULT)

    class ChangingWalk:
        def __iter__(self) -> Any:
            for entry in walker:
                yield entry
                if entry.rel == rel:
                    change(root / rel)

    return _hash_entries(ChangingWalk(), threads).hexdigest()  # type: ignore[arg-type]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("size", [100, 64 << 10, SMALL_FILE + 1])
def test_a_file_that_shrinks_after_the_walk_is_a_clear_error(
        tree: Path, size: int, threads: int) -> None:
    (tree / "app" / "blob.bin").write_bytes(b"x" * size)

    def shrink(path: Path) -> None:
        with open(path, "r+b") as f:
            f.truncate(size // 2)

    with pytest.raises(SourceError, match=r"'app/blob.bin' shrank while it was being hashed"):
        hash_changing_after_walk(tree, "app/blob.bin", shrink, threads)
    # The helper threads are gone with the failed hash.
    assert not [t for t in threading.enumerate() if t.name == "buildq-hash"]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("size", [100, 64 << 10])
def test_a_file_swapped_for_a_symlink_after_the_walk_is_not_followed(
        tree: Path, size: int, threads: int) -> None:
    (tree / "app" / "blob.bin").write_bytes(b"x" * size)

    def swap(path: Path) -> None:
        path.unlink()
        os.symlink("/etc/hostname", path)

    with pytest.raises(SourceError, match=r"cannot read 'app/blob.bin' in the context: .*symbolic"):
        hash_changing_after_walk(tree, "app/blob.bin", swap, threads)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_file_that_grows_after_the_walk_is_hashed_as_walked(tree: Path, threads: int) -> None:
    blob = tree / "app" / "blob.bin"
    blob.write_bytes(b"y" * (64 << 10))
    before = hash_changing_after_walk(tree, "README.md", lambda _: None, threads)

    def grow(path: Path) -> None:
        with open(path, "ab") as f:
            f.write(b"more")

    assert hash_changing_after_walk(tree, "app/blob.bin", grow, threads) == before


# --- .dockerignore -------------------------------------------------------------------


def test_dockerignored_files_do_not_count(tree: Path) -> None:
    (tree / ".dockerignore").write_text("*.log\n**/__pycache__\nsecrets/\n")
    before = source_hash(tree, DEFAULT)
    (tree / "build.log").write_text("noise")
    (tree / "app" / "__pycache__").mkdir()
    (tree / "app" / "__pycache__" / "main.pyc").write_bytes(b"\0")
    (tree / "secrets").mkdir()
    (tree / "secrets" / "key").write_text("hunter2")
    assert source_hash(tree, DEFAULT) == before


def test_exception_pattern_reincludes_file_and_its_changes_count(tree: Path) -> None:
    (tree / "vendor" / "keep").mkdir(parents=True)
    (tree / "vendor" / "drop.txt").write_text("x")
    (tree / "vendor" / "keep" / "this.txt").write_text("v1")
    (tree / ".dockerignore").write_text("vendor\n!vendor/keep/this.txt\n")
    before = source_hash(tree, DEFAULT)

    (tree / "vendor" / "drop.txt").write_text("changed")
    assert source_hash(tree, DEFAULT) == before
    (tree / "vendor" / "keep" / "this.txt").write_text("v2")
    assert source_hash(tree, DEFAULT) != before

    packed = files_in(_pack(tree))
    assert "vendor/keep/this.txt" in packed
    assert "vendor/drop.txt" not in packed


def test_wildcard_exception_reaches_into_excluded_directory(tree: Path) -> None:
    (tree / "docs" / "api").mkdir(parents=True)
    (tree / "docs" / "api" / "index.md").write_text("kept")
    (tree / "docs" / "api" / "draft.txt").write_text("dropped")
    (tree / ".dockerignore").write_text("docs\n!docs/**/*.md\n")
    packed = files_in(_pack(tree))
    assert "docs/api/index.md" in packed
    assert "docs/api/draft.txt" not in packed


def test_ignored_dockerfile_and_dockerignore_are_still_in_the_context(tree: Path) -> None:
    (tree / ".dockerignore").write_text("Dockerfile\n.dockerignore\n")
    before = source_hash(tree, DEFAULT)
    packed = files_in(_pack(tree))
    assert {"Dockerfile", ".dockerignore"} <= packed.keys()
    (tree / "Dockerfile").write_bytes(b"FROM alpine\n")
    assert source_hash(tree, DEFAULT) != before


def test_dockerfile_specific_ignore_file_wins(tree: Path) -> None:
    (tree / "docker").mkdir()
    (tree / "docker" / "Dockerfile").write_text("FROM busybox\n")
    (tree / "docker" / "Dockerfile.dockerignore").write_text("README.md\n")
    inputs = BuildInputs.create("docker/Dockerfile", None, None, None)
    packed = files_in(_pack(tree, inputs))
    assert "README.md" not in packed
    assert "docker/Dockerfile" in packed


# --- refusals -----------------------------------------------------------------------


def test_symlink_escaping_the_root_is_refused_by_name(tree: Path, tmp_path: Path) -> None:
    (tmp_path / "outside.txt").write_text("secret")
    os.symlink("../../outside.txt", tree / "app" / "leak")
    with pytest.raises(SourceError, match=r"app/leak.*outside the build context"):
        source_hash(tree, DEFAULT)
    with pytest.raises(SourceError, match="app/leak"):
        write_context(tree, DEFAULT, io.BytesIO())


def test_absolute_symlink_out_of_the_root_is_refused(tree: Path) -> None:
    os.symlink("/etc/passwd", tree / "passwd")
    with pytest.raises(SourceError, match="passwd"):
        source_hash(tree, DEFAULT)


def test_escaping_symlink_that_is_dockerignored_is_fine(tree: Path) -> None:
    os.symlink("/etc", tree / "etc")
    (tree / ".dockerignore").write_text("etc\n")
    assert len(source_hash(tree, DEFAULT)) == 64


def test_missing_dockerfile_is_a_source_error(tree: Path) -> None:
    (tree / "Dockerfile").unlink()
    with pytest.raises(SourceError, match="no Dockerfile"):
        source_hash(tree, DEFAULT)


def test_dockerfile_path_leaving_the_context_is_refused(tree: Path) -> None:
    with pytest.raises(SourceError, match="not inside the build context"):
        BuildInputs.create("../Dockerfile", None, None, None)


def test_dockerfile_symlinked_outside_the_context_is_refused(tree: Path, tmp_path: Path) -> None:
    (tmp_path / "Dockerfile.outside").write_text("FROM scratch\n")
    (tree / "Dockerfile").unlink()
    os.symlink(tmp_path / "Dockerfile.outside", tree / "Dockerfile")
    with pytest.raises(SourceError, match="outside the build context"):
        read_dockerfile(tree, DEFAULT)


def test_read_dockerfile_returns_its_text(tree: Path) -> None:
    assert read_dockerfile(tree, DEFAULT) == "FROM busybox\nCOPY . /app\n"


def test_fifo_in_the_context_is_refused(tree: Path) -> None:
    os.mkfifo(tree / "pipe")
    with pytest.raises(SourceError, match="pipe"):
        source_hash(tree, DEFAULT)


# --- the tarball --------------------------------------------------------------------


def _pack(root: Path, inputs: BuildInputs = DEFAULT) -> bytes:
    out = io.BytesIO()
    written = write_context(root, inputs, out)
    assert written == len(out.getvalue())
    return out.getvalue()


def test_write_context_is_byte_identical_across_runs_and_checkouts(tmp_path: Path) -> None:
    first = make_tree(tmp_path / "one", mtime=1_000_000_000)
    second = make_tree(tmp_path / "two", reverse=True, mtime=1_700_000_000)
    assert _pack(first) == _pack(first) == _pack(second)


def test_write_context_extracts_to_the_same_files(tree: Path, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    with tarfile.open(fileobj=io.BytesIO(_pack(tree)), mode="r:gz") as tar:
        tar.extractall(dest, filter="data")
    for rel, data, executable in FILES:
        assert (dest / rel).read_bytes() == data
        assert bool((dest / rel).stat().st_mode & 0o100) == executable
    assert os.readlink(dest / "app" / "current.py") == "main.py"
    assert source_hash(dest, DEFAULT) == source_hash(tree, DEFAULT)


def test_write_context_headers_carry_no_time_owner_or_checkout_mode(tree: Path) -> None:
    (tree / "README.md").chmod(0o600)
    with tarfile.open(fileobj=io.BytesIO(_pack(tree)), mode="r:gz") as tar:
        members = tar.getmembers()
    for member in members:
        assert (member.mtime, member.uid, member.gid, member.uname, member.gname) == (
            0, 0, 0, "", "")
    modes = {m.name: m.mode for m in members}
    assert modes["README.md"] == 0o644
    assert modes["app/run.sh"] == 0o755
    assert modes["app"] == 0o755


def test_write_context_leaves_out_ignored_files(tree: Path) -> None:
    (tree / ".dockerignore").write_text("README.md\n")
    assert "README.md" not in files_in(_pack(tree))


# --- what a process remembers between hashes ------------------------------------------


def _cold_hash(root: Path, inputs: BuildInputs = DEFAULT) -> str:
    from workers.context import clear_stat_cache

    clear_stat_cache()
    return source_hash(root, inputs)


@pytest.fixture(params=["native", "python"])
def stamp_check(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which stamp check the tree index uses: the C one (workers/_stamps.c) or Python's."""
    from workers import context

    if request.param == "python":
        monkeypatch.setattr(context, "NATIVE_STAMPS", None)
    else:
        # Not a skip: a broken build must not quietly leave only the Python check tested.
        assert context.NATIVE_STAMPS is not None, "workers/_stamps.c is not built: run scripts/bootstrap"
    return str(request.param)


def _remembered_walks() -> list[Any]:
    from workers import context

    return list(context.TREE_INDEX._walks.values())


@pytest.fixture
def remembered(tree: Path, stamp_check: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The tree's hash, with the tree remembered by this process's tree index (once per
    stamp check).

    The racy window shrinks to 50 ms (the tree is older than that when hashed), so the
    test need not wait two seconds; every change below comes later than the window.
    """
    from workers import context

    monkeypatch.setattr(context, "RACY_NS", 50_000_000)
    time.sleep(0.06)
    first = _cold_hash(tree)
    # The native check reads the packed form: without it the Python check would answer.
    assert [w.packed is not None for w in _remembered_walks()] == [stamp_check == "native"]
    hits = context.TREE_INDEX.hits
    assert source_hash(tree, DEFAULT) == first
    assert context.TREE_INDEX.hits == hits + 1, "the unchanged tree was walked again"
    return first


def _rewrite_same_size(tree: Path) -> None:
    main = tree / "app" / "main.py"
    before = main.stat()
    main.write_bytes(b"print('HELLO')\n")
    os.utime(main, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert main.stat().st_size == before.st_size


def _chmod_executable(tree: Path) -> None:
    (tree / "app" / "main.py").chmod(0o755)


def _retarget_symlink(tree: Path) -> None:
    (tree / "app" / "current.py").unlink()
    os.symlink("run.sh", tree / "app" / "current.py")


def _add_file(tree: Path) -> None:
    (tree / "app" / "data" / "new.csv").write_bytes(b"c\n3\n")


def _remove_file(tree: Path) -> None:
    (tree / "app" / "data" / "table.csv").unlink()


def _add_empty_directory(tree: Path) -> None:
    (tree / "app" / "data" / "empty").mkdir()


def _replace_by_rename(tree: Path) -> None:
    # Same name, same size, same mtime: another inode.
    main = tree / "app" / "main.py"
    other = tree / "main.tmp"
    other.write_bytes(b"print('howdy')\n"[: main.stat().st_size])
    os.utime(other, ns=(main.stat().st_atime_ns, main.stat().st_mtime_ns))
    other.replace(main)


def _remove_directory(tree: Path) -> None:
    # Paths the index remembered (the directory and the file in it) are gone.
    (tree / "app" / "data" / "table.csv").unlink()
    (tree / "app" / "data").rmdir()


def _replace_file_by_directory(tree: Path) -> None:
    (tree / "app" / "main.py").unlink()
    (tree / "app" / "main.py").mkdir()


@pytest.mark.parametrize("change", [
    _rewrite_same_size, _chmod_executable, _retarget_symlink, _add_file, _remove_file,
    _add_empty_directory, _replace_by_rename, _remove_directory, _replace_file_by_directory,
], ids=lambda f: f.__name__.strip("_"))
def test_a_change_is_seen_by_the_next_hash_of_a_remembered_tree(
        tree: Path, remembered: str, change: Any) -> None:
    change(tree)
    seen = source_hash(tree, DEFAULT)
    assert seen != remembered
    assert seen == _cold_hash(tree)


def test_a_file_rewritten_within_the_same_second_as_the_hash_is_read_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from workers import context

    # A filesystem whose timestamps have a one-second granularity: a rewrite in the same
    # second that keeps the size leaves the whole stamp as it was. Only the racy rule (a
    # stamp this recent is not trusted) makes the next hash read the file again.
    def coarse(st: os.stat_result) -> context.Stamp:
        second = 1_000_000_000
        return (st.st_mode, st.st_ino, st.st_dev, st.st_size,
                st.st_mtime_ns // second * second, st.st_ctime_ns // second * second)

    monkeypatch.setattr(context, "_stamp", coarse)
    # The C check reads whole stamps from lstat: coarse ones would never match it, and a
    # tree index wrongly kept would go unseen. The Python check reads them through _stamp.
    monkeypatch.setattr(context, "NATIVE_STAMPS", None)
    context.clear_stat_cache()
    # Just after a second begins, so that the rewrite below most likely falls in the same
    # second (if it does not, the stamps differ and the test is merely less strict).
    time.sleep(1 - time.time() % 1)
    tree = make_tree(tmp_path / "ctx")
    before = source_hash(tree, DEFAULT)
    _rewrite_same_size(tree)  # and the same mtime, in the same second
    seen = source_hash(tree, DEFAULT)
    assert seen != before
    assert seen == _cold_hash(tree)


def test_rewrite_with_same_size_and_mtime_is_seen_after_a_cached_hash(tree: Path) -> None:
    from workers.context import clear_stat_cache

    clear_stat_cache()
    time.sleep(2.1)  # past the racy window, so the first hash is remembered
    main = tree / "app" / "main.py"
    stat_before = main.stat()
    before = source_hash(tree, DEFAULT)
    assert source_hash(tree, DEFAULT) == before
    main.write_bytes(b"print('HELLO')\n")  # same size
    os.utime(main, ns=(stat_before.st_atime_ns, stat_before.st_mtime_ns))
    assert main.stat().st_size == stat_before.st_size
    assert source_hash(tree, DEFAULT) != before
    clear_stat_cache()


def test_a_remembered_tree_is_kept_per_ignore_file_and_dockerfile(remembered: str, tree: Path) -> None:
    (tree / ".dockerignore").write_text("README.md\n")
    ignoring = source_hash(tree, DEFAULT)
    assert ignoring != remembered and ignoring == _cold_hash(tree)
    generated = BuildInputs.create(None, None, None, None, dockerfile_text="FROM scratch\n")
    assert source_hash(tree, generated) == _cold_hash(tree, generated)


# --- the native stamp check itself (workers/_stamps.c) ---------------------------------------


def test_the_native_stamp_check_is_built_and_used_by_the_tree_index() -> None:
    # scripts/bootstrap builds it: failing here, not falling back, keeps a broken build seen.
    import workers._stamps
    from workers import context

    assert context.NATIVE_STAMPS is workers._stamps
    assert context._STAMP_RECORD.size == workers._stamps.RECORD_SIZE


def _stamp_of(path: str) -> Any:
    from workers.context import _stamp

    return _stamp(os.lstat(path))


def _stamped_files(root: Path, count: int) -> tuple[list[str], list[Any]]:
    """``count`` files in a few directories, and their paths and stamps as a walk keeps them."""
    paths = []
    for i in range(count):
        path = root / f"d{i % 7}" / f"f{i:04d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * (i % 5))
        paths.append(str(path))
    return paths, [_stamp_of(p) for p in paths]


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_native_check_sees_a_change_anywhere_on_any_number_of_threads(tmp_path: Path, threads: int) -> None:
    from workers.context import NATIVE_STAMPS, _pack_stamps

    assert NATIVE_STAMPS is not None
    paths, stamps = _stamped_files(tmp_path, 600)
    packed = _pack_stamps(paths, stamps)
    assert packed is not None
    assert NATIVE_STAMPS.unchanged(*packed, threads) is True
    # The first and last path, both sides of the threads' first batch boundary (128
    # paths), and one in the middle: wherever it is, whichever thread takes it.
    for index in (0, 127, 128, 299, 599):
        os.chmod(paths[index], 0o600)
        assert NATIVE_STAMPS.unchanged(*packed, threads) is False
        packed = _pack_stamps(paths, [_stamp_of(p) for p in paths])
        assert packed is not None
        assert NATIVE_STAMPS.unchanged(*packed, threads) is True


@pytest.mark.parametrize("change", ["vanished", "became a directory", "same size rewritten",
                                    "parent became a file"])
def test_native_check_answers_changed_for_a_path_it_cannot_match(
        tmp_path: Path, change: str) -> None:
    from workers.context import NATIVE_STAMPS, _pack_stamps

    assert NATIVE_STAMPS is not None
    paths, stamps = _stamped_files(tmp_path, 20)
    packed = _pack_stamps(paths, stamps)
    assert packed is not None
    target = Path(paths[10])
    if change == "vanished":
        target.unlink()
    elif change == "became a directory":
        target.unlink()
        target.mkdir()
    elif change == "same size rewritten":
        before = target.stat()
        # Only ctime tells this rewrite apart. A kernel without fine-grained timestamps
        # stamps from a clock that ticks every few milliseconds: let it tick first.
        time.sleep(0.05)
        target.write_bytes(b"y" * before.st_size)
        os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert target.stat().st_ctime_ns != before.st_ctime_ns
    else:
        # lstat fails with ENOTDIR: an error, and an error is a change.
        parent = target.parent
        for child in parent.iterdir():
            child.unlink()
        parent.rmdir()
        parent.write_bytes(b"")
    assert NATIVE_STAMPS.unchanged(*packed, 1) is False


def test_native_check_refuses_malformed_arguments(tmp_path: Path) -> None:
    from workers.context import NATIVE_STAMPS, _pack_stamps

    assert NATIVE_STAMPS is not None
    paths, stamps = _stamped_files(tmp_path, 3)
    packed = _pack_stamps(paths, stamps)
    assert packed is not None
    blob, records = packed
    with pytest.raises(ValueError, match="whole number"):
        NATIVE_STAMPS.unchanged(blob, records[:-1], 1)
    with pytest.raises(ValueError, match="NUL"):
        NATIVE_STAMPS.unchanged(blob[:-1], records, 1)
    with pytest.raises(ValueError, match="outside"):
        NATIVE_STAMPS.unchanged(blob[: len(blob) // 2] + b"\0", records, 1)
    assert NATIVE_STAMPS.unchanged(b"\0", b"", 2) is True  # nothing remembered: nothing changed
