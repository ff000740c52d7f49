"""Registry logins that expire, on the ECR, Artifact Registry and ACR paths.

Each path gets a login service that issues a new credential per call, valid a few
seconds, in front of a token-auth docker-registry whose realm takes only unexpired ones
(tests/token_standin.py): ECR's GetAuthorizationToken password, Google's OAuth access
token, ACR's exchanged refresh token. The workers log in as in production: boto3's
default chain, google.auth.default() from a service-account key file, and
DefaultAzureCredential through a managed-identity endpoint.

Pinned: logins are reused while valid (a burst of checks costs one), renewed before they
expire rather than after the registry refuses one (the realm and the registry refuse
nothing), and a build that outlasts the login its worker held still pushes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from config.references import parse_destination
from config.settings import Settings
from tests import services
from tests.acr_standin import ACRStandIn, start_acr_registry
from tests.conftest import ACR_HOST, AWS_ENV, ECR_ACCOUNT, ECR_HOST, ECR_REGION, GAR_HOST
from tests.token_standin import (
    MANIFEST_TYPES,
    ECRStandIn,
    ExpiringGoogle,
    refused_tokens,
    start_ecr_registry,
)
from workers.registries import registry_for
from workers.registries.acr import ACRRegistry
from workers.registries.base import Registry
from workers.registries.ecr import ECRRegistry
from workers.registries.gar import ArtifactRegistry

REPO = Path(__file__).resolve().parents[2]
#: The object id ACR's stand-in gives the managed identity DefaultAzureCredential uses.
MANAGED_IDENTITY = "managed-identity"
AZURE_ENV_NAMES = ("AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_CLIENT_SECRET",
                   "AZURE_FEDERATED_TOKEN_FILE", "MSI_ENDPOINT", "AZURE_USERNAME", "AZURE_PASSWORD")


@dataclass
class LoginPath:
    """One cloud registry path: its login service, its registry, and how to reach both."""

    name: str
    host: str
    backend: type[Registry]
    registry: services.RegistryServer
    signer: services.TokenSigner
    #: Credentials the login service issued so far (the "token calls").
    logins: Callable[[], int]
    #: Logins its realm refused (expired or unknown).
    rejected: Callable[[], int]
    #: Registry tokens its realm issued for a valid login.
    realm_tokens: Callable[[], int]
    set_lifetimes: Callable[[float, int], None]
    new_repository: Callable[[], str]

    def digest(self, repository: str, tag: str) -> str | None:
        token = self.signer.registry_token("test", [f"repository:{repository}:pull"], {"pull"})
        answer = requests.head(f"{self.registry.url}/v2/{repository}/manifests/{tag}",
                               headers={"Authorization": f"Bearer {token}", "Accept": MANIFEST_TYPES},
                               timeout=10)
        return answer.headers.get("Docker-Content-Digest") if answer.status_code == 200 else None


@dataclass
class World:
    paths: dict[str, LoginPath]
    #: What a worker process needs to log in to all three (added to its environment).
    env: dict[str, str]
    settings: Settings


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("token-expiry")
    ecr = ECRStandIn(root, ECR_ACCOUNT, ECR_REGION)
    google = ExpiringGoogle(root)
    acr = ACRStandIn(root, ACR_HOST.split(".")[0])
    acr.roles[MANAGED_IDENTITY] = "AcrPush"
    registries = [start_ecr_registry(root / "ecr-registry", ecr),
                  services.start_gar_registry(root / "gar-registry", google),
                  start_acr_registry(root / "acr-registry", acr)]
    ecr_registry, gar_registry, acr_registry = registries

    def ecr_repository() -> str:
        name = f"team/app-{uuid.uuid4().hex[:8]}"
        ecr.repositories.add(name)
        return name

    def ecr_lifetimes(login: float, token: int) -> None:
        ecr.lifetime, ecr.token_lifetime = login, token

    def gar_lifetimes(login: float, token: int) -> None:
        google.lifetime, google.token_lifetime = int(login), token

    def acr_lifetimes(login: float, token: int) -> None:
        acr.refresh_lifetime, acr.token_lifetime = int(login), token

    paths = {
        "ecr": LoginPath("ecr", ECR_HOST, ECRRegistry, ecr_registry, ecr.signer,
                         lambda: ecr.token_calls, lambda: ecr.rejected, lambda: ecr.realm_logins,
                         ecr_lifetimes, ecr_repository),
        "gar": LoginPath("gar", GAR_HOST, ArtifactRegistry, gar_registry, google.signer,
                         lambda: google.refreshes, lambda: google.rejected,
                         lambda: len(google.registry_logins), gar_lifetimes,
                         lambda: f"my-proj/images/app-{uuid.uuid4().hex[:8]}"),
        "acr": LoginPath("acr", ACR_HOST, ACRRegistry, acr_registry, acr.signer,
                         lambda: len(acr.exchanges), lambda: acr.rejected,
                         lambda: len(acr.token_requests) - acr.rejected, acr_lifetimes,
                         lambda: f"team/app-{uuid.uuid4().hex[:8]}"),
    }
    endpoints = {ECR_HOST: ecr_registry.host, GAR_HOST: gar_registry.host, ACR_HOST: acr_registry.host}
    env = {
        **AWS_ENV,
        "AWS_DEFAULT_REGION": ECR_REGION,
        "BUILDQ_ECR_ENDPOINT_URL": ecr.url,
        "BUILDQ_REGISTRY_ENDPOINTS": ",".join(f"{h}={e}" for h, e in endpoints.items()),
        "BUILDQ_ALLOWED_DESTINATIONS": ",".join(f"{h}/*" for h in endpoints),
        "GOOGLE_APPLICATION_CREDENTIALS": str(google.service_account_file(root / "sa.json")),
        "IDENTITY_ENDPOINT": acr.msi_endpoint,
        "IDENTITY_HEADER": acr.identity_header,
    }
    settings = Settings(workdir=root / "work", ecr_endpoint_url=ecr.url, registry_endpoints=endpoints)
    try:
        yield World(paths, env, settings)
    finally:
        for server in registries:
            server.stop()
        for standin in (ecr, google, acr):
            standin.stop()


@pytest.fixture
def logins_env(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """This process logs in the way a worker does (see World.env)."""
    for name in (*AZURE_ENV_NAMES, "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in world.env.items():
        monkeypatch.setenv(name, value)


@pytest.fixture(params=["ecr", "gar", "acr"])
def path(request: pytest.FixtureRequest, world: World, logins_env: None) -> Iterator[LoginPath]:
    chosen = world.paths[request.param]
    yield chosen
    chosen.set_lifetimes(3600, 60)


# --- reuse and renewal, in one process ------------------------------------------------------


def test_a_burst_of_checks_within_a_login_lifetime_costs_one_login(
        path: LoginPath, world: World) -> None:
    """Five tag checks and push logins, each from a fresh backend as five worker threads
    would make them, within a 2-minute login: one credential, not five."""
    path.set_lifetimes(120, 60)
    ref = parse_destination(f"{path.host}/{path.new_repository()}")
    logins, tokens = path.logins(), path.realm_tokens()
    for _ in range(5):
        registry = path.backend(path.host, world.settings)
        assert registry.manifest_digest(ref, "absent") is None
        auth = registry.push_auth()
        assert auth is not None and auth["password"]
    print(f"\n{path.name}: 5 checks + 5 push logins cost {path.logins() - logins} login(s), "
          f"{path.realm_tokens() - tokens} registry token(s)")
    assert path.logins() - logins == 1
    # The registry token of the tag check is reused too (ECR's check asks its API instead).
    assert path.realm_tokens() - tokens <= 1
    assert path.rejected() == 0


def test_a_login_is_renewed_before_it_expires_not_after_a_refusal(
        path: LoginPath, world: World) -> None:
    """Logins valid 4 s, registry tokens 2 s: a worker thread's backend (reused, as
    registry_for hands it out) checks push access every 0.4 s for 10 s. Every check passes
    and nothing is refused — neither a login at the realm nor a token at the registry."""
    path.set_lifetimes(4, 2)
    ref = parse_destination(f"{path.host}/{path.new_repository()}")
    logins, rejected = path.logins(), path.rejected()
    refused = len(refused_tokens(path.registry))
    checks = 0
    until = time.monotonic() + 10
    while time.monotonic() < until:
        registry_for(ref, world.settings).check_push(ref)
        checks += 1
        time.sleep(0.4)
    issued = path.logins() - logins
    print(f"\n{path.name}: {checks} checks in 10 s, {issued} logins, {path.rejected() - rejected} "
          f"refused at the realm, {len(refused_tokens(path.registry)) - refused} at the registry")
    assert path.rejected() - rejected == 0
    assert len(refused_tokens(path.registry)) - refused == 0
    # Renewed as they ran out: at least one login per lifetime, far fewer than checks.
    assert 3 <= issued < checks, (issued, checks)


# --- a long build on real workers -----------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(world: World, tmp_path_factory: pytest.TempPathFactory, docker_engine: str) -> Iterator[Any]:
    from tests.tasks.conftest import make_cluster

    root = tmp_path_factory.mktemp("token-cluster")
    anything = world.paths["ecr"].registry
    made = make_cluster(root, anything, lease=6)
    for name in (*AZURE_ENV_NAMES, "AWS_PROFILE", "AWS_SESSION_TOKEN", "BUILDQ_CONFIG"):
        made.env.pop(name, None)
    made.env.update(world.env)
    try:
        made.start_worker("control")
        made.start_worker("docker")
        yield made
    finally:
        made.stop_all()
        made.redis.stop()


def build(cluster: Any, app: Path, destination: str) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "tasks.cli", "build", str(app), "--destination",
                           destination, "--json"], env=cluster.env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr + done.stdout
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def app(root: Path, base_image: str, run: str = "") -> Path:
    root.mkdir(parents=True)
    (root / "Dockerfile").write_text(f"FROM {base_image}\nCOPY msg.txt /msg.txt\n{run}")
    (root / "msg.txt").write_text(f"{uuid.uuid4()}\n")
    return root


def test_a_build_that_outlasts_the_workers_login_still_pushes(
        path: LoginPath, cluster: Any, tmp_path: Path, base_image: str) -> None:
    """Logins valid 8 s. The docker worker pushes a first image (and holds that login),
    then builds for 12 s: the login it held expired mid-build, and the push still goes
    through, with a login renewed beforehand — nothing is refused on the way."""
    path.set_lifetimes(8, 60)
    repository = path.new_repository()
    destination = f"{path.host}/{repository}"
    logins, rejected = path.logins(), path.rejected()
    refused = len(refused_tokens(path.registry))

    first = build(cluster, app(tmp_path / "first", base_image), destination)
    assert first["status"] == "built", first
    long = build(cluster, app(tmp_path / "long", base_image, "RUN sleep 12\n"), destination)
    assert long["status"] == "built", long

    for record in (first, long):
        assert path.digest(repository, record["tag"]) == record["digest"]
    print(f"\n{path.name}: two builds, {path.logins() - logins} logins, "
          f"{path.rejected() - rejected} refused")
    assert path.rejected() - rejected == 0
    assert len(refused_tokens(path.registry)) - refused == 0
    # The second push needed a login the first one's had been replaced by.
    assert path.logins() - logins >= 2
