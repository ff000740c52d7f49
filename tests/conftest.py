"""Session-wide real services. Started once; torn down at the end."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests import services

if TYPE_CHECKING:
    from tests.kube.cluster import ControlPlane

# The fleet's bases (local/busybox:base, the Debian python base) are images the Engine
# made itself and no registry serves, so builds hash them by their text; the default
# policy, digest, is tested with bases pushed to a registry (tests/tasks/test_bases_chain.py)
# and by scripts/demo. Workers and CLIs started by the tests inherit this.
os.environ.setdefault("BUILDQ_BASE_POLICY", "tag")


@pytest.fixture(scope="session")
def docker_engine() -> str:
    services.ensure_docker_engine()
    return services.ensure_base_image()


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[services.RegistryServer]:
    server = services.start_registry(tmp_path_factory.mktemp("registry"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[services.RedisServer]:
    server = services.start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: services.RedisServer) -> Iterator[str]:
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    yield redis_server.url
    client.close()


@pytest.fixture
def base_image(docker_engine: str) -> str:
    return docker_engine


@pytest.fixture
def app_dir(tmp_path: Path, base_image: str) -> Path:
    """A small app whose image prints a line."""
    root = tmp_path / "app"
    root.mkdir()
    (root / "Dockerfile").write_text(
        f"FROM {base_image}\nCOPY hello.txt /hello.txt\nCMD [\"cat\", \"/hello.txt\"]\n"
    )
    (root / "hello.txt").write_text("hello from buildq\n")
    return root


# --- storage stand-ins for the context stores ---------------------------------------------


def _stand_in(factory: object, root: Path, **kwargs: object) -> services.StandIn:
    # Skip (loudly) only when the stand-in cannot be installed; anything else is a failure.
    try:
        return factory(root, **kwargs)  # type: ignore[operator]
    except (ImportError, FileNotFoundError) as exc:
        pytest.skip(f"storage stand-in unavailable: {exc}")


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[services.StandIn]:
    server = _stand_in(services.start_moto, tmp_path_factory.mktemp("moto"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[services.StandIn]:
    server = _stand_in(services.start_gcs_emulator, tmp_path_factory.mktemp("gcs"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[services.StandIn]:
    server = _stand_in(services.start_azurite, tmp_path_factory.mktemp("azurite"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def azurite_https(tmp_path_factory: pytest.TempPathFactory) -> Iterator[services.StandIn]:
    server = _stand_in(services.start_azurite, tmp_path_factory.mktemp("azurite-https"), https=True)
    yield server
    server.stop()


# --- the real control plane and its node (tests/kube) --------------------------------------


@pytest.fixture(scope="session")
def kube(docker_engine: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """etcd, kube-apiserver (RBAC), kube-controller-manager and the test kubelet, once per
    session (``tests.kube.cluster.ControlPlane``): ``.kubeconfig`` (admin), ``.api_client()``,
    ``.kubectl(...)``, ``.create_namespace()``, ``.token_kubeconfig()`` (a ServiceAccount's
    token only), ``.server``. Pods run on the host's network,
    so the session's registry and store stand-ins answer them at their 127.0.0.1 ports."""
    from tests.kube import build
    from tests.kube.cluster import ControlPlane

    stale = build.out_of_date()
    if stale:  # building them here would take a test's whole timeout, and more
        pytest.fail(f"the test cluster's {', '.join(stale)} not built for tests/kube/go.mod: run "
                    "scripts/bootstrap --tests (python -m tests.kube.build) first", pytrace=False)
    plane = ControlPlane(tmp_path_factory.mktemp("kube"))
    try:
        plane.up(say=lambda line: None)
    except BaseException:
        plane.down()
        raise
    yield plane
    plane.down()


@pytest.fixture
def kube_namespace(kube: ControlPlane) -> Iterator[str]:
    """A fresh namespace on the ``kube`` cluster, deleted (with what is in it) afterwards."""
    name = kube.create_namespace()
    yield name
    kube.kubectl("delete", "namespace", name, "--wait=false")


# --- BuildKit's Dockerfile frontend (tests/workers/test_buildkit.py, test_buildkit_chain.py) ---


@pytest.fixture(scope="session")
def dockerfile_frontend(docker_engine: str, registry: services.RegistryServer) -> str:
    """BuildKit's Dockerfile frontend built from its Go module and pushed to the test
    registry: what BUILDQ_DOCKERFILE_FRONTEND names for Dockerfiles newer than Engine
    20.10's built-in frontend (COPY --link). Built once into ~/.cache/buildq."""
    ref = services.push_dockerfile_frontend(registry.host)
    if ref is None:
        pytest.skip(services.NO_FRONTEND)
    return ref


