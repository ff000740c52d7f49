"""Kaniko builds as Kubernetes Jobs.

:mod:`.manifest` renders a :class:`KanikoRequest` as a batch/v1 Job and talks to no
one; :mod:`.follower` watches a created Job to its verdict; :mod:`.dispatcher` ties
them together. Imports run manifest ← follower ← dispatcher, never back.
"""

from workers.builders.kaniko.dispatcher import KanikoDispatcher
from workers.builders.kaniko.follower import KanikoCancelledError
from workers.builders.kaniko.manifest import (
    DEFAULT_KANIKO_IMAGE,
    KanikoRequest,
    cache_repo,
    deep_merge,
    default_args,
    job_name,
    kaniko_context,
    merge_args,
    reached_as,
    render_job,
    resolve_namespace,
    resolve_service_account,
)

__all__ = [
    "DEFAULT_KANIKO_IMAGE",
    "KanikoCancelledError",
    "KanikoDispatcher",
    "KanikoRequest",
    "cache_repo",
    "deep_merge",
    "default_args",
    "job_name",
    "kaniko_context",
    "merge_args",
    "reached_as",
    "render_job",
    "resolve_namespace",
    "resolve_service_account",
]
