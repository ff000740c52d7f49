"""Every Redis key buildq writes, and nothing else: the one table of names.

Two processes agree on a build only through these names (a worker's lock and
another's takeover, a CLI's ``status`` and a worker's record), so they are spelled
once, here. The Lua scripts get their keys as ``KEYS[...]`` from callers that take
them from this module.
"""

from __future__ import annotations

#: Prefix of every key buildq writes.
PREFIX = "buildq"

# --- the per-source-hash lock (tasks/lock.py) ---------------------------------------------
#: Set of source hashes that have pending requests (scanned by the watchdog).
PENDING_INDEX = f"{PREFIX}:pending"
#: Sorted set of source hashes by the time their last record was written.
HISTORY = f"{PREFIX}:history"
#: Sorted set of request ids whose record is stored by request (never hashed: refused
#: input, cancelled before the hash), by the time it was written.
REQUEST_HISTORY = f"{PREFIX}:history:requests"


def lock_key(source_hash: str) -> str:
    """String: the holder's token, with the lease as its expiry."""
    return f"{PREFIX}:lock:{source_hash}"


def pending_key(source_hash: str) -> str:
    """Hash: request id → request state, of the requests a hash's build will answer."""
    return f"{PREFIX}:pending:{source_hash}"


def record_key(source_hash: str) -> str:
    """String: the JSON record of the hash's last build."""
    return f"{PREFIX}:record:{source_hash}"


def builds_key(source_hash: str) -> str:
    """Hash: attempt id → token, one entry per build run for the hash's pending requests;
    the record counts them, so a second build (a lease lost mid-build) is reported."""
    return f"{PREFIX}:builds:{source_hash}"


def counted_builds_key(source_hash: str) -> str:
    """Hash: the build notes a record counted, kept a while after the release so that a
    build ending late can tell whether it was counted (see tasks/build.lua)."""
    return f"{PREFIX}:builds:counted:{source_hash}"


def answering_key(source_hash: str) -> str:
    """String: the attempt that wrote the hash's record and is answering its requests, so a
    duplicate of that chain (same token) neither writes a second record nor answers."""
    return f"{PREFIX}:answering:{source_hash}"


# --- requests before the lock (tasks/inflight.py) -----------------------------------------
#: Hash of request id → the request's state as it entered the chain.
INFLIGHT = f"{PREFIX}:inflight"


def lease_key(request_id: str) -> str:
    """String whose expiry is the in-flight request's lease."""
    return f"{PREFIX}:inflight:lease:{request_id}"


#: Hash: request id → the entry task's arguments, from sending until its first stage runs.
SUBMITTED = f"{PREFIX}:submitted"


def submitted_lease_key(request_id: str) -> str:
    """String whose expiry says a sent request should have reached a worker by now."""
    return f"{PREFIX}:submitted:lease:{request_id}"


# --- records by request (tasks/records.py) ------------------------------------------------
def request_record_key(request_id: str) -> str:
    """String: the record of a request that failed before its source had a hash."""
    return f"{PREFIX}:record:request:{request_id}"


def answered_key(request_id: str) -> str:
    """String: the attempt that answered the request. Set once (a restarted copy of a request
    that was alive after all finds it and stops); that attempt may repeat its answer after
    a lost reply, nobody else may."""
    return f"{PREFIX}:answered:{request_id}"


def cancel_key(request_id: str) -> str:
    """String: who cancelled the request and when (JSON); its chain stops when it sees it
    (tasks/cancelling.py)."""
    return f"{PREFIX}:cancel:{request_id}"


def request_hash_key(request_id: str) -> str:
    """String: the source hash a request was built (or attached) under."""
    return f"{PREFIX}:request:{request_id}"


# --- layer cache sources (tasks/records.py) -----------------------------------------------
def last_tag_key(repository: str) -> str:
    """String: the tag of the last image built (or found) in ``registry/repository``; the
    next docker-pool build of that repository imports its layer cache."""
    return f"{PREFIX}:last-tag:{repository}"


# --- progress streams (tasks/events.py) ---------------------------------------------------
def events_key(request_id: str) -> str:
    """Stream of a request's stage events."""
    return f"{PREFIX}:events:{request_id}"


def log_key(source_hash: str) -> str:
    """Stream of the build log lines of a source hash's build."""
    return f"{PREFIX}:log:{source_hash}"


# --- worker presence (tasks/presence.py) --------------------------------------------------
def presence_key(pool: str, hostname: str) -> str:
    """String that lives while a worker of ``pool`` runs; ``hostname="*"`` gives the pattern."""
    return f"{PREFIX}:pool:{pool}:{hostname}"
