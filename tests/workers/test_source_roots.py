"""Which local paths a worker serving remote requests may read, decided without reading them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from config.errors import ForbiddenError
from config.settings import Settings
from workers.sources import parse_source
from workers.sources.roots import check_roots, check_source_text, is_shipped_source


def remote(tmp_path: Path, roots: str = "") -> Settings:
    return Settings.from_env({"BUILDQ_REDIS_URL": "redis://127.0.0.1:1/0", "HOME": str(tmp_path),
                              "BUILDQ_CONTEXT_STORE": (tmp_path / "store").as_uri(),
                              "BUILDQ_SOURCE_ROOTS": roots})


def test_by_default_only_the_upload_area_is_readable(tmp_path: Path) -> None:
    settings = remote(tmp_path)
    check_source_text(str(tmp_path / "store" / "sources" / "buildq-upload-x.tar.gz"), settings)
    check_roots(parse_source((tmp_path / "store/sources/buildq-upload-x.tar.gz").as_uri()), settings)
    for source in (str(tmp_path), "~/.docker", "/etc", str(tmp_path / "store")):
        with pytest.raises(ForbiddenError, match="BUILDQ_SOURCE_ROOTS"):
            check_source_text(source, settings)


def test_paths_are_resolved_before_the_check(tmp_path: Path) -> None:
    inside, outside = tmp_path / "src", tmp_path / "private"
    inside.mkdir()
    outside.mkdir()
    (inside / "ok").mkdir()
    (inside / "escape").symlink_to(outside)
    settings = remote(tmp_path, f"{inside}{os.pathsep}/nonexistent")
    check_source_text(str(inside / "ok"), settings)
    for source in (str(inside / "escape"), f"{inside}/../private", f"{inside}-sibling"):
        with pytest.raises(ForbiddenError):
            check_source_text(source, settings)
    with pytest.raises(ForbiddenError):
        check_roots(parse_source(f"file://{inside}/../private/repo.git"), settings)
    # Remote sources are not local reads.
    check_roots(parse_source("https://example.com/org/repo.git"), settings)
    check_roots(parse_source("s3://bucket/prefix/src.tar.gz"), settings)


def test_the_embedded_mode_reads_the_callers_files(tmp_path: Path) -> None:
    check_source_text("/etc", Settings.from_env({"HOME": str(tmp_path)}))


def test_only_shipped_sources_in_the_upload_area_are_deleted_after_their_build(
        tmp_path: Path) -> None:
    settings = remote(tmp_path)
    area = tmp_path / "store" / "sources"
    assert is_shipped_source((area / "buildq-upload-ab.tar.gz").as_uri(), settings)
    assert not is_shipped_source((tmp_path / "home/sources/buildq-upload-ab.tar.gz").as_uri(),
                                 settings)
    assert not is_shipped_source((area / "other.tar.gz").as_uri(), settings)
    assert is_shipped_source("s3://bucket/p/sources/buildq-upload-ab.tar.gz", settings)
    assert not is_shipped_source("s3://bucket/p/buildq-upload-ab.tar.gz", settings)


def test_roots_must_be_absolute() -> None:
    from config.errors import ConfigError

    with pytest.raises(ConfigError, match="BUILDQ_SOURCE_ROOTS"):
        Settings.from_env({"BUILDQ_SOURCE_ROOTS": "relative/dir"})
