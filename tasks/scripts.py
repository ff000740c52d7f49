"""The Lua scripts beside this module, read once per process and registered once per client.

Each build calls them several times a second (every heartbeat extends its lease), so
neither the file read nor the ``Script`` object is repeated per call; redis-py's
``Script`` sends the body only when the server does not know its SHA yet.
"""

from __future__ import annotations

import threading
from importlib.resources import files
from weakref import WeakKeyDictionary

import redis
from redis.commands.core import Script

#: Script name (its file name without ``.lua``) → its source.
SOURCES: dict[str, str] = {
    name: files("tasks").joinpath(f"{name}.lua").read_text(encoding="utf-8")
    for name in ("acquire", "extend", "finish", "takeover", "reclaim")
}

# Weak, so a client that goes away (the embedded mode makes one per call) takes its
# scripts along instead of pinning its connection pool.
_registered: WeakKeyDictionary[redis.Redis, dict[str, Script]] = WeakKeyDictionary()
_lock = threading.Lock()


def script(client: redis.Redis, name: str) -> Script:
    """The registered script ``name`` for ``client``."""
    with _lock:
        scripts = _registered.get(client)
        if scripts is None:
            scripts = {n: client.register_script(body) for n, body in SOURCES.items()}
            _registered[client] = scripts
        return scripts[name]
