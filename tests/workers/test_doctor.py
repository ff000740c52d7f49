"""``buildq doctor`` against the real stand-ins: every check runs for real.

All PASS for ECR (moto + htpasswd registry), Artifact Registry (Google token endpoint +
token registry) and ACR (exchange stand-in + token registry, managed identity endpoint);
then one thing broken at a time — a registry identity that may only pull, a store that
refuses writes, no Docker Engine, a service account without ``create jobs.batch`` — and
the matching row FAILs naming the permission. The CLI's exit codes are checked on the
installed command path (``python -m tasks.cli doctor``).
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Collection, Iterator
from dataclasses import replace
from pathlib import Path

import boto3
import pytest

from config.settings import Settings
from tasks.cli.doctor import Check, Doctor, failed, render
from tests import services
from tests.acr_standin import ACRStandIn
from tests.conftest import (
    ACR_HOST,
    AWS_ENV,
    ECR_HOST,
    ECR_REGION,
    GAR_HOST,
    moto_iam_user,
)

REPO = Path(__file__).resolve().parents[2]


def role_rules(path: Path) -> set[tuple[str, str, str]]:
    """(verb, group, resource) of every permission a Role manifest grants, rules expanded."""
    import yaml

    role = yaml.safe_load(path.read_text())
    return {(verb, group, resource) for rule in role["rules"] for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


def rows(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


def write_config(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.fixture
def base_settings(tmp_path: Path) -> Settings:
    return Settings(workdir=tmp_path / "work", docker_config_dir=tmp_path / "docker",
                    context_store=(tmp_path / "contexts").as_uri())


@pytest.fixture
def acr_env(monkeypatch: pytest.MonkeyPatch, acr: ACRStandIn) -> None:
    for name in ("AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_CLIENT_SECRET",
                 "AZURE_FEDERATED_TOKEN_FILE", "MSI_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("IDENTITY_ENDPOINT", acr.msi_endpoint)
    monkeypatch.setenv("IDENTITY_HEADER", acr.identity_header)


@pytest.fixture
def acr_role(acr: ACRStandIn) -> Iterator[ACRStandIn]:
    """The managed identity's role on the stand-in registry; AcrPush unless a test lowers it."""
    acr.roles["managed-identity"] = "AcrPush"
    yield acr
    acr.roles["managed-identity"] = "AcrPush"


# -- all PASS --------------------------------------------------------------------------------


def test_ecr_all_pass(tmp_path: Path, base_settings: Settings, monkeypatch: pytest.MonkeyPatch,
                      moto_server: services.StandIn, ecr_registry: services.RegistryServer,
                      docker_engine: str) -> None:
    for key, value in AWS_ENV.items():
        monkeypatch.setenv(key, value)
    repo = f"team/doctor-{uuid.uuid4().hex[:6]}"
    boto3.client("ecr", endpoint_url=moto_server.endpoint, region_name=ECR_REGION) \
        .create_repository(repositoryName=repo)
    config = write_config(tmp_path / "launch.yaml", f"environment:\n  type: aws\n  region: "
                          f"{ECR_REGION}\nbuilder:\n  type: docker\n  destination: {ECR_HOST}/{repo}\n")
    settings = replace(base_settings, ecr_endpoint_url=moto_server.endpoint,
                       registry_endpoints={ECR_HOST: ecr_registry.host})
    checks = Doctor(settings, config).run()
    assert [c.status for c in checks] == ["PASS"] * 7, checks
    found = rows(checks)
    assert "…UMMY" in found["registry credentials"].detail
    assert "dummy-secret" not in str(checks)
    assert "ecr:DescribeImages" in found["tag check"].detail
    assert f"via {ecr_registry.host}" in found["registry login"].detail


def test_gar_all_pass(tmp_path: Path, base_settings: Settings, monkeypatch: pytest.MonkeyPatch,
                      google: services.GoogleStandIn, gar_registry: services.RegistryServer,
                      docker_engine: str) -> None:
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS",
                       str(google.service_account_file(tmp_path / "key.json")))
    config = write_config(tmp_path / "launch.yaml", "environment:\n  type: gcp\n  region: "
                          "us-central1\n  project: my-proj\nbuilder:\n  type: docker\n"
                          f"  destination: {GAR_HOST}/my-proj/images/app\n")
    settings = replace(base_settings, registry_endpoints={GAR_HOST: gar_registry.host})
    checks = Doctor(settings, config).run()
    assert [c.status for c in checks] == ["PASS"] * 7, checks
    assert "builder@my-proj.iam.gserviceaccount.com" in rows(checks)["registry credentials"].detail
    assert "PRIVATE KEY" not in str(checks)


