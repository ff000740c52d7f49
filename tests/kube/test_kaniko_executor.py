"""The real kaniko executor (tests/kube/kaniko) running the Jobs buildq renders.

No Kubernetes here: :func:`run_pod` hands the rendered pod's one container to ``docker
run`` the way a kubelet would (its image, args, env with Secret references resolved,
Secret, downward-API and hostPath volumes, the termination-log file), on the host's
network so kaniko reaches the stand-ins on 127.0.0.1. What is checked is what kaniko
itself does with what buildq renders: read the context from the store stand-in, pull the
base from a registry, push with the mounted docker config to a registry that refuses
anyone else, fill the cache repository, and write the digest where the dispatcher reads it.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import subprocess
import tarfile
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from config import config_from_mapping
from config.kaniko_flags import BOOLEAN_FLAGS, REPEATABLE_FLAGS
from config.references import parse_image_ref
from config.schema import LaunchConfig
from config.settings import Settings
from tests import services
from tests.kube.conftest import PUSH_USER
from workers.builders.kaniko import KanikoRequest, render_job
from workers.context import BuildInputs

#: The first test here may build the executor (about nine minutes cold on two shared cores,
#: see tests/kube/README.md); pytest-timeout's 600 s covers fixture setup too.
pytestmark = pytest.mark.timeout(1800)

# --------------------------------------------------------------------------- the flag set

#: One flag line of pflag's help: ``  -d, --destination multi-arg type   Registry...``; a
#: boolean flag shows no type.
HELP_FLAG = re.compile(r"^\s+(?:-\w, )?--(?P<name>[\w-]+)(?: (?P<type>\S.*?))?\s{2,}\S", re.M)
#: The value types of kaniko's flags that keep every value given (pflag's own and kaniko's).
REPEATABLE_TYPES = frozenset({"multi-arg type", "key-value-arg type", "key-multi-value-arg type",
                              "gitoptions", "stringArray", "stringSlice", "strings"})
#: Flags buildq's tables hold as the default image's fork (osscontainertools v1.28.2) has
#: them and the executor built here types otherwise: --target is repeatable there, one
#: string here.
FORK_TYPED_OTHERWISE = frozenset({"--target"})


def executor_flags(executor: Path) -> dict[str, str]:
    """Every flag ``executor --help`` lists, with its value type ("" for a boolean)."""
    shown = subprocess.run([str(executor), "--help"], capture_output=True, text=True, check=True)
    table = shown.stdout.split("\nFlags:\n", 1)[1].split("\n\n", 1)[0]
    return {f"--{m['name']}": m["type"] or "" for m in HELP_FLAG.finditer(table)}


def test_flag_tables_hold_every_boolean_and_repeatable_flag_of_the_executor(
        kaniko_executor: Path) -> None:
    flags = executor_flags(kaniko_executor)
    assert {"--destination", "--cache", "--git", "--registry-map"} <= set(flags)
    booleans = {f for f, kind in flags.items() if kind == ""} - {"--help"}
    repeatables = {f for f, kind in flags.items() if kind in REPEATABLE_TYPES}
    assert booleans - BOOLEAN_FLAGS == set()
    assert repeatables - REPEATABLE_FLAGS == set()
    # Nor do the tables take a flag of another type for a boolean or a repeatable one.
    assert {f for f in BOOLEAN_FLAGS if flags.get(f, "") != ""} == set()
    assert {f for f in REPEATABLE_FLAGS
            if f in flags and flags[f] not in REPEATABLE_TYPES} == FORK_TYPED_OTHERWISE


def test_the_image_is_pushed_for_a_node_to_pull(kaniko_executor: Path,
                                                registry: services.RegistryServer) -> None:
    from tests.kube import kaniko

    ref = kaniko.push_image(registry.host, kaniko_executor, say=lambda _line: None)
    repository, tag = ref.removeprefix(f"{registry.host}/").rsplit(":", 1)
    assert registry.digest(repository, tag)
    # Only the registry keeps that name: a node pulls it.
    assert subprocess.run(["docker", "image", "inspect", ref], capture_output=True).returncode != 0


# --------------------------------------------------------------------------- a pod on docker


@dataclass(frozen=True)
class PodRun:
    exit_code: int
    log: str
    #: What the container left in /dev/termination-log (kaniko's --digest-file).
    termination_message: str


def _annotation_key(field_path: str) -> str:
    return field_path.split("['", 1)[1].rstrip("']")


def run_pod(job: Mapping[str, Any], scratch: Path, secrets: Mapping[str, Mapping[str, str]],
            extra_env: Mapping[str, str] | None = None) -> PodRun:
    """Run the Job's pod like a kubelet would, with ``docker run`` on the host's network.

    ``secrets`` are the Secrets of the namespace (name → key → value); ``extra_env`` what
    a cloud identity would inject (here: the stand-ins' dummy keys). Values travel in the
    environment of ``docker run``, never on its command line.
    """
    template = job["spec"]["template"]
    pod = template["spec"]
    (container,) = pod["containers"]
    env: dict[str, str] = dict(extra_env or {})
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = secrets[ref["name"]][ref["key"]]
    volumes: dict[str, Path] = {}
    for volume in pod.get("volumes", []):
        if "hostPath" in volume:
            volumes[volume["name"]] = Path(volume["hostPath"]["path"])
            continue
        directory = scratch / "volumes" / volume["name"]
        directory.mkdir(parents=True)
        volumes[volume["name"]] = directory
        if "secret" in volume:
            data = secrets[volume["secret"]["secretName"]]
            items = volume["secret"].get("items") or [{"key": k, "path": k} for k in data]
            for item in items:
                (directory / item["path"]).write_text(data[item["key"]])
        elif "downwardAPI" in volume:
            for item in volume["downwardAPI"]["items"]:
                key = _annotation_key(item["fieldRef"]["fieldPath"])
                (directory / item["path"]).write_text(template["metadata"]["annotations"][key])
    termination_log = scratch / "termination-log"
    termination_log.touch()
    command = ["docker", "run", "--rm", "--network", "host",
               "-v", f"{termination_log}:/dev/termination-log"]
    for mount in container.get("volumeMounts", []):
        mode = ":ro" if mount.get("readOnly") else ""
        command += ["-v", f"{volumes[mount['name']]}:{mount['mountPath']}{mode}"]
    for name in env:
        command += ["-e", name]
    command += [container["image"], *container["args"]]
    done = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=600)
    return PodRun(done.returncode, done.stdout + done.stderr, termination_log.read_text())


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def base_in_registry(docker_engine: str, registry: services.RegistryServer) -> str:
    """The tiny test base, in the plain test registry kaniko pulls it from."""
    ref = f"{registry.host}/kaniko-base/busybox:base"
    subprocess.run(["docker", "tag", services.ensure_base_image(), ref], check=True,
                   capture_output=True)
    subprocess.run(["docker", "push", ref], check=True, capture_output=True)
    return ref


def _docker_config(registry: services.RegistryServer) -> str:
    login = base64.b64encode(":".join(PUSH_USER).encode()).decode()
    return json.dumps({"auths": {registry.host: {"auth": login}}})


#: The Secret the Jobs mount as kaniko's docker config (builder.secret-name).
REGISTRY_SECRET = "push-registry-login"


@dataclass(frozen=True)
class Build:
    job: dict[str, Any]
    request: KanikoRequest
    #: What the image's /msg.txt holds: it differs per build.
    message: str
    secrets: dict[str, dict[str, str]]


def _context(base: str, steps: str = "") -> tuple[bytes, str, str]:
    """A .tar.gz context, its sha256 (standing in for the source hash) and its message."""
    message = uuid.uuid4().hex
    dockerfile = f"FROM {base}\nCOPY msg.txt /msg.txt\nRUN cat /msg.txt > /copied.txt\n{steps}"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in (("Dockerfile", dockerfile.encode()), ("msg.txt", message.encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue(), hashlib.sha256(buf.getvalue()).hexdigest(), message


def _config(store: str, push: services.RegistryServer, base_registry: str, kaniko_image: str,
            repository: str, **builder: Any) -> LaunchConfig:
    # The base comes from a second plain-HTTP registry, which only the operator can name.
    args = [f"--insecure-registry={base_registry}"]
    return config_from_mapping({"builder": {
        "type": "kaniko", "destination": f"{push.host}/{repository}", "build-context-store": store,
        "kaniko-image": kaniko_image, "secret-name": REGISTRY_SECRET,
        "kaniko-config": {"spec": {"template": {"spec": {"containers": [{"args": args}]}}}},
        **builder}})


def _prepare(store: Any, settings: Settings, push: services.RegistryServer, base: str,
             kaniko_image: str, repository: str, steps: str = "",
             inputs: BuildInputs | None = None) -> Build:
    data, source_hash, message = _context(base, steps)
    with store.writer(f"{source_hash}.tar.gz") as out:
        out.write(data)
    config = _config(store.url, push, base.split("/", 1)[0], kaniko_image, repository)
    request = KanikoRequest(image=parse_image_ref(f"{push.host}/{repository}:{source_hash[:24]}"),
                            context_uri=store.uri(f"{source_hash}.tar.gz"), source_hash=source_hash,
                            inputs=inputs or BuildInputs())
    job = render_job(request, config, settings, namespace="builds")
    secrets = {REGISTRY_SECRET: {".dockerconfigjson": _docker_config(push)}}
    return Build(job, request, message, secrets)


def _manifest_digest(registry: services.RegistryServer, repository: str, reference: str) -> str | None:
    accept = ("application/vnd.oci.image.manifest.v1+json, "
              "application/vnd.docker.distribution.manifest.v2+json")
    answer = requests.head(f"{registry.url}/v2/{repository}/manifests/{reference}", auth=PUSH_USER,
                           headers={"Accept": accept}, timeout=10)
    return answer.headers.get("Docker-Content-Digest") if answer.status_code == 200 else None


def _tags(registry: services.RegistryServer, repository: str) -> list[str]:
    answer = requests.get(f"{registry.url}/v2/{repository}/tags/list", auth=PUSH_USER, timeout=10)
    return list(answer.json().get("tags") or []) if answer.status_code == 200 else []


def _image_file(registry: services.RegistryServer, ref: str, path: str, scratch: Path) -> str:
    """``cat path`` in the pushed image, pulled with the registry's login."""
    config_dir = scratch / "docker-client"
    config_dir.mkdir()
    (config_dir / "config.json").write_text(_docker_config(registry))
    docker = ["docker", "--config", str(config_dir)]
    subprocess.run([*docker, "pull", ref], check=True, capture_output=True, timeout=300)
    try:
        shown = subprocess.run([*docker, "run", "--rm", "--network", "none", ref, "cat", path],
                               check=True, capture_output=True, text=True, timeout=120)
    finally:
        subprocess.run([*docker, "image", "rm", ref], capture_output=True, check=False)
    return shown.stdout


def _built_and_runs(build: Build, run: PodRun, push: services.RegistryServer, scratch: Path) -> None:
    assert run.exit_code == 0, run.log
    image = build.request.image
    digest = _manifest_digest(push, image.repository, image.tag or "")
    assert digest is not None and run.termination_message.strip() == digest, run.log
    # --cache-repo=<destination>-cache: the RUN layer was pushed there, with the same login.
    assert _tags(push, f"{image.repository}-cache"), run.log
    ref = f"{push.host}/{image.repository}@{digest}"
    assert _image_file(push, ref, "/copied.txt", scratch) == build.message


def env_of(job: Mapping[str, Any]) -> dict[str, Any]:
    (container,) = job["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value") for e in container.get("env", [])}


