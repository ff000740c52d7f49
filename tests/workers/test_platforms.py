"""What a docker-pool host advertises it can build: its engine's platform and its QEMU handlers."""

from __future__ import annotations

from pathlib import Path

from config.names import platform_key, split_platforms
from workers.platforms import buildable_platforms, can_build, engine_platforms


def _handler(directory: Path, name: str, interpreter: Path, enabled: bool = True,
             flags: str = "P") -> None:
    # The layout of /proc/sys/fs/binfmt_misc/<name>, as the kernel writes it.
    (directory / name).write_text(
        f"{'enabled' if enabled else 'disabled'}\ninterpreter {interpreter}\nflags: {flags}\n"
        "offset 0\nmagic 7f454c46\n")


def test_a_host_builds_its_own_platform_and_each_enabled_qemu_handler(tmp_path: Path) -> None:
    qemu = tmp_path / "qemu-aarch64-static"
    qemu.write_bytes(b"")
    _handler(tmp_path, "qemu-aarch64", qemu)
    _handler(tmp_path, "qemu-arm", qemu, enabled=False)
    _handler(tmp_path, "qemu-s390x", tmp_path / "no-such-interpreter")
    _handler(tmp_path, "python3.11", qemu)
    assert buildable_platforms("linux", "x86_64", tmp_path) == ["linux/amd64", "linux/arm64"]
    assert buildable_platforms("linux", "aarch64", tmp_path) == ["linux/arm64"]
    assert buildable_platforms("windows", "x86_64", tmp_path) == ["linux/arm64"]
    # Registered with F (tonistiigi/binfmt, or from inside a container): the kernel holds
    # the interpreter open, so its path need not exist where the worker looks.
    _handler(tmp_path, "qemu-riscv64", tmp_path / "elsewhere", flags="PF")
    assert buildable_platforms("linux", "x86_64", tmp_path) == [
        "linux/amd64", "linux/arm64", "linux/riscv64"]


def test_platform_spellings_of_one_platform_match() -> None:
    assert platform_key("linux/arm64/v8") == platform_key("linux/arm64") == "linux/arm64"
    assert platform_key("linux/arm") == "linux/arm/v7"
    assert can_build("linux/arm64/v8", ["linux/amd64", "linux/arm64"])
    assert not can_build("linux/arm/v6", ["linux/arm/v7"])


def test_several_platforms_are_split_in_order_and_each_checked() -> None:
    assert split_platforms(" linux/arm64 , linux/amd64") == (["linux/arm64", "linux/amd64"], None)
    assert split_platforms(["linux/arm/v7"]) == (["linux/arm/v7"], None)
    assert split_platforms("linux/arm/v9")[1] == \
        "holds 'linux/arm/v9', which names an unknown variant 'v9' of arm (known: v5, v6, v7, v8)"
    assert split_platforms("plan10/amd64")[1] == \
        "holds 'plan10/amd64', which names an unknown operating system 'plan10'"
    assert split_platforms({"os": "linux"})[1] == \
        "is a dict, not a platform or a list of platforms"


def test_this_hosts_engine_builds_arm64_and_armv7_through_qemu(docker_engine: str) -> None:
    # scripts/bootstrap --tests registers the handlers the multi-platform chain tests build with.
    found = engine_platforms()
    assert found[0] == "linux/amd64"
    assert {"linux/arm64", "linux/arm/v7"} <= set(found)
