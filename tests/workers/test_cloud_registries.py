"""ECR, Artifact Registry and ACR backends against real stand-ins.

- ECR: moto server answers the ECR API; a docker-registry whose htpasswd user is ``AWS``
  with moto's token receives the pushes. ECR's API and registry are one service; the
  stand-ins are two, so ``mirror_to_ecr`` copies a pushed manifest into moto (PutImage,
  same digest) the way ECR's registry records it for DescribeImages.
- Artifact Registry: ``GoogleStandIn`` (OAuth token endpoint + the registry's token
  service) in front of a token-auth docker-registry; google-auth really refreshes.
- ACR: ``tests/acr_standin.py`` (``/oauth2/exchange``, ``/oauth2/token``, a managed
  identity endpoint) in front of a token-auth docker-registry.

The cloud hosts are reached through ``Settings.registry_endpoints``.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import boto3
import docker
import pytest
import requests

from config.errors import RegistryError
from config.references import parse_destination
from config.settings import Settings
from tests import services
from tests.acr_standin import ACRStandIn, StandInCredential
from tests.conftest import (
    ACR_HOST,
    AWS_ENV,
    ECR_ACCOUNT,
    ECR_HOST,
    ECR_REGION,
    GAR_HOST,
    moto_ecr_password,
    moto_iam_user,
)
from workers.builders.docker import DockerBuilder
from workers.registries import ecr as ecr_module
from workers.registries import registry_for
from workers.registries.acr import REFRESH_TOKEN_USER, ACRRegistry
from workers.registries.ecr import ECRRegistry
from workers.registries.gar import ArtifactRegistry

ACCOUNT, REGION = ECR_ACCOUNT, ECR_REGION
REPO = Path(__file__).resolve().parents[2]


# -- helpers and stand-ins ----------------------------------------------------------------


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in AWS_ENV.items():
        monkeypatch.setenv(key, value)


def ecr_api(moto: services.StandIn, **keys: str) -> Any:
    return boto3.client("ecr", endpoint_url=moto.endpoint, region_name=REGION,
                        aws_access_key_id=keys.get("id", AWS_ENV["AWS_ACCESS_KEY_ID"]),
                        aws_secret_access_key=keys.get("secret", "dummy-secret"))


def mirror_to_ecr(moto: services.StandIn, registry: services.RegistryServer, repository: str,
                  tag: str, password: str) -> str:
    """Record a manifest pushed to the registry stand-in in moto's ECR, digest unchanged."""
    media = "application/vnd.docker.distribution.manifest.v2+json"
    r = requests.get(f"{registry.url}/v2/{repository}/manifests/{tag}", auth=("AWS", password),
                     headers={"Accept": media}, timeout=10)
    r.raise_for_status()
    digest = r.headers["Docker-Content-Digest"]
    ecr_api(moto).put_image(repositoryName=repository, imageManifest=r.text, imageTag=tag,
                            imageManifestMediaType=r.headers["Content-Type"], imageDigest=digest)
    return digest


def push_as(image: str, base_image: str, builder: DockerBuilder,
            auth: dict[str, str] | None) -> str:
    """Tag the local base image with a logical cloud name and push it through the builder."""
    name, _, tag = image.rpartition(":")
    client = docker.from_env()
    client.api.tag(base_image, name, tag)
    try:
        return builder.push(image, auth, lambda line: None)
    finally:
        client.api.remove_image(image)


@pytest.fixture
def ecr_settings(tmp_path: Path, moto_server: services.StandIn,
                 ecr_registry: services.RegistryServer) -> Settings:
    return Settings(workdir=tmp_path / "work", docker_config_dir=tmp_path / "docker",
                    ecr_endpoint_url=moto_server.endpoint,
                    registry_endpoints={ECR_HOST: ecr_registry.host})


def google_credentials(google: services.GoogleStandIn, expired_token: str | None = None) -> Any:
    from google.oauth2.credentials import Credentials

    expiry = None
    if expired_token:
        expiry = datetime.datetime.now(datetime.UTC).replace(tzinfo=None) - datetime.timedelta(
            minutes=1)
    return Credentials(token=expired_token, expiry=expiry, refresh_token=google.refresh_token,
                       token_uri=f"{google.url}/token", client_id="standin-client",
                       client_secret="standin-client-secret")


# -- dispatch ------------------------------------------------------------------------------


def test_registry_for_picks_the_backend_by_host(tmp_path: Path) -> None:
    settings = Settings(workdir=tmp_path)
    cases = {f"{ECR_HOST}/team/app": ECRRegistry, f"{GAR_HOST}/proj/repo/img": ArtifactRegistry,
             f"https://{ACR_HOST}/team/app": ACRRegistry}
    for text, backend in cases.items():
        chosen = registry_for(parse_destination(text), settings)
        assert type(chosen) is backend
        assert chosen.host == text.removeprefix("https://").split("/")[0]