# --------------------------------------------------------------------------- the stores


@pytest.fixture
def aws_keys(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """Dummy keys (moto checks no signature) for our client and, as a workload identity
    would, for kaniko's; no region: the Job must bring its own."""
    keys = {"AWS_ACCESS_KEY_ID": "AKIAKANIKOTEST000000", "AWS_SECRET_ACCESS_KEY": "dummy"}
    for name, value in keys.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")  # ours only; kaniko never sees it
    yield keys


def _s3_build(moto: services.StandIn, push: services.RegistryServer, base: str,
              kaniko_image: str) -> tuple[Build, Settings]:
    import boto3

    from workers.stores.s3 import S3Store

    bucket = f"kaniko-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto.endpoint).create_bucket(Bucket=bucket)
    settings = Settings(s3_endpoint_url=moto.endpoint)
    store = S3Store(f"s3://{bucket}/ctx", settings)
    return _prepare(store, settings, push, base, kaniko_image, "kaniko/s3"), settings


def test_s3_context_without_an_environment_builds_and_pushes(
        kaniko_image: str, moto_server: services.StandIn, push_registry: services.RegistryServer,
        base_in_registry: str, aws_keys: dict[str, str], tmp_path: Path) -> None:
    build, settings = _s3_build(moto_server, push_registry, base_in_registry, kaniko_image)
    # No environment.type aws: the region is still rendered, kaniko's S3 client needs one.
    assert env_of(build.job) == {"S3_ENDPOINT": moto_server.endpoint, "S3_FORCE_PATH_STYLE": "true",
                                 "AWS_REGION": settings.s3_region}
    run = run_pod(build.job, tmp_path, build.secrets, aws_keys)
    _built_and_runs(build, run, push_registry, tmp_path)


class S3Recorder(services.HTTPStandIn):
    """An S3 endpoint that records each request's SigV4 credential scope and has no objects."""

    def __init__(self) -> None:
        super().__init__()
        self.scopes: list[str] = []

    def route(self, method: str, path: str, headers: dict[str, str],
              body: bytes) -> tuple[int, dict[str, str], bytes]:
        found = re.search(r"Credential=[^/]+/(\d{8}/[^,]*)", headers.get("Authorization", ""))
        self.scopes.append(found.group(1) if found else "")
        return 404, {"Content-Type": "application/xml"}, (
            b"<Error><Code>NoSuchKey</Code><Message>none here</Message></Error>")


def test_kaniko_signs_s3_requests_for_the_rendered_region(
        kaniko_image: str, push_registry: services.RegistryServer, base_in_registry: str,
        aws_keys: dict[str, str], tmp_path: Path) -> None:
    """Why the region is always rendered. Without AWS_REGION kaniko's S3 client still sends
    its request to S3_ENDPOINT, but signed for the empty region (``<date>//s3/…``), which
    moto accepts and a server that checks signatures (AWS, MinIO) refuses."""
    recorder = S3Recorder()
    try:
        settings = Settings(s3_endpoint_url=recorder.url, s3_region="eu-west-3")
        config = _config("s3://ctx-bucket/ctx", push_registry, base_in_registry.split("/", 1)[0],
                         kaniko_image, "kaniko/region")
        request = KanikoRequest(image=parse_image_ref(f"{push_registry.host}/kaniko/region:{'c' * 24}"),
                                context_uri=f"s3://ctx-bucket/ctx/{'c' * 64}.tar.gz",
                                source_hash="c" * 64, inputs=BuildInputs())
        job = render_job(request, config, settings, namespace="builds")
        secrets = {REGISTRY_SECRET: {".dockerconfigjson": _docker_config(push_registry)}}
        rendered = run_pod(job, tmp_path / "rendered", secrets, aws_keys)
        signed_for = set(recorder.scopes)
        recorder.scopes.clear()
        (container,) = job["spec"]["template"]["spec"]["containers"]
        container["env"] = [e for e in container["env"] if e["name"] != "AWS_REGION"]
        bare = run_pod(job, tmp_path / "bare", secrets, aws_keys)
    finally:
        recorder.stop()
    assert rendered.exit_code != 0 and bare.exit_code != 0  # the object is not there
    assert signed_for and all(re.fullmatch(r"\d{8}/eu-west-3/s3/aws4_request", s) for s in signed_for)
    assert recorder.scopes and all(re.fullmatch(r"\d{8}//s3/aws4_request", s)
                                   for s in recorder.scopes), recorder.scopes


def test_gcs_context_through_the_emulator_host(
        kaniko_image: str, gcs_emulator: services.StandIn, push_registry: services.RegistryServer,
        base_in_registry: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    from workers.stores.gcs import GCSStore

    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    bucket = f"kaniko-{uuid.uuid4().hex[:12]}"
    storage.Client(project="test", credentials=AnonymousCredentials(),
                   client_options={"api_endpoint": gcs_emulator.endpoint}).create_bucket(bucket)
    settings = Settings(gcs_endpoint_url=gcs_emulator.endpoint)
    store = GCSStore(f"gs://{bucket}/ctx", settings)
    build = _prepare(store, settings, push_registry, base_in_registry, kaniko_image, "kaniko/gcs")
    # The variable Go's storage client honours (and then sends no credentials).
    assert env_of(build.job) == {"STORAGE_EMULATOR_HOST": gcs_emulator.endpoint}
    run = run_pod(build.job, tmp_path, build.secrets)
    _built_and_runs(build, run, push_registry, tmp_path)


def test_file_store_is_read_through_its_host_path_volume(
        kaniko_image: str, push_registry: services.RegistryServer, base_in_registry: str,
        tmp_path: Path) -> None:
    from workers.stores.file import FileStore

    directory = tmp_path / "contexts"
    directory.mkdir()
    settings = Settings()
    store = FileStore(directory.as_uri(), settings)
    build = _prepare(store, settings, push_registry, base_in_registry, kaniko_image, "kaniko/file")
    run = run_pod(build.job, tmp_path / "pod", build.secrets)
    _built_and_runs(build, run, push_registry, tmp_path)


def test_a_secret_build_arg_reaches_kaniko_from_its_secret_only(
        kaniko_image: str, push_registry: services.RegistryServer, base_in_registry: str,
        tmp_path: Path) -> None:
    """A value-less --build-arg makes kaniko read the value from its env, which the Job
    takes from the build-secrets Secret: the value is in no manifest, yet the RUN sees it."""
    from workers.stores.file import FileStore

    directory = tmp_path / "contexts"
    directory.mkdir()
    settings = Settings()
    value = f"token-{uuid.uuid4().hex}"
    build = _prepare(FileStore(directory.as_uri(), settings), settings, push_registry,
                     base_in_registry, kaniko_image, "kaniko/secret",
                     steps='ARG PIP_TOKEN\nRUN printf %s "$PIP_TOKEN" | sha256sum > /token.sha\n',
                     inputs=BuildInputs(secrets=("PIP_TOKEN",)))
    assert value not in json.dumps(build.job)
    secrets = {**build.secrets, settings.build_secrets_secret: {"PIP_TOKEN": value}}
    run = run_pod(build.job, tmp_path / "pod", secrets)
    assert run.exit_code == 0, run.log
    image = build.request.image
    digest = _manifest_digest(push_registry, image.repository, image.tag or "")
    shown = _image_file(push_registry, f"{push_registry.host}/{image.repository}@{digest}",
                        "/token.sha", tmp_path)
    assert shown.split()[0] == hashlib.sha256(value.encode()).hexdigest()


def test_a_push_refused_for_its_credentials_fails_the_pod(
        kaniko_image: str, moto_server: services.StandIn, push_registry: services.RegistryServer,
        base_in_registry: str, aws_keys: dict[str, str], tmp_path: Path) -> None:
    build, _ = _s3_build(moto_server, push_registry, base_in_registry, kaniko_image)
    wrong = base64.b64encode(b"kaniko-pusher:wrong-password").decode()
    secrets = {REGISTRY_SECRET: {".dockerconfigjson": json.dumps(
        {"auths": {push_registry.host: {"auth": wrong}}})}}
    run = run_pod(build.job, tmp_path, secrets, aws_keys)
    assert run.exit_code != 0
    assert "UNAUTHORIZED" in run.log or "401" in run.log, run.log
    assert run.termination_message == ""


def test_kaniko_cannot_address_azurite(kaniko_image: str, azurite: services.StandIn,
                                       tmp_path: Path) -> None:
    """Kaniko reads a Blob context only from https://<account>.blob.core.<cloud>/...: an
    Azurite URL (http://, account in the path) is no context it knows, so the Azure Blob
    path is tested up to the rendered Job (tests/workers/test_kaniko_job.py) and no further.
    """
    url = f"{azurite.endpoint}/{services.AZURITE_ACCOUNT}/contexts/context.tar.gz"
    job = {"spec": {"template": {"metadata": {}, "spec": {"containers": [{
        "image": kaniko_image, "args": [f"--context={url}", "--no-push"],
        "env": [{"name": "AZURE_STORAGE_ACCESS_KEY", "value": services.AZURITE_KEY}]}]}}}}
    run = run_pod(job, tmp_path, {})
    assert run.exit_code != 0
    assert "unknown build context prefix" in run.log, run.log


def test_kaniko_takes_the_azure_secret_as_a_base64_shared_key(
        kaniko_image: str, push_registry: services.RegistryServer, tmp_path: Path) -> None:
    """The Job wires builder.secret-name/secret-key into AZURE_STORAGE_ACCESS_KEY, which
    kaniko decodes as the account's base64 shared key before it reaches the network: a
    registry login there (what `config check` warns about) fails the pod on the spot."""
    config = config_from_mapping({"environment": {"type": "azure"}, "builder": {
        "type": "kaniko", "destination": f"{push_registry.host}/kaniko/azure",
        "build-context-store": "https://acct1.blob.core.windows.net/ctx",
        "kaniko-image": kaniko_image, "secret-name": "azure-key", "secret-key": ".dockerconfigjson"}})
    request = KanikoRequest(image=parse_image_ref(f"{push_registry.host}/kaniko/azure:{'d' * 24}"),
                            context_uri=f"https://acct1.blob.core.windows.net/ctx/{'d' * 64}.tar.gz",
                            source_hash="d" * 64, inputs=BuildInputs())
    job = render_job(request, config, Settings(), namespace="builds")
    login = {"azure-key": {".dockerconfigjson": _docker_config(push_registry)}}
    run = run_pod(job, tmp_path, login)
    assert run.exit_code != 0
    assert "decode account key" in run.log, run.log
