"""The pins in tests/kube/go.mod follow the staging-replace recipe. Pure parsing: no Go runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.kube import build


def test_go_mod_pins_one_release_and_its_staging_modules() -> None:
    pins = build.read_pins()
    assert re.fullmatch(r"v1\.3[4-7]\.\d+", pins.kubernetes)
    assert pins.etcd.startswith("v3.")
    minor_patch = pins.kubernetes.removeprefix("v1.")
    staging = {m: v for m, v in pins.replaces.items() if m.startswith("k8s.io/")}
    assert {"k8s.io/api", "k8s.io/apiserver", "k8s.io/client-go", "k8s.io/kubectl"} <= set(staging)
    assert set(staging.values()) == {f"v0.{minor_patch}"}


def test_every_binary_is_a_tool_of_the_module() -> None:
    text = (build.MODULE_DIR / "go.mod").read_text()
    tools = set(re.search(r"^tool \(\n(.*?)^\)", text, re.M | re.S).group(1).split())  # type: ignore[union-attr]
    assert tools == {b.package for b in build.BINARIES}


def test_a_staging_module_at_another_release_is_refused(tmp_path: Path) -> None:
    gomod = tmp_path / "go.mod"
    gomod.write_text("module x\n\ngo 1.26.0\n\nrequire (\n\tk8s.io/kubernetes v1.37.2\n"
                     "\tgo.etcd.io/etcd/server/v3 v3.7.0\n)\n\nreplace (\n"
                     "\tk8s.io/api => k8s.io/api v0.37.2\n"
                     "\tk8s.io/client-go => k8s.io/client-go v0.36.6\n)\n")
    with pytest.raises(build.BuildError, match=re.escape("k8s.io/client-go with v0.36.6, want v0.37.2")):
        build.read_pins(gomod)


def test_version_stamped_into_kubernetes_binaries_only() -> None:
    pins = build.read_pins()
    apiserver, etcd = build.BINARIES[0], build.BINARIES[-1]
    assert f"-X=k8s.io/component-base/version.gitVersion={pins.kubernetes}" in build.ldflags(apiserver, pins)
    assert not any(f.startswith("-X") for f in build.ldflags(etcd, pins))


def test_kaniko_is_a_go_module_of_its_own_pinning_one_release() -> None:
    from tests.kube import kaniko

    text = (kaniko.MODULE_DIR / "go.mod").read_text()
    assert re.fullmatch(r"v1\.\d+\.\d+", kaniko.kaniko_version())
    assert re.search(rf"^tool {re.escape(kaniko.EXECUTOR_PACKAGE)}$", text, re.M)
    # Its own module, so kaniko's dependency versions never meet Kubernetes' in one build list.
    assert re.search(r"^module buildq\.local/tests/kube/kaniko$", text, re.M)
    assert kaniko.KANIKO_MODULE not in (build.MODULE_DIR / "go.mod").read_text()
    assert f"-X={kaniko.KANIKO_MODULE}/pkg/version.version={kaniko.kaniko_version()}" in kaniko.ldflags(
        kaniko.kaniko_version())
