"""``buildq doctor``'s RBAC check on the real API server: the shipped Role, bound to a
ServiceAccount whose token is all the doctor holds, passes; the same Role missing any one
verb fails, naming it (the real SelfSubjectAccessReview, the real RBAC authorizer)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from config.settings import Settings
from tasks.cli.doctor import Check, Doctor
from tests import services
from tests.kube.cluster import REPO, ControlPlane, wait_for
from workers.kube import KANIKO_ACCESS, Access

pytestmark = pytest.mark.slow

ROLE = yaml.safe_load((REPO / "deploy" / "kubernetes" / "role.yaml").read_text())


def role_without(access: Access | None) -> dict[str, Any]:
    """deploy/kubernetes/role.yaml, less ``access`` (its verb dropped from the rule that grants it)."""
    role = copy.deepcopy(ROLE)
    if access is not None:
        for rule in role["rules"]:
            if access.group in rule["apiGroups"] and access.resource in rule["resources"]:
                rule["verbs"].remove(access.verb)
        role["rules"] = [rule for rule in role["rules"] if rule["verbs"]]
    return dict(role)


def allowed(api: Any, namespace: str, access: Access) -> bool:
    from kubernetes import client

    resource, _, sub = access.resource.partition("/")
    authorization: Any = client.AuthorizationV1Api(api)  # dicts in
    review = authorization.create_self_subject_access_review({
        "apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
        "spec": {"resourceAttributes": {"namespace": namespace, "verb": access.verb, "resource": resource,
                                        "group": access.group, "subresource": sub}}})
    return bool(review.status.allowed)


@pytest.fixture
def service_account_kubeconfig(kube: ControlPlane, kube_namespace: str, tmp_path: Path) -> Path:
    """A kubeconfig holding only the token of a new ServiceAccount ``buildq`` in the namespace."""
    from kubernetes import client

    admin = kube.api_client()
    core: Any = client.CoreV1Api(admin)
    core.create_namespaced_service_account(kube_namespace, {"metadata": {"name": "buildq"}})
    admin.close()
    return kube.token_kubeconfig(tmp_path / "buildq.kubeconfig", kube_namespace, "buildq")


@pytest.fixture
def service_account_client(service_account_kubeconfig: Path) -> Iterator[Any]:
    from kubernetes import config

    api = config.new_client_from_config(config_file=str(service_account_kubeconfig))
    yield api
    api.close()


def grant(kube: ControlPlane, namespace: str, api: Any, missing: Access | None) -> None:
    """role.yaml less ``missing``, bound to ``buildq``; back once the authorizer applies it."""
    from kubernetes import client

    admin = kube.api_client()
    rbac: Any = client.RbacAuthorizationV1Api(admin)
    rbac.create_namespaced_role(namespace, role_without(missing))
    rbac.create_namespaced_role_binding(namespace, {
        "metadata": {"name": "buildq-kaniko"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                    "name": ROLE["metadata"]["name"]},
        "subjects": [{"kind": "ServiceAccount", "name": "buildq", "namespace": namespace}]})
    admin.close()
    # The authorizer reads Roles through an informer: wait until it sees every rule granted.
    granted = [a for a in KANIKO_ACCESS if a != missing]
    wait_for(lambda: all(allowed(api, namespace, a) for a in granted), 60,
             "the RBAC authorizer seeing the Role")


def launch_config(path: Path, namespace: str, registry: services.RegistryServer) -> Path:
    path.write_text("builder:\n  type: kaniko\n"
                    f"  destination: {registry.host}/team/app\n"
                    f"  build-context-store: {(path.parent / 'ctx').as_uri()}\n"
                    f"  kaniko-config:\n    metadata:\n      namespace: {namespace}\n")
    return path


@pytest.mark.parametrize("missing", [None, *KANIKO_ACCESS], ids=lambda a: str(a or "role.yaml"))
def test_doctor_names_the_verb_the_role_lacks(kube: ControlPlane, kube_namespace: str,
                                              service_account_client: Any, tmp_path: Path,
                                              registry: services.RegistryServer,
                                              missing: Access | None) -> None:
    grant(kube, kube_namespace, service_account_client, missing)
    config = launch_config(tmp_path / "launch.yaml", kube_namespace, registry)
    settings = Settings(workdir=tmp_path / "work", docker_config_dir=tmp_path / "docker",
                        context_store=(tmp_path / "contexts").as_uri())

    checks: list[Check] = Doctor(settings, str(config), kube_client=service_account_client).run()

    check = next(c for c in checks if c.name == "Kubernetes API")
    if missing is None:
        assert check.status == "PASS", check
    else:
        assert check.status == "FAIL", check
        assert f"may not {missing} in namespace '{kube_namespace}'" in check.detail
        assert check.fix.startswith(f"needs {missing}.")


def test_buildq_doctor_with_only_the_accounts_kubeconfig_fails_naming_the_verb(
        kube: ControlPlane, kube_namespace: str, service_account_kubeconfig: Path,
        service_account_client: Any, tmp_path: Path, registry: services.RegistryServer) -> None:
    missing = next(a for a in KANIKO_ACCESS if a.verb == "watch" and a.resource == "pods")
    grant(kube, kube_namespace, service_account_client, missing)
    config = launch_config(tmp_path / "launch.yaml", kube_namespace, registry)
    env = {**os.environ, "KUBECONFIG": str(service_account_kubeconfig), "PYTHONPATH": str(REPO),
           "BUILDQ_CONTEXT_STORE": (tmp_path / "contexts").as_uri()}

    done = subprocess.run([sys.executable, "-m", "tasks.cli", "doctor", "--config", str(config)],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=120)

    assert done.returncode != 0, done.stdout + done.stderr
    [row] = [line for line in done.stdout.splitlines() if "Kubernetes API" in line]
    assert row.startswith("FAIL") and f"may not watch pods in namespace '{kube_namespace}'" in row, row
    assert "Traceback" not in done.stdout + done.stderr
