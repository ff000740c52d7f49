"""Registry secrets and secret build args live only in worker memory.

Two full builds on real workers: one to a registry behind htpasswd with a distinctive
password (BUILDQ_REGISTRY_PASSWORD), one to the Artifact Registry stand-in with
distinctive Google access tokens (minted by google-auth from a service-account key in
the worker). Afterwards neither secret — nor its Basic-auth encoding — appears in any
Redis key (broker messages, results, records, event and log streams), the build logs,
the workers' logs, or Flower's task API.

Secret build args (``--secret NAME``): a real build on each pool whose RUN step uses the
value (it writes its length into the image, which the tests read back from the registry),
then the value is looked for in every place it could leak: the record, ``buildq status`` /
``history``, every Redis key (Celery task metas with their extended args included),
Flower's task API and task page, the workers' logs and command lines, the Kaniko Job
manifest, and the pushed image's config blob, ``docker save`` and ``docker history``. The
docker pool is tested with BuildKit (secret mounts) and with the legacy builder (a build
arg, cleaned out of the image config), on an engine whose daemon.json turns BuildKit off.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import json
import logging
import os
import signal
import subprocess
import sys
import tarfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from config.errors import InputError
from config.settings import Settings
from tests import services
from tests.conftest import GAR_HOST
from tests.kube.cluster import ControlPlane
from tests.tasks.conftest import Cluster, make_cluster
from workers.context import BuildInputs, source_hash
from workers.secrets import Masker, MissingSecretError, check_names, lookup

REPO = Path(__file__).resolve().parents[2]
USER = "ci-bot"


def every_value(client: redis.Redis) -> Iterator[tuple[bytes, bytes]]:
    """(key, serialized contents) of every key, whatever its type."""
    for key in client.scan_iter(count=500):
        kind = client.type(key)
        if kind == b"string":
            value: Any = client.get(key)
        elif kind == b"list":
            value = client.lrange(key, 0, -1)
        elif kind == b"hash":
            value = client.hgetall(key)
        elif kind == b"set":
            value = client.smembers(key)
        elif kind == b"zset":
            value = client.zrange(key, 0, -1, withscores=True)
        elif kind == b"stream":
            value = client.xrange(key)
        else:
            value = b""
        yield key, repr(value).encode()


def leaks(blob: bytes, secrets: list[bytes]) -> list[bytes]:
    return [s for s in secrets if s in blob]


@pytest.fixture
def cluster_with_secrets(tmp_path: Path, docker_engine: str, google: services.GoogleStandIn,
                         gar_registry: services.RegistryServer) -> Iterator[tuple[Cluster, str,
                                                                               services.RegistryServer]]:
    password = f"Pw-{uuid.uuid4().hex}-never-shown"
    registry = services.start_htpasswd_registry(tmp_path / "registry", {USER: password})
    (tmp_path / "cluster").mkdir()
    cluster = make_cluster(tmp_path / "cluster", registry, lease=6)
    cluster.env.update({
        "BUILDQ_REGISTRY_USERNAME": USER, "BUILDQ_REGISTRY_PASSWORD": password,
        "GOOGLE_APPLICATION_CREDENTIALS": str(google.service_account_file(tmp_path / "key.json")),
        "BUILDQ_REGISTRY_ENDPOINTS": f"{GAR_HOST}={gar_registry.host}",
        "BUILDQ_ALLOWED_DESTINATIONS": f"{GAR_HOST}/*,{registry.host}/*",
    })
    try:
        yield cluster, password, registry
    finally:
        cluster.stop_all()
        cluster.redis.stop()
        registry.stop()


def test_registry_password_and_tokens_appear_nowhere_after_full_builds(
        cluster_with_secrets: tuple[Cluster, str, services.RegistryServer], tmp_path: Path,
        base_image: str, google: services.GoogleStandIn) -> None:
    cluster, password, registry = cluster_with_secrets
    marker = f"ya29.SECRET{uuid.uuid4().hex[:12]}-"
    google.token_prefix = marker

    with running_flower(cluster, tmp_path / "flower.log") as (flower_url, flower_login):
        cluster.start_worker("control")
        cluster.start_worker("docker")

        # The client side needs no registry secret at all: only the workers hold them.
        client_env = {k: v for k, v in cluster.env.items()
                      if k not in ("BUILDQ_REGISTRY_PASSWORD", "GOOGLE_APPLICATION_CREDENTIALS")}
        records = []
        for dest in (f"{registry.host}/team/secret", f"{GAR_HOST}/my-proj/images/secret"):
            app = tmp_path / f"app-{len(records)}"
            app.mkdir()
            (app / "Dockerfile").write_text(f"FROM {base_image}\nCOPY msg.txt /msg.txt\n")
            (app / "msg.txt").write_text(f"secret test {uuid.uuid4()}\n")
            done = subprocess.run([sys.executable, "-m", "tasks.cli", "build", str(app),
                                   "--destination", dest, "--builder", "docker", "--json"],
                                  env=client_env, cwd=REPO, capture_output=True, timeout=240)
            assert done.returncode == 0, done.stdout + done.stderr
            record = json.loads(done.stdout.strip().splitlines()[-1])
            assert record["status"] == "built", record
            records.append((record, done.stdout + done.stderr))

        # The secrets were really used: the push went through, with the minted tokens.
        tokens = [t for t in google.registry_logins if t.startswith(marker)]
        assert tokens, "the worker never logged in to the Artifact Registry stand-in"

        def flower_tasks() -> dict[str, Any]:
            r = requests.get(f"{flower_url}/api/tasks", auth=flower_login, timeout=5)
            r.raise_for_status()
            return dict(r.json())

        services.wait_for(lambda: len(flower_tasks()) >= 2, 30, "flower task list")
        flower_text = requests.get(f"{flower_url}/api/tasks", auth=flower_login, timeout=5).content

    secrets = [password.encode(), marker.encode(),
               base64.b64encode(f"{USER}:{password}".encode()),
               *[t.encode() for t in tokens],
               *[base64.b64encode(f"oauth2accesstoken:{t}".encode()) for t in tokens]]

    found = {key: leaks(value, secrets) for key, value in every_value(
        redis.Redis.from_url(cluster.redis.url))}
    assert not {k: v for k, v in found.items() if v}, "secret in Redis"
    assert any(k.startswith(b"buildq:log:") for k in found), "no build log was scanned"

    for log in [*sorted(cluster.root.glob("worker-*.log")), tmp_path / "flower.log"]:
        assert not leaks(log.read_bytes(), secrets), f"secret in {log.name}"
    for _, output in records:
        assert not leaks(output, secrets), "secret in the CLI's output"
    assert not leaks(flower_text, secrets), "secret in Flower's task API"
    for pid in os.listdir("/proc"):
        # No process got a secret on its command line (the env is where workers read it).
        if pid.isdigit():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            assert not leaks(cmdline, secrets)


# --------------------------------------------------------------------------- secret build args

SECRET_DOCKERFILE = """FROM {base}
ARG PIP_TOKEN
ARG NPM_TOKEN
COPY msg.txt /msg.txt
RUN echo ${{#PIP_TOKEN}} ${{#NPM_TOKEN}} > /secret-lengths && echo "using $PIP_TOKEN and $NPM_TOKEN"
"""
FAILING_STEP = 'RUN echo "failing with $PIP_TOKEN" && false\n'

#: The same build with BuildKit: the values come from secret mounts, never build args.
MOUNT_DOCKERFILE = """FROM {base}
COPY msg.txt /msg.txt
RUN --mount=type=secret,id=PIP_TOKEN --mount=type=secret,id=NPM_TOKEN \\
    PIP_TOKEN=$(cat /run/secrets/PIP_TOKEN) NPM_TOKEN=$(cat /run/secrets/NPM_TOKEN) \\
    && echo ${{#PIP_TOKEN}} ${{#NPM_TOKEN}} > /secret-lengths && echo "using $PIP_TOKEN and $NPM_TOKEN"
"""
MOUNT_FAILING_STEP = ('RUN --mount=type=secret,id=PIP_TOKEN '
                      'echo "failing with $(cat /run/secrets/PIP_TOKEN)" && false\n')


def forms_of(*values: str) -> list[bytes]:
    """A value as it could leak: raw, and base64 (as in a Basic header or a Secret's data)."""
    return [f for v in values for f in (v.encode(), base64.b64encode(v.encode()))]


@contextlib.contextmanager
def running_flower(cluster: Cluster, log_path: Path) -> Iterator[tuple[str, tuple[str, str]]]:
    port = services.free_port()
    login = ("watcher", f"flower-{uuid.uuid4().hex[:8]}")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tasks.cli", "flower", "--port", str(port), "--address",
             "127.0.0.1"], env={**cluster.env, "BUILDQ_FLOWER_BASIC_AUTH": ":".join(login)},
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            services.wait_for(lambda: requests.get(f"{url}/healthcheck", timeout=1).ok, 30,
                              "flower")
            yield url, login
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(15)


def registry_image(registry_url: str, repository: str, tag: str,
                   auth: tuple[str, str] | None = None) -> tuple[bytes, dict[str, bytes]]:
    """The pushed image's config blob and the files of its layers, from the registry's API."""
    accept = ("application/vnd.docker.distribution.manifest.v2+json, "
              "application/vnd.oci.image.manifest.v1+json")
    manifest = requests.get(f"{registry_url}/v2/{repository}/manifests/{tag}", auth=auth,
                            headers={"Accept": accept}, timeout=10)
    manifest.raise_for_status()
    body = manifest.json()

    def blob(digest: str) -> bytes:
        r = requests.get(f"{registry_url}/v2/{repository}/blobs/{digest}", auth=auth, timeout=30)
        r.raise_for_status()
        return r.content

    files: dict[str, bytes] = {}
    for layer in body["layers"]:
        with tarfile.open(fileobj=io.BytesIO(blob(layer["digest"])), mode="r:*") as tar:
            for member in tar:
                if member.isfile() and member.size < 1 << 16:
                    files[member.name] = tar.extractfile(member).read()  # type: ignore[union-attr]
    return blob(body["config"]["digest"]), files


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "tasks.cli", *args], env=env, cwd=REPO,
                          capture_output=True, timeout=240)


def scan_processes(secrets: list[bytes]) -> int:
    """Asserts no command line holds a secret; returns how many command lines were read."""
    read = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            read += 1
            assert not leaks(cmdline, secrets), f"secret on the command line of pid {pid}"
    return read


def assert_redis_clean(cluster: Cluster, secrets: list[bytes], request_id: str,
                       names: list[str]) -> None:
    found = {key: leaks(value, secrets) for key, value in every_value(
        redis.Redis.from_url(cluster.redis.url))}
    assert not {k: v for k, v in found.items() if v}, "secret in Redis"
    assert any(k.startswith(b"buildq:log:") for k in found), "no build log was scanned"
    # The task meta (result_extended) keeps the last stage's argument, the build state: it
    # names the secrets, and it was among the values scanned above.
    meta = redis.Redis.from_url(cluster.redis.url).get(f"celery-task-meta-{request_id}")
    assert meta is not None, "the request's task meta was not in Redis"
    (state,) = json.loads(meta)["args"]
    assert state["secrets"] == sorted(names)


@pytest.fixture
def build_secrets(tmp_path: Path) -> tuple[str, str, Path]:
    """Two distinctive values: one for the environment, one for a secrets directory."""
    pip_token = f"pip-{uuid.uuid4().hex}-never-shown"
    npm_token = f"npm-{uuid.uuid4().hex}-never-shown"
    secrets_dir = tmp_path / "mounted-secret"
    secrets_dir.mkdir()
    # Written with a newline, as `echo > file` would: the value is the line.
    (secrets_dir / "NPM_TOKEN").write_text(npm_token + "\n")
    return pip_token, npm_token, secrets_dir


@pytest.fixture(params=["buildkit", "legacy"])
def frontend(request: pytest.FixtureRequest, tmp_path: Path,
             base_image: str) -> Iterator[tuple[str, dict[str, str]]]:
    """The docker pool's frontend and the environment that points a worker at its engine."""
    if request.param == "buildkit":
        yield "buildkit", {}
        return
    engine = services.start_second_engine(tmp_path / "legacy-engine", buildkit=False)
    try:
        services.copy_image(base_image, engine.socket)
        yield "legacy", engine.env
    finally:
        engine.stop()


def test_secret_build_arg_and_registry_password_appear_nowhere_on_the_docker_pool(
        cluster_with_secrets: tuple[Cluster, str, services.RegistryServer], tmp_path: Path,
        base_image: str, build_secrets: tuple[str, str, Path],
        frontend: tuple[str, dict[str, str]]) -> None:
    cluster, password, registry = cluster_with_secrets
    pip_token, npm_token, secrets_dir = build_secrets
    kind, engine_env = frontend
    dockerfile, failing_step = (MOUNT_DOCKERFILE, MOUNT_FAILING_STEP) if kind == "buildkit" \
        else (SECRET_DOCKERFILE, FAILING_STEP)
    docker_cli = ["docker", *(["-H", engine_env["DOCKER_HOST"]] if engine_env else [])]
    cluster.env.update({"BUILDQ_SECRET_PIP_TOKEN": pip_token,
                        "BUILDQ_SECRETS_DIR": str(secrets_dir)})
    # The client holds no secret of any kind: only the workers do.
    client_env = {k: v for k, v in cluster.env.items()
                  if k not in ("BUILDQ_REGISTRY_PASSWORD", "BUILDQ_SECRET_PIP_TOKEN",
                               "BUILDQ_SECRETS_DIR", "GOOGLE_APPLICATION_CREDENTIALS")}
    app = tmp_path / "app"
    app.mkdir()
    (app / "Dockerfile").write_text(dockerfile.format(base=base_image))
    (app / "msg.txt").write_text(f"secret arg {uuid.uuid4()}\n")
    repository = f"team/secret-{kind}"

    with running_flower(cluster, tmp_path / "flower.log") as (flower_url, flower_login):
        cluster.start_worker("control")
        docker_worker = cluster.start_worker("docker", env=engine_env)
        done = cli(client_env, "build", str(app), "--destination", f"{registry.host}/{repository}",
                   "--builder", "docker", "--secret", "PIP_TOKEN", "--secret", "NPM_TOKEN",
                   "--json")
        assert done.returncode == 0, done.stdout + done.stderr
        record = json.loads(done.stdout.strip().splitlines()[-1])
        assert record["status"] == "built", record
        assert record["frontend"] == kind, record
        # A failing step that prints the value: its error quotes the step's output.
        (app / "Dockerfile").write_text(dockerfile.format(base=base_image) + failing_step)
        failing = cli(client_env, "build", str(app), "--destination",
                      f"{registry.host}/{repository}", "--builder", "docker", "--secret",
                      "PIP_TOKEN", "--secret", "NPM_TOKEN", "--json")
        assert failing.returncode == 1, failing.stdout + failing.stderr
        failed = json.loads(failing.stdout.strip().splitlines()[-1])
        assert failed["status"] == "failed" and "failing with ***" in failed["error"], failed

        def flower_task() -> dict[str, Any]:
            r = requests.get(f"{flower_url}/api/task/info/{record['id']}", auth=flower_login,
                             timeout=5)
            return dict(r.json()) if r.ok else {}

        services.wait_for(lambda: flower_task().get("state") == "SUCCESS", 30, "flower task")
        flower_pages = [
            requests.get(f"{flower_url}/api/tasks", auth=flower_login, timeout=5).content,
            requests.get(f"{flower_url}/api/task/info/{record['id']}", auth=flower_login,
                         timeout=5).content,
            requests.get(f"{flower_url}/task/{record['id']}", auth=flower_login,
                         timeout=5).content,
        ]
        environ = Path(f"/proc/{docker_worker.pid}/environ").read_bytes()

    secrets = [*forms_of(pip_token, npm_token, password),
               base64.b64encode(f"{USER}:{password}".encode())]

    # The values did reach the build: the RUN step wrote their lengths into the image.
    auth = (USER, password)
    config_blob, files = registry_image(registry.url, repository, record["tag"], auth)
    assert files["secret-lengths"] == f"{len(pip_token)} {len(npm_token)}\n".encode()
    assert pip_token.encode() in environ, "the docker worker never held the value"

    # The pushed config blob: the legacy builder's history and container_config carry the
    # mask, not the value; BuildKit's never had it (a mount is not a build arg).
    assert not leaks(config_blob, secrets), "secret in the pushed image config"
    history = [h.get("created_by", "") for h in json.loads(config_blob)["history"]]
    if kind == "legacy":
        assert any("NPM_TOKEN=*** PIP_TOKEN=***" in line for line in history), history
    else:
        assert any("--mount=type=secret" in line or "cat /run/secrets/PIP_TOKEN" in line
                   for line in history), history
        assert not any("PIP_TOKEN=***" in line for line in history), history
    # docker history and docker save of the image as tagged on the build host: what was pushed.
    local = subprocess.run([*docker_cli, "history", "--no-trunc", record["image"]],
                           capture_output=True, timeout=60)
    assert local.returncode == 0, local.stderr
    assert not leaks(local.stdout, secrets)
    assert (b"PIP_TOKEN=***" in local.stdout) == (kind == "legacy"), local.stdout
    inspect = subprocess.run([*docker_cli, "image", "inspect", record["image"]],
                             capture_output=True, timeout=60)
    assert inspect.returncode == 0 and not leaks(inspect.stdout, secrets)
    saved = subprocess.run([*docker_cli, "save", record["image"]], capture_output=True,
                           timeout=120)
    assert saved.returncode == 0 and saved.stdout, saved.stderr
    assert not leaks(saved.stdout, secrets), "secret in docker save of the image"

    # The record, and what `buildq status` / `history` print of it.
    for shown_record in (record, failed):
        assert not leaks(json.dumps(shown_record).encode(), secrets), "secret in the record"
    for output in (done, failing):
        assert not leaks(output.stdout + output.stderr, secrets), "secret in the CLI's output"
    for args, tag in ((("status", record["id"]), record["tag"]),
                      (("status", failed["id"]), failed["tag"]),
                      (("history",), record["tag"]), (("history", "--json"), failed["tag"])):
        shown = cli(client_env, *args)
        assert shown.returncode == 0, shown.stderr
        assert tag.encode() in shown.stdout, args
        assert not leaks(shown.stdout + shown.stderr, secrets), f"secret in buildq {args[0]}"

    # Redis: broker messages, task metas with their arguments, records, events, build logs.
    assert_redis_clean(cluster, secrets, record["id"], ["PIP_TOKEN", "NPM_TOKEN"])
    log_lines = [fields[b"line"] for _, fields in redis.Redis.from_url(cluster.redis.url).xrange(
        f"buildq:log:{record['source_hash']}") if b"line" in fields]
    # The RUN step printed both values; the log has that line, masked (BuildKit prefixes
    # the step's number and time).
    assert any(line.endswith(b"using *** and ***") for line in log_lines), log_lines

    # Flower: the task list, the task's API record and its HTML page show names only.
    for page in flower_pages:
        assert not leaks(page, secrets), "secret in Flower"
    assert b"PIP_TOKEN" in flower_pages[1] and b"PIP_TOKEN" in flower_pages[2]

    # Worker logs, Flower's own log, and every process's command line.
    worker_logs = sorted(cluster.root.glob("worker-*.log"))
    assert any(record["id"].encode() in log.read_bytes() for log in worker_logs)
    for log in [*worker_logs, tmp_path / "flower.log"]:
        assert not leaks(log.read_bytes(), secrets), f"secret in {log.name}"
    assert scan_processes(secrets) > 5


def test_missing_secret_is_a_failed_record_naming_it_and_the_fix(
        cluster: Cluster, tmp_path: Path, base_image: str) -> None:
    from tasks import build_image, outcome

    app = tmp_path / "app"
    app.mkdir()
    (app / "Dockerfile").write_text(f"FROM {base_image}\nARG ABSENT_TOKEN\nRUN true\n")
    record = outcome(build_image.delay(str(app), destination=f"{cluster.registry.host}/secret/missing",
                                       builder="docker", secrets=["ABSENT_TOKEN"]),
                     timeout=120)
    assert record["status"] == "failed", record
    assert record["error_kind"] == "secret"
    error = record["error"]
    for expected in ("ABSENT_TOKEN", "docker-pool worker", "BUILDQ_SECRET_ABSENT_TOKEN",
                     "BUILDQ_SECRETS_DIR"):
        assert expected in error, error
    assert "Traceback" not in error
    assert cluster.registry.digest("secret/missing", record["tag"]) is None


# --------------------------------------------------------------------------- kaniko pool

#: The Kubernetes Secret the kaniko Jobs read secret build args from (key = name).
BUILD_SECRETS = "team-build-secrets"


@dataclasses.dataclass
class KanikoSecrets:
    kube: ControlPlane
    namespace: str
    store: Path
    executor: str
    base: str


@pytest.fixture
def kaniko_secrets(cluster: Cluster, kube: ControlPlane, kube_namespace: str,
                   tmp_path: Path) -> Iterator[KanikoSecrets]:
    """A kaniko worker on the real control plane (tests/kube), the real executor in the pod."""
    from tests.kube import kaniko

    executor = kaniko.push_image(cluster.registry.host, say=lambda _line: None)
    base = f"{cluster.registry.host}/kaniko-base/busybox:base"
    for args in (("tag", services.ensure_base_image(), base), ("push", base)):
        subprocess.run(["docker", *args], check=True, capture_output=True, timeout=120)
    store = tmp_path / "contexts"
    store.mkdir()
    env = {**cluster.env, "KUBECONFIG": str(kube.kubeconfig), "BUILDQ_KUBE_NAMESPACE": kube_namespace,
           "BUILDQ_BUILD_SECRETS_SECRET": BUILD_SECRETS}
    proc = dataclasses.replace(cluster, env=env).start_worker("kaniko")
    try:
        yield KanikoSecrets(kube, kube_namespace, store, executor, base)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(20)
        cluster.workers.pop(proc.pid, None)


def _jobs_as_stored(kube: ControlPlane, namespace: str, stop: threading.Event,
                    seen: list[dict[str, Any]]) -> None:
    """Keep the first Job the API server holds in ``namespace`` (it is deleted after the build)."""
    while not stop.is_set() and not seen:
        shown = kube.kubectl("get", "jobs", "-n", namespace, "-o", "json")
        items = json.loads(shown.stdout).get("items") if shown.returncode == 0 else None
        if items:
            seen.append(items[0])
        stop.wait(0.2)


def test_secret_build_arg_reaches_kaniko_by_reference_only(
        cluster: Cluster, kaniko_secrets: KanikoSecrets, tmp_path: Path) -> None:
    from tasks import build_image

    ks = kaniko_secrets
    value = f"kaniko-{uuid.uuid4().hex}-never-shown"
    data = {"PIP_TOKEN": base64.b64encode(value.encode()).decode()}
    created = ks.kube.kubectl("apply", "-n", ks.namespace, "-f", "-", stdin=json.dumps({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": BUILD_SECRETS}, "data": data}))
    assert created.returncode == 0, created.stderr
    app = tmp_path / "app"
    app.mkdir()
    # Kaniko does not echo build args; this RUN step does not print the value either.
    (app / "Dockerfile").write_text(
        f"FROM {ks.base}\nARG PIP_TOKEN\nCOPY msg.txt /msg.txt\n"
        "RUN echo ${#PIP_TOKEN} > /secret-length\n")
    (app / "msg.txt").write_text(f"kaniko secret {uuid.uuid4()}\n")
    config = {"builder": {"type": "kaniko", "destination": f"{cluster.registry.host}/kaniko/secret",
                          "build-context-store": ks.store.as_uri(), "kaniko-image": ks.executor}}
    stop, stored = threading.Event(), []
    watcher = threading.Thread(target=_jobs_as_stored, args=(ks.kube, ks.namespace, stop, stored))
    watcher.start()
    try:
        result = build_image.delay(str(app), builder="kaniko", config=config, secrets=["PIP_TOKEN"])
        record = result.get(timeout=600)
    finally:
        stop.set()
        watcher.join(30)
    assert record["status"] == "built", record
    secrets = forms_of(value)

    # The value reached kaniko's RUN step, through the pod's environment only.
    _, files = registry_image(cluster.registry.url, "kaniko/secret", record["tag"])
    assert files["secret-length"] == f"{len(value)}\n".encode()

    # The Job as the API server stored it: a reference to the Secret, never the value.
    (job,) = stored
    assert not leaks(json.dumps(job).encode(), secrets), "secret in the Job manifest"
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert "--build-arg=PIP_TOKEN" in container["args"]
    assert {"name": "PIP_TOKEN", "valueFrom": {"secretKeyRef": {
        "name": BUILD_SECRETS, "key": "PIP_TOKEN"}}} in container["env"]

    assert not leaks(json.dumps(record).encode(), secrets), "secret in the record"
    assert_redis_clean(cluster, secrets, record["id"], ["PIP_TOKEN"])
    for log in sorted(cluster.root.glob("worker-*.log")):
        assert not leaks(log.read_bytes(), secrets), f"secret in {log.name}"
    assert scan_processes(secrets) > 5


# --------------------------------------------------------------------------- units


def test_secret_names_count_in_the_source_hash(tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text("FROM scratch\nARG A\n")
    plain = source_hash(tmp_path, BuildInputs.create(None, {}, None, None))
    assert plain == source_hash(tmp_path, BuildInputs.create(None, {}, None, None, secrets=[]))
    one = source_hash(tmp_path, BuildInputs.create(None, {}, None, None, secrets=["A"]))
    both = source_hash(tmp_path, BuildInputs.create(None, {}, None, None, secrets=["B", "A"]))
    assert len({plain, one, both}) == 3
    assert both == source_hash(tmp_path, BuildInputs.create(None, {}, None, None,
                                                            secrets=["A", "B", "A"]))
    # A secret is not a build arg of the same name (whose value would be in the request).
    assert one != source_hash(tmp_path, BuildInputs.create(None, {"A": ""}, None, None))


@pytest.mark.parametrize("names, build_args, message", [
    (["pip-token"], {}, "not valid"),
    (["1ST"], {}, "not valid"),
    (["PIP_TOKEN=abc"], {}, "not valid"),
    (["PIP_TOKEN"], {"PIP_TOKEN": "x"}, "both as a build arg and as a secret"),
])
def test_bad_secret_names_are_refused(names: list[str], build_args: dict[str, str],
                                      message: str) -> None:
    with pytest.raises(InputError, match=message) as info:
        check_names(names, build_args)
    # A value typed where a name belongs (NAME=value) is not echoed into the record.
    assert "abc" not in str(info.value)


def test_lookup_prefers_the_environment_then_the_secrets_dir(tmp_path: Path) -> None:
    (tmp_path / "B").write_text("from-file\n")
    settings = Settings.from_env({"BUILDQ_SECRET_A": "from-env", "BUILDQ_SECRETS_DIR": str(tmp_path)})
    assert lookup(["A", "B"], settings, "docker") == {"A": "from-env", "B": "from-file"}
    assert "from-env" not in repr(settings)
    with pytest.raises(MissingSecretError, match="secret build arg C has no value on docker-pool"):
        lookup(["C"], settings, "docker")


def test_http_debug_logs_mask_active_values(caplog: pytest.LogCaptureFixture) -> None:
    masker = Masker(["tok/en value"])
    logger = logging.getLogger("urllib3.connectionpool")
    with caplog.at_level(logging.DEBUG, logger="urllib3.connectionpool"), masker.active():
        logger.debug('"POST /build?buildargs=%s HTTP/1.1" 200', "%7B%22A%22%3A%22tok%2Fen%20value%22%7D")
        logger.debug("raw %s", "tok/en value")
    logger.debug("after %s", "tok/en value")
    text = caplog.text
    assert "tok" not in text and text.count("***") == 2, text