def test_acr_all_pass_through_the_cli_exits_zero(
        tmp_path: Path, acr_env: None, acr_role: ACRStandIn,
        acr_registry: services.RegistryServer, docker_engine: str) -> None:
    config = write_config(tmp_path / "launch.yaml", "environment:\n  type: azure\nbuilder:\n"
                          f"  type: docker\n  destination: https://{ACR_HOST}/team/app\n")
    env = {**os.environ, "BUILDQ_REGISTRY_ENDPOINTS": f"{ACR_HOST}={acr_registry.host}",
           "BUILDQ_CONTEXT_STORE": (tmp_path / "contexts").as_uri(), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "tasks.cli", "doctor", "--config", config],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 7 and all(line.startswith("PASS") for line in lines), done.stdout
    assert "managed-identity" in done.stdout
    assert "\x1b[" not in done.stdout  # plain text when not on a terminal


# -- one thing broken at a time ------------------------------------------------------------


def test_registry_identity_that_may_only_pull_fails_the_push_row_naming_acrpush(
        tmp_path: Path, base_settings: Settings, acr_env: None, acr_role: ACRStandIn,
        acr_registry: services.RegistryServer, docker_engine: str) -> None:
    acr_role.roles["managed-identity"] = "AcrPull"
    config = write_config(tmp_path / "launch.yaml", "environment:\n  type: azure\nbuilder:\n"
                          f"  type: docker\n  destination: {ACR_HOST}/team/app\n")
    env = {**os.environ, "BUILDQ_REGISTRY_ENDPOINTS": f"{ACR_HOST}={acr_registry.host}",
           "BUILDQ_CONTEXT_STORE": (tmp_path / "contexts").as_uri(), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "tasks.cli", "doctor", "--config", config],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    push = [line for line in done.stdout.splitlines() if "push permitted" in line]
    assert push and push[0].startswith("FAIL") and "AcrPush" in push[0], done.stdout
    assert "fix: needs AcrPush" in done.stdout
    tag = [line for line in done.stdout.splitlines() if "tag check" in line]
    assert tag[0].startswith("PASS")


def test_gar_pull_only_fails_the_push_row_naming_upload_artifacts(
        tmp_path: Path, base_settings: Settings, monkeypatch: pytest.MonkeyPatch,
        google: services.GoogleStandIn, gar_registry: services.RegistryServer,
        docker_engine: str) -> None:
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS",
                       str(google.service_account_file(tmp_path / "key.json")))
    config = write_config(tmp_path / "launch.yaml", "builder:\n  type: docker\n"
                          f"  destination: {GAR_HOST}/my-proj/images/app\n")
    google.allowed = {"pull"}
    try:
        checks = Doctor(replace(base_settings, registry_endpoints={GAR_HOST: gar_registry.host}),
                        config).run()
    finally:
        google.allowed = {"pull", "push"}
    push = rows(checks)["push permitted"]
    assert push.status == "FAIL"
    assert "artifactregistry.repositories.uploadArtifacts" in push.fix
    assert failed(checks)


