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


#: Operating systems and architectures an image index may name (Go's GOOS and GOARCH,
#: which the OCI image spec uses), and the variants each architecture has.
PLATFORM_OSES = frozenset({"aix", "android", "darwin", "dragonfly", "freebsd", "illumos",
                           "ios", "js", "linux", "netbsd", "openbsd", "plan9", "solaris",
                           "wasip1", "windows"})
PLATFORM_VARIANTS: dict[str, frozenset[str]] = {
    "386": frozenset(), "amd64": frozenset({"v1", "v2", "v3", "v4"}),
    "arm": frozenset({"v5", "v6", "v7", "v8"}), "arm64": frozenset({"v8", "v9"}),
    "loong64": frozenset(), "mips": frozenset(), "mipsle": frozenset(), "mips64": frozenset(),
    "mips64le": frozenset(), "ppc64": frozenset(), "ppc64le": frozenset(),
    "riscv64": frozenset(), "s390x": frozenset(), "wasm": frozenset(),
}
#: Spellings of one platform that name the same images (containerd's normalization):
#: the default variant of an architecture may be left out.
_DEFAULT_VARIANT = {"arm64": "v8", "arm": "v7", "amd64": "v1"}
#: Architectures whose usual spelling has no variant (linux/arm64, not linux/arm64/v8).
_BARE = frozenset({"arm64", "amd64"})

#: The accepted forms, for every message refusing a platform.
PLATFORM_FORMS = ("Write each platform os/arch[/variant] (linux/amd64, linux/arm64, "
                  "linux/arm/v7); several as a comma-separated list (--platform "
                  "linux/amd64,linux/arm64) or a YAML list under builder.platform, each once.")


def platform_key(platform: str) -> str:
    """One spelling per platform: ``linux/arm64/v8`` is ``linux/arm64``, ``linux/arm`` is
    ``linux/arm/v7``."""
    os_name, _, rest = platform.partition("/")
    arch, _, variant = rest.partition("/")
    variant = variant or _DEFAULT_VARIANT.get(arch, "")
    if arch in _BARE and variant == _DEFAULT_VARIANT[arch]:
        variant = ""
    return f"{os_name}/{arch}/{variant}" if variant else f"{os_name}/{arch}"


def platform_fields(platform: str) -> dict[str, str]:
    """The ``platform`` object of an image index entry for ``os/arch[/variant]``."""
    os_name, _, rest = platform.partition("/")
    arch, _, variant = rest.partition("/")
    fields = {"architecture": arch, "os": os_name}
    if variant:
        fields["variant"] = variant
    return fields


def platform_problem(value: str) -> str | None:
    """Why ``value`` is not one platform buildq knows, or None when it is."""
    if not is_platform(value):
        return "is not written os/arch[/variant]"
    os_name, _, rest = value.partition("/")
    arch, _, variant = rest.partition("/")
    if os_name not in PLATFORM_OSES:
        return f"names an unknown operating system {os_name!r}"
    if arch not in PLATFORM_VARIANTS:
        return f"names an unknown architecture {arch!r}"
    if variant and variant not in PLATFORM_VARIANTS[arch]:
        known = ", ".join(sorted(PLATFORM_VARIANTS[arch])) or "none"
        return f"names an unknown variant {variant!r} of {arch} (known: {known})"
    return None


def split_platforms(value: object) -> tuple[list[str], str | None]:
    """The platforms ``value`` names — one string, a comma-separated string or a list of
    strings — in the order given, and why it is refused (None when it is not)."""
    if isinstance(value, str):
        items: list[object] = [part.strip() for part in value.split(",")]
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        return [], f"is a {type(value).__name__}, not a platform or a list of platforms"
    if not items:
        return [], "is an empty list"
    found: list[str] = []
    seen: dict[str, str] = {}
    for item in items:
        if not isinstance(item, str) or not item.strip():
            return [], f"holds {item!r}, which is not a platform"
        item = item.strip()
        problem = platform_problem(item)
        if problem is not None:
            return [], f"holds {item[:80]!r}, which {problem}"
        key = platform_key(item)
        if key in seen:
            same = "" if seen[key] == item else f" ({seen[key]} and {item} are one platform)"
            return [], f"names {item} twice{same}"
        seen[key] = item
        found.append(item)
    return found, None


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
