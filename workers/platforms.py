"""Which platforms this host's Docker Engine can build: its own, and those it emulates.

An engine builds its native platform, and any other whose binaries the kernel hands to
an emulator: a ``binfmt_misc`` handler (QEMU's, from Debian's ``qemu-user-static`` or
``tonistiigi/binfmt``) that is enabled and whose interpreter exists. A docker-pool worker
advertises what it finds here and consumes one queue per platform, so a build for a
platform reaches only a host that can run its ``RUN`` steps.
"""

from __future__ import annotations

from pathlib import Path

from config.names import platform_key

#: Where the kernel lists its binfmt_misc handlers.
BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")

#: The platforms each QEMU binfmt handler (by its registered name) runs binaries of.
QEMU_HANDLERS: dict[str, tuple[str, ...]] = {
    "qemu-x86_64": ("linux/amd64",),
    "qemu-i386": ("linux/386",),
    "qemu-aarch64": ("linux/arm64",),
    "qemu-arm": ("linux/arm/v7", "linux/arm/v6"),
    "qemu-ppc64le": ("linux/ppc64le",),
    "qemu-s390x": ("linux/s390x",),
    "qemu-riscv64": ("linux/riscv64",),
    "qemu-mips64el": ("linux/mips64le",),
    "qemu-loongarch64": ("linux/loong64",),
}

#: The engine's ``Architecture`` (``uname -m``) → its native platform.
MACHINES: dict[str, str] = {
    "x86_64": "linux/amd64",
    "amd64": "linux/amd64",
    "aarch64": "linux/arm64",
    "arm64": "linux/arm64",
    "armv7l": "linux/arm/v7",
    "armv6l": "linux/arm/v6",
    "i686": "linux/386",
    "i386": "linux/386",
    "ppc64le": "linux/ppc64le",
    "s390x": "linux/s390x",
    "riscv64": "linux/riscv64",
}


def native_platform(os_type: str, machine: str) -> str | None:
    """The platform an engine reporting ``OSType`` and ``Architecture`` runs natively."""
    if os_type != "linux":
        return None
    return MACHINES.get(machine)


def emulated_platforms(binfmt_dir: Path = BINFMT_DIR) -> list[str]:
    """Platforms an enabled QEMU binfmt handler runs: one whose interpreter the kernel
    holds open (flag ``F``, so containers need no copy of it), or that exists here."""
    found: list[str] = []
    for name, platforms in QEMU_HANDLERS.items():
        try:
            lines = (binfmt_dir / name).read_text().splitlines()
        except OSError:
            continue
        if not lines or lines[0].strip() != "enabled":
            continue
        fields = dict(line.partition(" ")[::2] for line in lines[1:])
        interpreter = fields.get("interpreter", "").strip()
        if "F" in fields.get("flags:", "") or (interpreter and Path(interpreter).exists()):
            found += platforms
    return found


def buildable_platforms(os_type: str, machine: str,
                        binfmt_dir: Path = BINFMT_DIR) -> list[str]:
    """Every platform an engine on this host can build, native first, each once (as
    :func:`config.names.platform_key` spells it)."""
    native = native_platform(os_type, machine)
    keys: list[str] = []
    for platform in ([native] if native else []) + emulated_platforms(binfmt_dir):
        key = platform_key(platform)
        if key not in keys:
            keys.append(key)
    return keys


def engine_platforms(base_url: str | None = None) -> list[str]:
    """What the Docker Engine at ``base_url`` (default: the environment's) can build."""
    import docker

    client = docker.from_env() if base_url is None else docker.DockerClient(base_url=base_url)
    try:
        info = client.info()
    finally:
        client.close()
    return buildable_platforms(str(info.get("OSType") or ""), str(info.get("Architecture") or ""))


def can_build(platform: str, platforms: list[str]) -> bool:
    """Whether ``platform`` is one of ``platforms`` (spelt either way)."""
    return platform_key(platform) in {platform_key(p) for p in platforms}
