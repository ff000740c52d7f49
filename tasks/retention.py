"""buildq gc: which tags buildq made in a repository may go, and deleting them by digest.

A tag is buildq's when its image carries the source-hash label (``config/names.py``
``HASH_LABEL``) and the tag is that hash's first 24 hex characters; every other tag is left
alone. ``--keep N`` keeps the N newest of buildq's tags (by the image's ``created`` time),
``--older-than AGE`` lets only images older than AGE go; given both, a tag goes only when
both say so. Never deleted: a tag whose source hash a running request holds (its lock or
pending map in Redis), and an image another tag still names (deleting a manifest deletes
every tag on it).
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import redis

from config.errors import InputError
from config.names import HASH_LABEL
from config.references import parse_destination
from config.settings import Settings
from tasks.keys import PENDING_INDEX, lock_key
from workers.registries import registry_for

#: ``--older-than`` units.
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
AGE_FORMS = "a number and a unit: 90s, 30m, 12h, 30d or 4w"


def parse_age(text: str, option: str = "--older-than") -> float:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text or "")
    if not match:
        hint = f"Write it as {AGE_FORMS}" + (
            ", or a UTC date/time: 2026-11-30, 2026-11-30T12:00." if option == "--since" else ".")
        raise InputError(f"{option} {text!r} is not an age.", hint)
    return float(match.group(1)) * UNITS[match.group(2)]


@dataclass
class Tagged:
    """One of buildq's tags and what gc does with it."""

    tag: str
    digest: str
    created: float
    source_hash: str
    #: "keep", "delete", "in use" (a running request holds its hash) or "shared" (another
    #: tag names the same image).
    verdict: str = "keep"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _created(config: dict[str, Any]) -> float:
    raw = str(config.get("created") or "")
    match = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?", raw)
    if not match:
        return 0.0
    fraction = float(match.group(2) or 0)
    return datetime.fromisoformat(match.group(1) + "+00:00").timestamp() + fraction


def _in_use(client: redis.Redis) -> set[str]:
    held = {str(h) for h in client.smembers(PENDING_INDEX)}
    prefix = lock_key("")
    held |= {str(k)[len(prefix):] for k in client.scan_iter(match=lock_key("*"), count=500)}
    return held


def plan(client: redis.Redis, settings: Settings, repository: str, keep: int | None,
         older_than: float | None, now: float | None = None) -> list[Tagged]:
    """buildq's tags in ``repository``, newest first, each with its verdict."""
    if keep is None and older_than is None:
        raise InputError("gc needs --keep N, --older-than AGE, or both.",
                         "buildq gc --repository REGISTRY/REPOSITORY [--keep N] "
                         f"[--older-than AGE] [--dry-run]; AGE is {AGE_FORMS}.")
    ref = parse_destination(repository, "--repository")
    registry = registry_for(ref, settings)
    now = time.time() if now is None else now
    ours: list[Tagged] = []
    others: set[str] = set()
    for tag in registry.tags(ref):
        found = registry.image_config(ref, tag)
        if found is None:
            continue
        digest, config = found
        labels = (config.get("config") or {}).get("Labels") or {}
        source_hash = str(labels.get(HASH_LABEL) or "")
        if re.fullmatch(r"[0-9a-f]{24}", tag) and source_hash[:24] == tag:
            ours.append(Tagged(tag, digest, _created(config), source_hash))
        else:
            others.add(digest)
    ours.sort(key=lambda t: (t.created, t.tag), reverse=True)
    running = _in_use(client)
    for rank, tagged in enumerate(ours):
        rules = []
        if keep is not None:
            rules.append(rank >= keep)
        if older_than is not None:
            rules.append(now - tagged.created > older_than)
        if all(rules):
            tagged.verdict = "delete"
    kept = others | {t.digest for t in ours if t.verdict == "keep"}
    for tagged in ours:
        if tagged.verdict != "delete":
            continue
        if tagged.source_hash in running:
            tagged.verdict = "in use"
        elif tagged.digest in kept:
            tagged.verdict = "shared"
    return ours


def collect(settings: Settings, repository: str, doomed: list[Tagged]) -> None:
    """Delete each of ``doomed`` by its digest (the registry's v2 DELETE)."""
    ref = parse_destination(repository, "--repository")
    registry = registry_for(ref, settings)
    for tagged in doomed:
        registry.delete_manifest(ref, tagged.digest)
