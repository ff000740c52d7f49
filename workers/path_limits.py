"""Limits on the paths inside a source, shared by the context walk and archive unpacking.

A module of its own, importing nothing: the source hash runs in short-lived processes
where importing ``workers.sources`` (settings, pydantic) cost more than a tenth of the hash.
"""

from __future__ import annotations

#: Deepest directory nesting a source may have; real projects stay far below it, and
#: deeper trees overflow recursive walks and PATH_MAX on the build host.
MAX_PATH_DEPTH = 256
#: Longest file name (one path component) Linux file systems accept.
MAX_COMPONENT_BYTES = 255
#: Longest path inside a source; leaves room under PATH_MAX (4096) for the workdir.
MAX_PATH_BYTES = 3072
