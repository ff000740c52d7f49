"""Naming rules that several layers apply: one definition each.

A Kubernetes name, a platform, a loopback host and a context-store URL are each decided here and
nowhere else, so the config check, the registries, the kaniko manifest and the stores
can never disagree about them.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Literal
from urllib.parse import urlsplit

#: The label every image carries (and the Kubernetes label/annotation key on Jobs), so
#: an image or a Job can be traced to the source hash it was built from.
HASH_LABEL = "buildq.source-hash"

#: RFC 1123 label: what Kubernetes accepts as a Job name or a namespace.
DNS_LABEL_RE = re.compile(r"^[a-z0-9](?:[-a-z0-9]*[a-z0-9])?$")
#: Kubernetes' limit on a DNS label.
MAX_DNS_LABEL = 63


#: One target platform, ``os/arch[/variant]`` (``linux/amd64``, ``linux/arm64/v8``).
PLATFORM_RE = re.compile(r"^[a-z0-9]+/[a-z0-9_]+(?:/[a-z0-9]+)?$")


def is_platform(value: str) -> bool:
    return bool(PLATFORM_RE.match(value))


def is_dns_label(name: str) -> bool:
    return len(name) <= MAX_DNS_LABEL and bool(DNS_LABEL_RE.match(name))


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (a name or address, with or without ``:port`` or ``[v6]``) is loopback.

    Only ``localhost`` and literal loopback addresses count; other names are never
    resolved, so ``127.evil.example`` is not loopback.
    """
    text = host.strip()
    if "://" in text:
        text = urlsplit(text).netloc
    name = urlsplit(f"//{text}").hostname if text.count(":") <= 1 or text.startswith("[") else text
    if not name:
        return False
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


#: The kinds of context store a URL can name.
StoreKind = Literal["s3", "gs", "azure", "file"]
#: What each kind of store URL looks like, for messages.
STORE_EXAMPLES: dict[StoreKind, str] = {
    "s3": "s3://<bucket>/<path>",
    "gs": "gs://<bucket>/<path>",
    "azure": "https://<storage-account>.blob.core.windows.net/<container>",
    "file": "file:///<absolute/path>",
}
#: Host suffix of Azure Blob Storage accounts in Azure's public cloud.
AZURE_BLOB_SUFFIX = ".blob.core.windows.net"
#: Blob host suffixes of every Azure cloud kaniko reads a context from: public, China,
#: US Government and Germany (kaniko's own list; it reads no other https:// host as Blob).
AZURE_BLOB_SUFFIXES = (AZURE_BLOB_SUFFIX, ".blob.core.chinacloudapi.cn",
                       ".blob.core.usgovcloudapi.net", ".blob.core.cloudapi.de")
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")
_AZURE_ACCOUNT_RE = re.compile(
    rf"^([a-z0-9]{{3,24}})(?:{'|'.join(map(re.escape, AZURE_BLOB_SUFFIXES))})$")
_AZURE_CONTAINER_RE = re.compile(r"^[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9])){2,62}$")


def classify_store_url(url: str) -> tuple[StoreKind | None, str | None]:
    """The kind of context store ``url`` names (None: not a store URL) and, when the URL
    is of a known kind but malformed, what was expected instead."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    bucket_kind: StoreKind | None = "s3" if scheme == "s3" else "gs" if scheme == "gs" else None
    if bucket_kind is not None:
        if not _BUCKET_RE.match(parts.netloc):
            return bucket_kind, f"a bucket name after {scheme}:// ({STORE_EXAMPLES[bucket_kind]})"
        return bucket_kind, None
    if scheme == "https" and parts.netloc.endswith(AZURE_BLOB_SUFFIXES):
        container = parts.path.strip("/").split("/")[0]
        if not _AZURE_ACCOUNT_RE.match(parts.netloc):
            return "azure", "a storage account of 3-24 lowercase letters and digits"
        if not _AZURE_CONTAINER_RE.match(container):
            return "azure", f"a container after the account ({STORE_EXAMPLES['azure']})"
        return "azure", None
    if scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            return "file", "an absolute path: file:///<absolute/path>"
        return "file", None
    return None, None