def test_store_that_refuses_writes_fails_naming_s3_putobject(
        tmp_path: Path, base_settings: Settings, monkeypatch: pytest.MonkeyPatch,
        moto_with_iam: services.StandIn, moto_iam_admin: dict[str, str],
        registry: services.RegistryServer, docker_engine: str) -> None:
    bucket = f"ctx-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=moto_with_iam.endpoint, region_name=ECR_REGION,
                 aws_access_key_id=moto_iam_admin["id"],
                 aws_secret_access_key=moto_iam_admin["secret"]).create_bucket(Bucket=bucket)
    reader = moto_iam_user(moto_with_iam, moto_iam_admin, f"reader-{bucket}",
                           ["s3:ListBucket", "s3:GetObject"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", reader["id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", reader["secret"])
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    config = write_config(tmp_path / "launch.yaml", "builder:\n  type: docker\n"
                          f"  destination: {registry.host}/team/app\n"
                          f"  build-context-store: s3://{bucket}/contexts\n")
    settings = replace(base_settings, s3_endpoint_url=moto_with_iam.endpoint)
    checks = Doctor(settings, config).run()
    store = rows(checks)["context store"]
    assert store.status == "FAIL", checks
    assert store.detail.startswith("write of a probe object")
    assert "needs s3:PutObject" in store.fix
    assert reader["secret"] not in str(checks)
    assert [c.name for c in checks if c.status == "FAIL"] == ["context store"]


def test_unreachable_docker_engine_fails_and_exits_one(
        tmp_path: Path, registry: services.RegistryServer) -> None:
    config = write_config(tmp_path / "launch.yaml", "builder:\n  type: docker\n"
                          f"  destination: {registry.host}/team/app\n")
    env = {**os.environ, "DOCKER_HOST": f"tcp://127.0.0.1:{services.free_port()}",
           "BUILDQ_CONTEXT_STORE": (tmp_path / "contexts").as_uri(), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "tasks.cli", "doctor", "--config", config],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    engine = [line for line in done.stdout.splitlines() if "Docker Engine" in line]
    assert engine[0].startswith("FAIL") and "Connection refused" in engine[0], done.stdout
    assert sum(line.startswith("PASS") for line in done.stdout.splitlines()) == 6


def test_invalid_config_fails_first_and_skips_what_needs_it(tmp_path: Path) -> None:
    config = write_config(tmp_path / "launch.yaml", "environment:\n  type: aws\n")
    env = {**os.environ, "BUILDQ_CONTEXT_STORE": (tmp_path / "contexts").as_uri(),
           "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "tasks.cli", "doctor", "--config", config],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    first = done.stdout.splitlines()[0]
    assert first.startswith("FAIL") and "environment.region" in first
    assert "SKIP  registry credentials" in done.stdout


class KubeAuthStandIn(services.HTTPStandIn):
    """The SelfSubjectAccessReview endpoint of a Kubernetes API server, with a fixed RBAC."""

    def __init__(self, allowed: set[tuple[str, str, str]],
                 service_accounts: Collection[tuple[str, str]] = ()) -> None:
        super().__init__()
        self.allowed = allowed
        #: (namespace, name) of the ServiceAccounts that exist, read only if "get" is allowed.
        self.service_accounts = service_accounts
        self.reviews: list[dict[str, str]] = []

    def route(self, method: str, path: str, headers: dict[str, str],
              body: bytes) -> tuple[int, dict[str, str], bytes]:
        account = re.fullmatch(r"/api/v1/namespaces/([^/]+)/serviceaccounts/([^/]+)", path)
        if method == "GET" and account:
            if ("get", "serviceaccounts", "") not in self.allowed:
                return self.json(403, {"kind": "Status", "code": 403})
            found = (account[1], account[2]) in self.service_accounts
            return self.json(200 if found else 404, {"kind": "ServiceAccount" if found else "Status"})
        if method != "POST" or path != "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews":
            return self.json(404, {"kind": "Status", "code": 404})
        review = json.loads(body)
        attrs = review["spec"]["resourceAttributes"]
        self.reviews.append(attrs)
        resource = attrs["resource"] + (f"/{attrs['subresource']}" if attrs.get("subresource") else "")
        ok = (attrs["verb"], resource, attrs.get("group", "")) in self.allowed
        review["status"] = {"allowed": ok}
        return self.json(201, review)


#: What deploy/kubernetes/role.yaml grants, as the review stand-in keys it: (verb, resource, group).
KANIKO_RBAC = {(verb, resource, group) for verb, group, resource
               in role_rules(REPO / "deploy" / "kubernetes" / "role.yaml")}


@pytest.mark.parametrize(("granted", "missing"), [
    (KANIKO_RBAC, None),
    (KANIKO_RBAC - {("create", "jobs", "batch")}, "create jobs.batch"),
    # The pool follows its pod by watching: a Role without it fails here, not mid-build.
    (KANIKO_RBAC - {("watch", "pods", "")}, "watch pods"),
    # The kaniko watchdog lists its Jobs to sweep abandoned ones.
    (KANIKO_RBAC - {("list", "jobs", "batch")}, "list jobs.batch"),
], ids=["role.yaml", "no-create-jobs", "no-watch-pods", "no-list-jobs"])
def test_kaniko_pool_rbac_via_self_subject_access_review(
        tmp_path: Path, base_settings: Settings, registry: services.RegistryServer,
        granted: set[tuple[str, str, str]], missing: str | None) -> None:
    from kubernetes import client

    api = KubeAuthStandIn(granted)
    try:
        config = write_config(tmp_path / "launch.yaml", "builder:\n  type: kaniko\n"
                              f"  destination: {registry.host}/team/app\n"
                              f"  build-context-store: {(tmp_path / 'ctx').as_uri()}\n"
                              "  kaniko-config:\n    metadata:\n      namespace: builds\n")
        configuration = client.Configuration()
        configuration.host = api.url
        checks = Doctor(base_settings, config, kube_client=client.ApiClient(configuration)).run()
    finally:
        api.stop()
    kube = rows(checks)["Kubernetes API"]
    assert {r["namespace"] for r in api.reviews} == {"builds"}
    # The doctor asks about exactly what the deployed Role grants: no more, no less.
    asked = {(r["verb"], r["resource"] + (f"/{r['subresource']}" if r.get("subresource") else ""),
              r.get("group", "")) for r in api.reviews}
    assert asked == KANIKO_RBAC
    if missing is None:
        assert kube.status == "PASS" and not failed(checks), checks
    else:
        assert kube.status == "FAIL"
        assert f"may not {missing} in namespace 'builds'" in kube.detail
        assert kube.fix.startswith(f"needs {missing}.") and "role.yaml" in kube.fix
        assert "Docker Engine" not in rows(checks)


@pytest.mark.parametrize(("exists", "readable", "status"), [
    (True, True, "PASS"), (False, True, "FAIL"), (False, False, "SKIP")],
    ids=["exists", "missing", "not-readable"])
def test_the_jobs_service_account_must_exist(
        tmp_path: Path, base_settings: Settings, registry: services.RegistryServer,
        exists: bool, readable: bool, status: str) -> None:
    from kubernetes import client

    granted = KANIKO_RBAC | ({("get", "serviceaccounts", "")} if readable else set())
    api = KubeAuthStandIn(granted, {("builds", "irsa-kaniko")} if exists else set())
    try:
        config = write_config(tmp_path / "launch.yaml", "builder:\n  type: kaniko\n"
                              f"  destination: {registry.host}/team/app\n"
                              f"  build-context-store: {(tmp_path / 'ctx').as_uri()}\n"
                              "  kaniko-config:\n    metadata:\n      namespace: builds\n"
                              "    spec:\n      template:\n        spec:\n"
                              "          serviceAccountName: irsa-kaniko\n")
        configuration = client.Configuration()
        configuration.host = api.url
        checks = Doctor(base_settings, config, kube_client=client.ApiClient(configuration)).run()
    finally:
        api.stop()
    row = rows(checks)["kaniko service account"]
    assert row.status == status, checks
    assert "'irsa-kaniko'" in row.detail
    if status == "FAIL":
        assert "does not exist in namespace 'builds'" in row.detail and "serviceAccountName" in row.fix


def test_the_pools_own_service_account_passes_without_asking(
        tmp_path: Path, base_settings: Settings, registry: services.RegistryServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """In its pod, with the Jobs in its namespace, the pool runs as the account they get."""
    import base64

    from kubernetes import client

    from workers import kube

    claims = base64.urlsafe_b64encode(b'{"sub": "system:serviceaccount:builds:buildq-kaniko"}')
    (tmp_path / "token").write_text(f"eyJhbGciOiJSUzI1NiJ9.{claims.decode().rstrip('=')}.c2ln")
    (tmp_path / "namespace").write_text("builds")
    monkeypatch.setattr(kube, "SERVICE_ACCOUNT_DIR", tmp_path)
    api = KubeAuthStandIn(KANIKO_RBAC)  # no get serviceaccounts: not needed
    try:
        config = write_config(tmp_path / "launch.yaml", "builder:\n  type: kaniko\n"
                              f"  destination: {registry.host}/team/app\n"
                              f"  build-context-store: {(tmp_path / 'ctx').as_uri()}\n")
        configuration = client.Configuration()
        configuration.host = api.url
        checks = Doctor(base_settings, config, kube_client=client.ApiClient(configuration)).run()
    finally:
        api.stop()
    row = rows(checks)["kaniko service account"]
    assert row.status == "PASS" and "own ServiceAccount 'buildq-kaniko'" in row.detail, checks


def test_table_on_a_terminal_and_plain_lines_otherwise() -> None:
    checks = [Check("config valid", "PASS", "x.yaml"),
              Check("push permitted", "FAIL", "denied [push]", "needs AcrPush. Grant it."),
              Check("builder", "SKIP", "noop")]
    plain = io.StringIO()
    render(checks, plain, tty=False)
    assert plain.getvalue().splitlines()[1].startswith("FAIL  push permitted  denied [push]")
    assert "fix: needs AcrPush" in plain.getvalue()
    table = io.StringIO()
    render(checks, table, tty=True)
    text = table.getvalue()
    assert "┃" in text or "│" in text
    assert "denied [push]" in text and "needs AcrPush" in text
