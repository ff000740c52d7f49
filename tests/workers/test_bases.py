"""Finding a Dockerfile's base images, resolving them once, and pinning them."""

from __future__ import annotations

import pytest

from config.errors import BuildError, InputError
from config.references import ImageRef
from workers.bases import DigestCache, find_bases, pin, resolve

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64


def _images(text: str, args: dict[str, str] | None = None) -> list[str]:
    return [b.image for b in find_bases(text, args)]


def test_stage_names_scratch_and_stage_indexes_are_not_bases() -> None:
    text = ("FROM python:3.11 AS build\nRUN make\nFROM scratch\nCOPY --from=build /a /a\n"
            "COPY --from=0 /b /b\nFROM build AS again\n")
    assert _images(text) == ["python:3.11"]


def test_copy_from_an_image_and_run_mount_from_an_image_are_bases() -> None:
    text = ("FROM alpine:3\nCOPY --from=busybox:1.36 /bin/busybox /bb\n"
            "RUN --mount=type=bind,from=registry.example.com/tools:2,target=/t ls /t\n")
    assert _images(text) == ["alpine:3", "busybox:1.36", "registry.example.com/tools:2"]


def test_global_args_parameterise_from_and_build_args_override_them() -> None:
    text = ("ARG VERSION=3.11\nARG REG\nFROM ${REG:-docker.io}/library/python:$VERSION-slim\n"
            "ARG LATE=x\nFROM python:${LATE}\n")
    assert _images(text) == ["docker.io/library/python:3.11-slim", "python:"]
    assert _images(text, {"VERSION": "3.12", "REG": "mirror.local"})[0] == \
        "mirror.local/library/python:3.12-slim"


def test_continuation_lines_comments_and_the_escape_directive() -> None:
    text = "# escape=`\nFROM `\n  alpine:3 `\n  AS base\n# a comment\nRUN echo hi\n"
    assert _images(text) == ["alpine:3"]


def test_pin_names_each_base_by_digest_and_leaves_other_lines_alone() -> None:
    text = ("ARG V=3\nFROM alpine:$V AS build\nRUN echo alpine:3\n"
            "FROM build\nCOPY --from=busybox:1 /x /x\n")
    pinned = pin(text, {"alpine:3": D1, "busybox:1": D2})
    assert pinned == (f"ARG V=3\nFROM alpine:3@{D1} AS build\nRUN echo alpine:3\n"
                      f"FROM build\nCOPY --from=busybox:1@{D2} /x /x\n")


def test_pin_does_not_touch_a_longer_name_that_starts_with_the_base() -> None:
    text = "FROM base2:1 AS one\nFROM base:1\n"
    assert pin(text, {"base:1": D1, "base2:1": D2}) == \
        f"FROM base2:1@{D2} AS one\nFROM base:1@{D1}\n"


def test_resolve_asks_once_per_reference_and_not_for_a_digest() -> None:
    asked: list[str] = []

    def lookup(ref: ImageRef) -> str | None:
        asked.append(str(ref))
        return D1

    text = f"FROM alpine:3\nFROM alpine:3\nFROM busybox@{D2}\nFROM ubuntu\n"
    resolved = resolve(find_bases(text), lookup, DigestCache(ttl=0))
    assert resolved == {"alpine:3": D1, f"busybox@{D2}": D2, "ubuntu": D1}
    assert asked == ["docker.io/library/alpine:3", "docker.io/library/ubuntu:latest"]


def test_the_cache_spares_a_second_lookup_within_its_ttl_and_zero_disables_it() -> None:
    calls = []

    def lookup(ref: ImageRef) -> str | None:
        calls.append(ref)
        return D1

    warm = DigestCache(ttl=60)
    resolve(find_bases("FROM alpine:3\n"), lookup, warm)
    resolve(find_bases("FROM alpine:3\n"), lookup, warm)
    assert len(calls) == 1
    off = DigestCache(ttl=0)
    resolve(find_bases("FROM alpine:3\n"), lookup, off)
    resolve(find_bases("FROM alpine:3\n"), lookup, off)
    assert len(calls) == 3


def test_a_missing_base_fails_the_build_naming_it() -> None:
    with pytest.raises(BuildError, match="nope:1 does not exist"):
        resolve(find_bases("FROM nope:1\n"), lambda ref: None, DigestCache(ttl=0))


def test_a_malformed_base_is_bad_input() -> None:
    with pytest.raises(InputError, match="base image 'Bad//Name' is not a valid reference"):
        resolve(find_bases("FROM Bad//Name\n"), lambda ref: D1, DigestCache(ttl=0))
