"""Images whose base images have moved since they were built: what a fleet re-bases after a CVE.

Reads only what the records hold (the bases each build resolved, with their digests) and
asks each base's registry what the reference means now; no registry is listed.
"""

from __future__ import annotations

import json
from typing import Any

import redis

from config.errors import BuildqError
from config.settings import Settings
from tasks.records import history
from workers.bases import parse_base
from workers.registries import registry_for

#: Records looked at, newest first (the history index keeps at most this many).
SCAN_LIMIT = 10_000


def stale_images(client: redis.Redis, settings: Settings,
                 repository: str | None = None) -> list[dict[str, Any]]:
    """One entry per recorded image with a moved base: the record and each base that moved."""
    found: list[dict[str, Any]] = []
    now: dict[str, str | None] = {}
    seen: set[str] = set()
    for record in history(client, SCAN_LIMIT):
        if record.get("status") not in ("built", "skipped") or not record.get("bases"):
            continue
        if repository and record.get("destination") != repository:
            continue
        # Newest first: an image built again for the same request (after a rebuild) stands
        # for it, and the older image it replaced is not listed.
        asked = json.dumps(record.get("request") or record.get("source_hash"), sort_keys=True)
        if asked in seen:
            continue
        seen.add(asked)
        moved = []
        for base in record["bases"]:
            image = base["image"]
            if image not in now:
                now[image] = _current_digest(image, settings)
            if now[image] != base["digest"]:
                moved.append({"image": image, "built_with": base["digest"], "now": now[image]})
        if moved:
            found.append({"image": record.get("image"), "source_hash": record.get("source_hash"),
                          "request": record.get("request"), "moved": moved})
    return found


def _current_digest(image: str, settings: Settings) -> str | None:
    """The digest ``image`` resolves to now; None when it is gone or cannot be asked."""
    ref = parse_base(image)
    if ref.digest:
        return ref.digest
    tagged = ref if ref.tag else ref.tagged("latest")
    try:
        return registry_for(tagged, settings).manifest_digest(tagged, tagged.tag or "latest")
    except BuildqError:
        return None


def rebuild_arguments(entry: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``build_image``'s source and options for a stale entry: the request as first asked."""
    request = dict(entry.get("request") or {})
    source = str(request.pop("source", "") or "")
    if not source:
        raise ValueError(f"the record of {entry.get('image')} holds no request to repeat")
    options = {k: v for k, v in request.items() if v not in (None, False, [], {}, "")}
    return source, options