# --- cloud registry stand-ins (tests/workers/test_cloud_registries.py, test_doctor.py) ----

#: The logical cloud hosts the stand-ins answer for (through Settings.registry_endpoints).
ECR_ACCOUNT, ECR_REGION = "123456789012", "us-east-1"
ECR_HOST = f"{ECR_ACCOUNT}.dkr.ecr.{ECR_REGION}.amazonaws.com"
GAR_HOST = "us-central1-docker.pkg.dev"
ACR_NAME = "buildqstandin"
ACR_HOST = f"{ACR_NAME}.azurecr.io"
#: Dummy AWS credentials for boto3's default chain (moto checks no signatures).
AWS_ENV = {"AWS_ACCESS_KEY_ID": "AKIASTANDIN0000DUMMY", "AWS_SECRET_ACCESS_KEY": "dummy-secret",
           "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": "/dev/null",
           "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}


def moto_ecr_password(moto: services.StandIn) -> str:
    """The password moto's GetAuthorizationToken hands out for the stand-in account."""
    import base64

    import boto3

    api = boto3.client("ecr", endpoint_url=moto.endpoint, region_name=ECR_REGION,
                       aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
                       aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"])
    data = api.get_authorization_token(registryIds=[ECR_ACCOUNT])["authorizationData"][0]
    return base64.b64decode(data["authorizationToken"]).decode().partition(":")[2]


@pytest.fixture(scope="session")
def ecr_registry(tmp_path_factory: pytest.TempPathFactory,
                 moto_server: services.StandIn) -> Iterator[services.RegistryServer]:
    """ECR's registry side: htpasswd user AWS with moto's token as the password."""
    server = services.start_htpasswd_registry(tmp_path_factory.mktemp("ecr-registry"),
                                              {"AWS": moto_ecr_password(moto_server)})
    yield server
    server.stop()


@pytest.fixture(scope="session")
def google(tmp_path_factory: pytest.TempPathFactory) -> Iterator[services.GoogleStandIn]:
    server = services.GoogleStandIn(tmp_path_factory.mktemp("google"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def gar_registry(tmp_path_factory: pytest.TempPathFactory,
                 google: services.GoogleStandIn) -> Iterator[services.RegistryServer]:
    server = services.start_gar_registry(tmp_path_factory.mktemp("gar-registry"), google)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def acr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from tests.acr_standin import ACRStandIn

    server = ACRStandIn(tmp_path_factory.mktemp("acr"), ACR_NAME)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def acr_registry(tmp_path_factory: pytest.TempPathFactory,
                 acr: object) -> Iterator[services.RegistryServer]:
    from tests.acr_standin import ACRStandIn, start_acr_registry

    assert isinstance(acr, ACRStandIn)
    server = start_acr_registry(tmp_path_factory.mktemp("acr-registry"), acr)
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _fresh_cloud_logins() -> Iterator[None]:
    # Registry logins are cached process-wide by design; each test starts without any.
    def clear() -> None:
        import sys

        base = sys.modules.get("workers.registries.base")
        if base is not None:
            base._tokens.clear()
        for name, attrs in (("workers.registries.ecr", ("_logins",)),
                            ("workers.registries.acr", ("_refresh_tokens",))):
            module = sys.modules.get(name)
            for attr in attrs if module is not None else ():
                getattr(module, attr).clear()
        gar = sys.modules.get("workers.registries.gar")
        if gar is not None:
            gar._default = None  # type: ignore[attr-defined]
        acr_module = sys.modules.get("workers.registries.acr")
        if acr_module is not None:
            acr_module._default_credential = None  # type: ignore[attr-defined]

    clear()
    yield
    clear()


@pytest.fixture(scope="session")
def moto_with_iam(tmp_path_factory: pytest.TempPathFactory) -> Iterator[services.StandIn]:
    """A moto server that enforces IAM policies after its first four (setup) calls."""
    import sys

    root = tmp_path_factory.mktemp("moto-iam")
    port = services.free_port()
    server = services.StandIn("moto-iam", port, [sys.executable, "-m", "moto.server", "-H",
                                                 "127.0.0.1", "-p", str(port)], root,
                              env={"INITIAL_NO_AUTH_ACTION_COUNT": "4"})
    try:
        server.start(services.moto_ready(server))
    except RuntimeError as exc:
        pytest.skip(f"moto server could not start: {exc}")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def moto_iam_admin(moto_with_iam: services.StandIn) -> dict[str, str]:
    """Keys of an allow-everything user, made with three of the four unchecked calls."""
    import json

    import boto3

    iam = boto3.client("iam", endpoint_url=moto_with_iam.endpoint, region_name=ECR_REGION,
                       aws_access_key_id="AKIASETUP", aws_secret_access_key="setup")
    iam.create_user(UserName="admin")
    key = iam.create_access_key(UserName="admin")["AccessKey"]
    iam.put_user_policy(UserName="admin", PolicyName="all", PolicyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    return {"id": key["AccessKeyId"], "secret": key["SecretAccessKey"]}


def moto_iam_user(moto_with_iam: services.StandIn, admin: dict[str, str], name: str,
                  actions: list[str]) -> dict[str, str]:
    """A user of ``moto_with_iam`` allowed exactly ``actions`` on every resource."""
    import json

    import boto3

    iam = boto3.client("iam", endpoint_url=moto_with_iam.endpoint, region_name=ECR_REGION,
                       aws_access_key_id=admin["id"], aws_secret_access_key=admin["secret"])
    iam.create_user(UserName=name)
    key = iam.create_access_key(UserName=name)["AccessKey"]
    iam.put_user_policy(UserName=name, PolicyName="only", PolicyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}))
    return {"id": key["AccessKeyId"], "secret": key["SecretAccessKey"]}


# --- a Python base for generated Dockerfiles (tests/tasks/test_generated_dockerfile.py) ----


@pytest.fixture(scope="session")
def python_base_image(docker_engine: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Debian bookworm with python3, pip and venv, made with mmdebstrap once per engine.

    Stands in for the official python image (nothing can be pulled) through
    ``builder.base-image``; kept by name, so later sessions reuse it.
    """
    return services.ensure_python_base_image(tmp_path_factory.mktemp("python-base"))


# --- skips: always shown, and only for reasons a bootstrapped machine may have ------------

#: Skip reasons (regular expressions, searched) that are legitimate on a machine of the
#: kind scripts/bootstrap prepares, each with why. After bootstrap every service and
#: stand-in a test uses is installed, so any other skip means a test did not test what it
#: claims, and the run fails. Add an entry only with the reason it cannot be otherwise.
ALLOWED_SKIPS: dict[str, str] = {
    re.escape(services.NO_FRONTEND): (
        "the Dockerfile frontend that builds COPY --link on Engine 20.10 is built from its Go "
        "module (nothing prebuilt can be fetched); a machine kind without Go cannot have "
        "it (the polyglot kind has Go, and its test cluster needs it as well)"),
}


def allowed_why(reason: str) -> str | None:
    """Why a skip for ``reason`` is legitimate here, or None when it is not."""
    return next((why for pattern, why in ALLOWED_SKIPS.items() if re.search(pattern, reason)),
                None)


class SkipPolicy:
    """Collects every skip with its reason; one not in ALLOWED_SKIPS fails the session."""

    def __init__(self) -> None:
        self.skips: list[tuple[str, str]] = []

    def _record(self, report: pytest.CollectReport | pytest.TestReport) -> None:
        if not report.skipped or hasattr(report, "wasxfail"):
            return
        longrepr = report.longrepr
        reason = (str(longrepr[2]) if isinstance(longrepr, tuple) and len(longrepr) == 3
                  else str(longrepr))
        self.skips.append((report.nodeid, reason.removeprefix("Skipped: ")))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        # A fixture's skip is reported in setup, a test's own in call: both count.
        self._record(report)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        self._record(report)

    def unexpected(self) -> list[tuple[str, str]]:
        return [(node, reason) for node, reason in self.skips if allowed_why(reason) is None]

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        # "No tests collected" too: a module skipped whole leaves nothing else to run.
        if self.unexpected() and session.exitstatus in (pytest.ExitCode.OK,
                                                        pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        unexpected = self.unexpected()
        if unexpected:
            terminalreporter.section("skips this machine should not have", sep="=", red=True)
            for node, reason in unexpected:
                terminalreporter.line(f"{node}: {reason}")
            terminalreporter.line(
                f"{len(unexpected)} skip(s) fail the run: after scripts/bootstrap nothing a test "
                "needs may be missing. Run scripts/bootstrap (or fix the service that did not "
                "start); a skip that is right on this kind of machine goes into ALLOWED_SKIPS "
                "in tests/conftest.py with why.", red=True)
        allowed = [(node, reason, why) for node, reason in self.skips
                   if (why := allowed_why(reason)) is not None]
        if allowed:
            terminalreporter.section("allowed skips", sep="-")
            for node, reason, why in allowed:
                terminalreporter.line(f"{node}: {reason} (allowed: {why})")


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(SkipPolicy(), "buildq-skip-policy")