def test_registry_endpoints_send_requests_elsewhere_but_keep_the_name(tmp_path: Path) -> None:
    settings = Settings(workdir=tmp_path, registry_endpoints={ACR_HOST: "127.0.0.1:5999"})
    chosen = registry_for(parse_destination(f"{ACR_HOST}/team/app"), settings)
    assert chosen.host == ACR_HOST
    assert chosen.base_url == "http://127.0.0.1:5999"


# -- ECR -----------------------------------------------------------------------------------


def test_ecr_login_is_aws_with_the_authorization_token(
        aws_env: None, ecr_settings: Settings, moto_server: services.StandIn) -> None:
    ecr = ECRRegistry(ECR_HOST, ecr_settings)
    assert ecr.credentials() == ("AWS", moto_ecr_password(moto_server))
    assert ecr.push_auth() == {"username": "AWS", "password": moto_ecr_password(moto_server)}
    ecr.ping()  # the htpasswd registry takes that login
    assert "…UMMY" in ecr.identity() and "dummy-secret" not in ecr.identity()


def test_ecr_token_is_reused_until_shortly_before_it_expires(
        aws_env: None, ecr_settings: Settings) -> None:
    ecr_module._logins[(ACCOUNT, REGION, ecr_settings.ecr_endpoint_url or "")] = \
        ecr_module._Login("cached-password", renew_at=9e18)
    assert ECRRegistry(ECR_HOST, ecr_settings).credentials() == ("AWS", "cached-password")
    # moto's tokens say they expired in 2015: each new backend asks again.
    ecr_module._logins.clear()
    fresh = ECRRegistry(ECR_HOST, ecr_settings).credentials()[1]
    assert fresh != "cached-password"
    assert ECRRegistry(ECR_HOST, ecr_settings).credentials()[1] == fresh


def test_ecr_missing_tag_is_none_and_missing_repository_is_a_clear_error(
        aws_env: None, ecr_settings: Settings, moto_server: services.StandIn) -> None:
    repo = f"team/missing-{uuid.uuid4().hex[:6]}"
    ref = parse_destination(f"{ECR_HOST}/{repo}")
    with pytest.raises(RegistryError) as caught:
        ECRRegistry(ECR_HOST, ecr_settings).manifest_digest(ref, "v1")
    assert f"ECR repository {repo} does not exist" in caught.value.message
    assert "BUILDQ_CREATE_REPOSITORIES" in (caught.value.hint or "")

    created = replace(ecr_settings, create_repositories=True)
    assert ECRRegistry(ECR_HOST, created).manifest_digest(ref, "v1") is None
    names = [r["repositoryName"] for r in ecr_api(moto_server).describe_repositories()["repositories"]]
    assert repo in names
    # Now it exists: a missing tag is simply "no".
    assert ECRRegistry(ECR_HOST, ecr_settings).manifest_digest(ref, "v1") is None


def test_ecr_digest_comes_from_describe_images_after_a_push(
        aws_env: None, ecr_settings: Settings, moto_server: services.StandIn,
        ecr_registry: services.RegistryServer, base_image: str) -> None:
    repo = f"team/pushed-{uuid.uuid4().hex[:6]}"
    ecr_api(moto_server).create_repository(repositoryName=repo)
    ecr = ECRRegistry(ECR_HOST, ecr_settings)
    builder = DockerBuilder(endpoints=ecr_settings.registry_endpoints)
    image = f"{ECR_HOST}/{repo}:v1"
    pushed = push_as(image, base_image, builder, ecr.push_auth())
    digest = mirror_to_ecr(moto_server, ecr_registry, repo, "v1", ecr.credentials()[1])
    assert pushed == digest
    assert ecr.manifest_digest(parse_destination(f"{ECR_HOST}/{repo}"), "v1") == pushed
    ecr.check_push(parse_destination(f"{ECR_HOST}/{repo}"))
    # The logical name never became a local alias left behind.
    assert not any(ecr_registry.host in t for i in docker.from_env().images.list()
                   for t in i.tags)


