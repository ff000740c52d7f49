"""The Lua scripts beside this module, read once per process and registered once per client.

Each build calls them several times a second (every heartbeat extends its lease), so
neither the file read nor the ``Script`` object is repeated per call; redis-py's
``Script`` sends the body only when the server does not know its SHA yet.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from importlib.resources import files
from typing import Any

import redis
from redis.client import Pipeline
from redis.commands.core import Script

#: Script name (its file name without ``.lua``) → its source.
SOURCES: dict[str, str] = {
    name: files("tasks").joinpath(f"{name}.lua").read_text(encoding="utf-8")
    for name in ("acquire", "extend", "finish", "release", "build", "answer", "takeover", "reclaim",
                 "started")
}

#: Attribute of a client that holds its registered scripts. On the client itself, not in
#: a WeakKeyDictionary: a ``Script`` refers to its client, so a weak map's entries would
#: keep their keys alive (and the embedded mode makes a client per call).
_ATTR = "_buildq_scripts"
_lock = threading.Lock()


def script(client: redis.Redis, name: str) -> Script:
    """The registered script ``name`` for ``client``."""
    with _lock:
        scripts: dict[str, Script] | None = getattr(client, _ATTR, None)
        if scripts is None:
            scripts = {}
            setattr(client, _ATTR, scripts)
        found = scripts.get(name)
        if found is None:
            found = scripts[name] = client.register_script(SOURCES[name])
        return found


def add_script(pipe: Pipeline, client: redis.Redis, name: str, keys: Sequence[Any],
               args: Sequence[Any]) -> Callable[[Any], Any]:
    """Queue script ``name`` on ``pipe`` (run with ``raise_on_error=False``), to share a round
    trip with other commands. Returns what reads its reply: the script's result, running it
    on its own should Redis not know it (restarted since this client loaded it)."""
    found = script(client, name)
    pipe.evalsha(found.sha, len(keys), *keys, *args)

    def reply_of(reply: Any) -> Any:
        if isinstance(reply, redis.exceptions.NoScriptError):
            return found(keys=keys, args=args)
        if isinstance(reply, Exception):
            raise reply
        return reply

    return reply_of