def test_ecr_access_denied_names_the_missing_action(
        moto_with_iam: services.StandIn, moto_iam_admin: dict[str, str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    key = moto_iam_user(moto_with_iam, moto_iam_admin, f"pusher-{uuid.uuid4().hex[:6]}",
                        ["ecr:GetAuthorizationToken", "ecr:CreateRepository"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["secret"])
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    repo = f"team/denied-{uuid.uuid4().hex[:6]}"
    ecr_api(moto_with_iam, **key).create_repository(repositoryName=repo)
    settings = Settings(workdir=tmp_path, ecr_endpoint_url=moto_with_iam.endpoint)
    ecr = ECRRegistry(ECR_HOST, settings)
    assert ecr.credentials()[0] == "AWS"
    with pytest.raises(RegistryError) as caught:
        ecr.manifest_digest(parse_destination(f"{ECR_HOST}/{repo}"), "v1")
    assert "ecr:DescribeImages" in caught.value.message
    assert "IAM policy" in (caught.value.hint or "")
    assert key["secret"] not in str(caught.value)


def test_ecr_chain_builds_then_skips_with_equal_digests(
        tmp_path: Path, moto_server: services.StandIn, ecr_registry: services.RegistryServer,
        base_image: str) -> None:
    """The whole chain on real workers: moto for ECR's API, docker-registry for its pushes."""
    from tests.tasks.conftest import make_cluster

    repo = f"team/chain-{uuid.uuid4().hex[:6]}"
    ecr_api(moto_server).create_repository(repositoryName=repo)
    launch = tmp_path / "launch-config.yaml"
    launch.write_text(f"environment:\n  type: aws\n  region: {REGION}\n"
                      f"builder:\n  type: docker\n  destination: {ECR_HOST}/{repo}\n")
    (tmp_path / "cluster").mkdir()
    cluster = make_cluster(tmp_path / "cluster", ecr_registry, lease=6)
    cluster.env.update(AWS_ENV)
    cluster.env.update({"BUILDQ_ECR_ENDPOINT_URL": moto_server.endpoint,
                        "BUILDQ_REGISTRY_ENDPOINTS": f"{ECR_HOST}={ecr_registry.host}",
                        "BUILDQ_CONFIG": str(launch)})
    app = tmp_path / "app"
    app.mkdir()
    (app / "Dockerfile").write_text(f"FROM {base_image}\nCOPY msg.txt /msg.txt\n")
    (app / "msg.txt").write_text(f"ecr {uuid.uuid4()}\n")
    try:
        cluster.start_worker("control")
        cluster.start_worker("docker")

        def build() -> dict[str, Any]:
            done = subprocess.run([sys.executable, "-m", "tasks.cli", "build", str(app), "--json"],
                                  env=cluster.env, cwd=REPO, capture_output=True, text=True,
                                  timeout=180)
            assert done.returncode == 0, done.stderr + done.stdout
            return dict(json.loads(done.stdout.strip().splitlines()[-1]))

        first = build()
        assert first["status"] == "built", first
        assert first["image"] == f"{ECR_HOST}/{repo}:{first['tag']}"
        mirrored = mirror_to_ecr(moto_server, ecr_registry, repo, first["tag"],
                                 moto_ecr_password(moto_server))
        assert mirrored == first["digest"]

        second = build()
        assert second["status"] == "skipped", second
        assert second["digest"] == first["digest"]
        assert second["image"] == first["image"]
    finally:
        cluster.stop_all()
        cluster.redis.stop()


# -- Artifact Registry ---------------------------------------------------------------------


def test_gar_refreshes_an_expired_token_before_the_check_and_the_push(
        tmp_path: Path, google: services.GoogleStandIn, gar_registry: services.RegistryServer,
        base_image: str) -> None:
    stale = "ya29.standin-expired"
    google.issued[stale] = 0.0  # the registry's token service refuses it
    creds = google_credentials(google, expired_token=stale)
    settings = Settings(workdir=tmp_path, registry_endpoints={GAR_HOST: gar_registry.host})
    dest = parse_destination(f"{GAR_HOST}/my-proj/images/team/app")
    refreshes = google.refreshes

    gar = ArtifactRegistry(GAR_HOST, settings, credentials=creds)
    assert gar.manifest_digest(dest, "v1") is None
    assert google.refreshes == refreshes + 1
    user, token = gar.credentials()
    assert user == "oauth2accesstoken" and token != stale and token == creds.token
    assert stale not in google.registry_logins

    pushed = push_as(dest.with_tag("v1"), base_image,
                     DockerBuilder(endpoints=settings.registry_endpoints), gar.push_auth())
    # A new backend (as the next task makes) reuses the still-valid token.
    again = ArtifactRegistry(GAR_HOST, settings, credentials=creds)
    assert again.manifest_digest(dest, "v1") == pushed
    assert google.refreshes == refreshes + 1
    again.check_push(dest)


def test_gar_uses_google_auth_default_from_a_service_account_key_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, google: services.GoogleStandIn,
        gar_registry: services.RegistryServer) -> None:
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS",
                       str(google.service_account_file(tmp_path / "key.json")))
    settings = Settings(workdir=tmp_path, registry_endpoints={GAR_HOST: gar_registry.host})
    dest = parse_destination(f"{GAR_HOST}/my-proj/images/app")
    gar = registry_for(dest, settings)
    assert gar.manifest_digest(dest, "absent") is None
    identity = gar.identity()
    assert "builder@my-proj.iam.gserviceaccount.com" in identity and "my-proj" in identity
    assert "PRIVATE KEY" not in identity


def test_gar_pull_only_identity_fails_the_push_probe_naming_upload_artifacts(
        tmp_path: Path, google: services.GoogleStandIn,
        gar_registry: services.RegistryServer) -> None:
    settings = Settings(workdir=tmp_path, registry_endpoints={GAR_HOST: gar_registry.host})
    dest = parse_destination(f"{GAR_HOST}/my-proj/images/readonly")
    google.allowed = {"pull"}
    try:
        gar = ArtifactRegistry(GAR_HOST, settings, credentials=google_credentials(google))
        assert gar.manifest_digest(dest, "v1") is None
        with pytest.raises(RegistryError) as caught:
            gar.check_push(dest)
        assert "artifactregistry.repositories.uploadArtifacts" in caught.value.message
    finally:
        google.allowed = {"pull", "push"}


# -- ACR -----------------------------------------------------------------------------------


def test_acr_exchanges_the_aad_token_and_pushes_as_the_null_user(
        tmp_path: Path, acr: ACRStandIn, acr_registry: services.RegistryServer,
        base_image: str) -> None:
    acr.roles["builder-oid"] = "AcrPush"
    credential = StandInCredential(acr, "builder-oid")
    settings = Settings(workdir=tmp_path, registry_endpoints={ACR_HOST: acr_registry.host})
    dest = parse_destination(f"https://{ACR_HOST}/team/nested/app")
    reg = ACRRegistry(dest.registry, settings, credential=credential)

    assert reg.manifest_digest(dest, "v1") is None
    user, refresh = reg.credentials()
    assert user == REFRESH_TOKEN_USER
    assert acr.exchanges == ["builder-oid"]
    pushed = push_as(dest.with_tag("v1"), base_image,
                     DockerBuilder(endpoints=settings.registry_endpoints), reg.push_auth())
    # The engine itself ran the bearer flow with the refresh token, asking to push.
    assert any(r["principal"] == "builder-oid" and "push" in r["scope"]
               for r in acr.token_requests)
    again = ACRRegistry(dest.registry, settings, credential=credential)
    assert again.manifest_digest(dest, "v1") == pushed
    assert credential.calls == 1  # the refresh token is cached, not re-exchanged
    again.check_push(dest)
    assert "builder-oid" in again.identity() and refresh not in again.identity()


def test_acr_pull_only_role_fails_the_push_probe_naming_acrpush(
        tmp_path: Path, acr: ACRStandIn, acr_registry: services.RegistryServer) -> None:
    acr.roles["reader-oid"] = "AcrPull"
    settings = Settings(workdir=tmp_path, registry_endpoints={ACR_HOST: acr_registry.host})
    dest = parse_destination(f"{ACR_HOST}/team/app")
    reg = ACRRegistry(ACR_HOST, settings, credential=StandInCredential(acr, "reader-oid"))
    assert reg.manifest_digest(dest, "nope") is None
    with pytest.raises(RegistryError) as caught:
        reg.check_push(dest)
    assert "AcrPush" in caught.value.message and "az role assignment" in (caught.value.hint or "")


def test_acr_identity_without_a_role_is_refused_at_the_exchange(
        tmp_path: Path, acr: ACRStandIn, acr_registry: services.RegistryServer) -> None:
    settings = Settings(workdir=tmp_path, registry_endpoints={ACR_HOST: acr_registry.host})
    reg = ACRRegistry(ACR_HOST, settings, credential=StandInCredential(acr, "stranger"))
    with pytest.raises(RegistryError) as caught:
        reg.manifest_digest(parse_destination(f"{ACR_HOST}/team/app"), "v1")
    assert "refused to exchange" in caught.value.message
    assert "AcrPush" in (caught.value.hint or "")


def test_acr_default_azure_credential_through_a_managed_identity_endpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, acr: ACRStandIn,
        acr_registry: services.RegistryServer) -> None:
    for name in ("AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_CLIENT_SECRET",
                 "AZURE_FEDERATED_TOKEN_FILE", "MSI_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("IDENTITY_ENDPOINT", acr.msi_endpoint)
    monkeypatch.setenv("IDENTITY_HEADER", acr.identity_header)
    acr.roles["managed-identity"] = "AcrPush"
    settings = Settings(workdir=tmp_path, registry_endpoints={ACR_HOST: acr_registry.host})
    dest = parse_destination(f"{ACR_HOST}/team/app")
    reg = registry_for(dest, settings)
    assert reg.manifest_digest(dest, "absent") is None
    assert "managed-identity" in acr.exchanges
