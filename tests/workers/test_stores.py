"""Cloud context stores against their real stand-ins: moto server (S3),
gcp-storage-emulator (GCS) and Azurite (Azure Blob, over HTTP with the account key and
over HTTPS with a token credential). Every request goes over a real socket."""

from __future__ import annotations

import base64
import io
import json
import os
import random
import tarfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from config.errors import ConfigError, ContextStoreError, TransientContextStoreError
from config.settings import Settings
from tests import services
from workers.context import BuildInputs, write_context
from workers.stores import ContextStore, store_for_url
from workers.stores.azure import AzureBlobStore
from workers.stores.gcs import GCSStore
from workers.stores.s3 import S3Store
from workers.stores.streaming import PartPipeline

AZURE_URL = f"https://{services.AZURITE_ACCOUNT}.blob.core.windows.net"


@pytest.fixture(autouse=True)
def cloud_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # What the cloud libraries read themselves: fake AWS keys (moto checks no signature)
    # and no stray emulator or profile from the developer's shell.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "STORAGE_EMULATOR_HOST", "REQUESTS_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)


# --- a context to upload ---------------------------------------------------------------


def make_tree(root: Path, big: int = 0) -> Path:
    """A small app, plus ``big`` bytes of incompressible data to force several parts."""
    root.mkdir(parents=True)
    (root / "Dockerfile").write_text("FROM scratch\nCOPY . /app\n")
    (root / "src").mkdir()
    for i in range(20):
        (root / "src" / f"mod{i}.py").write_text(f"def f{i}(x):\n    return x * {i}\n" * 50)
    if big:
        (root / "blob.bin").write_bytes(random.Random(7).randbytes(big))
    return root


def contents(archive: io.BufferedIOBase | bytes) -> dict[str, bytes]:
    data = archive if isinstance(archive, bytes) else archive.read()
    out: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for member in tar:
            if member.isfile():
                extracted = tar.extractfile(member)
                assert extracted is not None
                out[member.name] = extracted.read()
    return out


def source_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# --- one case per backend --------------------------------------------------------------


@dataclass
class Case:
    name: str
    store: ContextStore
    #: Names of multipart uploads still pending (S3 only; others have none to leak).
    pending: Callable[[], list[str]]


def _bucket() -> str:
    return f"ctx-{uuid.uuid4().hex[:12]}"


def s3_case(server: services.StandIn, create: bool = True) -> Case:
    import boto3

    bucket = _bucket()
    client = boto3.client("s3", endpoint_url=server.endpoint)
    if create:
        client.create_bucket(Bucket=bucket)
    store = S3Store(f"s3://{bucket}/builds/", Settings(s3_endpoint_url=server.endpoint))

    def pending() -> list[str]:
        return [u["Key"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]

    return Case("s3", store, pending)


def gcs_case(server: services.StandIn, monkeypatch: pytest.MonkeyPatch, create: bool = True) -> Case:
    # The store must find the emulator through its settings alone, not the environment.
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    bucket = _bucket()
    if create:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        storage.Client(project="test", credentials=AnonymousCredentials(),
                       client_options={"api_endpoint": server.endpoint}).create_bucket(bucket)
    return Case("gcs", GCSStore(f"gs://{bucket}/builds", Settings(gcs_endpoint_url=server.endpoint)),
                list)


def azure_settings(server: services.StandIn, key: str = services.AZURITE_KEY) -> Settings:
    return Settings(azure_blob_endpoint=f"{server.endpoint}/{services.AZURITE_ACCOUNT}",
                    azure_storage_key=key)


def azure_case(server: services.StandIn, create: bool = True, credential: Any = None,
               settings: Settings | None = None) -> Case:
    from azure.storage.blob import BlobServiceClient

    container = _bucket()
    if create:
        service = BlobServiceClient(f"{server.endpoint}/{services.AZURITE_ACCOUNT}",
                                    credential={"account_name": services.AZURITE_ACCOUNT,
                                                "account_key": services.AZURITE_KEY})
        service.create_container(container)
    store = AzureBlobStore(f"{AZURE_URL}/{container}/builds", settings or azure_settings(server),
                           credential=credential)
    return Case("azure", store, list)


@pytest.fixture(params=["s3", "gcs", "azure"])
def case(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Case:
    if request.param == "s3":
        return s3_case(request.getfixturevalue("moto_server"))
    if request.param == "gcs":
        return gcs_case(request.getfixturevalue("gcs_emulator"), monkeypatch)
    return azure_case(request.getfixturevalue("azurite"))


# --- upload, read back, reuse, delete -------------------------------------------------------


@pytest.mark.parametrize("big", [0, 20 << 20], ids=["one-request", "multipart"])
def test_context_round_trip_exists_reuse_delete(case: Case, tmp_path: Path, big: int) -> None:
    root = make_tree(tmp_path / "src", big=big)
    key = f"{'ab' * 32}.tar.gz"
    assert not case.store.exists(key)

    with case.store.writer(key) as out:
        written = write_context(root, BuildInputs(), out)
    assert written > big * 0.99  # random data does not compress

    # Reuse: the caller checks exists() and skips a second upload of the same hash.
    assert case.store.exists(key)
    with case.store.reader(key) as stream:
        assert contents(stream.read()) == source_files(root)
    sink = io.BytesIO()
    case.store.download(key, sink)
    assert len(sink.getvalue()) == written
    assert case.pending() == []

    case.store.delete(key)
    assert not case.store.exists(key)
    case.store.delete(key)  # already gone: fine


def test_many_small_writes_of_odd_sizes(case: Case) -> None:
    data = random.Random(3).randbytes(19 << 20)
    sizes = random.Random(4)
    with case.store.writer("odd.bin") as out:
        pos = 0
        while pos < len(data):
            step = sizes.choice([1, 7, 4096, 65537, 1 << 20, 9 << 20])
            out.write(data[pos:pos + step])
            pos += step
    with case.store.reader("odd.bin") as stream:
        assert stream.read() == data
    case.store.delete("odd.bin")


def test_empty_object(case: Case) -> None:
    with case.store.writer("empty"):
        pass
    assert case.store.exists("empty")
    with case.store.reader("empty") as stream:
        assert stream.read() == b""
    case.store.delete("empty")


@pytest.mark.parametrize("size", [1000, 20 << 20], ids=["small", "multipart"])
def test_error_inside_writer_leaves_no_object(case: Case, size: int) -> None:
    with pytest.raises(RuntimeError, match="packing failed"), case.store.writer("broken.tar.gz") as out:
        out.write(random.Random(1).randbytes(size))
        raise RuntimeError("packing failed")
    assert not case.store.exists("broken.tar.gz")
    assert case.pending() == []  # S3: the multipart upload was aborted, no parts left


def test_reading_a_missing_object_is_a_clear_error(case: Case) -> None:
    with pytest.raises(ContextStoreError, match="does not exist"), case.store.reader("nope.tar.gz"):
        pass


def test_uri_is_what_kaniko_reads(case: Case) -> None:
    uri = case.store.uri("h.tar.gz")
    expected = {"s3": r"^s3://ctx-[0-9a-f]{12}/builds/h\.tar\.gz$",
                "gcs": r"^gs://ctx-[0-9a-f]{12}/builds/h\.tar\.gz$",
                "azure": rf"^{AZURE_URL}/ctx-[0-9a-f]{{12}}/builds/h\.tar\.gz$"}[case.name]
    assert __import__("re").match(expected, uri), uri


# --- missing bucket, stopped server, access denied -------------------------------------------


def test_missing_bucket_is_a_clear_error(request: pytest.FixtureRequest,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    cases = [s3_case(request.getfixturevalue("moto_server"), create=False),
             azure_case(request.getfixturevalue("azurite"), create=False)]
    for case in cases:
        with pytest.raises(ContextStoreError, match=r"(bucket|container) '.*' .* does not exist") as info, \
                case.store.writer("x.tar.gz") as out:
            out.write(b"data")
        assert not info.value.transient, case.name
    gcs = gcs_case(request.getfixturevalue("gcs_emulator"), monkeypatch, create=False)
    with pytest.raises(ContextStoreError) as info, gcs.store.writer("x.tar.gz") as out:
        out.write(b"data")
    assert not info.value.transient


@pytest.mark.parametrize("backend", ["s3", "gcs", "azure"])
def test_stopped_server_is_transient(backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import workers.stores.azure as azure_module
    import workers.stores.gcs as gcs_module

    # Keep the libraries' own retries short: the chain retries transient errors itself.
    monkeypatch.setattr(gcs_module, "RETRY_TIMEOUT", 2.0)
    monkeypatch.setattr(azure_module, "RETRY_TOTAL", 1)
    starts: dict[str, Callable[[Path], services.StandIn]] = {
        "s3": services.start_moto, "gcs": services.start_gcs_emulator,
        "azure": lambda root: services.start_azurite(root)}
    try:
        server = starts[backend](tmp_path / backend)
    except (ImportError, FileNotFoundError) as exc:
        pytest.skip(f"storage stand-in unavailable: {exc}")
    try:
        case = {"s3": lambda: s3_case(server), "gcs": lambda: gcs_case(server, monkeypatch),
                "azure": lambda: azure_case(server)}[backend]()
        assert not case.store.exists("k")  # the store works while the server runs
    finally:
        server.stop()

    began = time.monotonic()
    with pytest.raises(TransientContextStoreError):
        case.store.exists("k")
    with pytest.raises(TransientContextStoreError), case.store.writer("k") as out:
        out.write(b"x" * 100)
    with pytest.raises(TransientContextStoreError):
        case.store.delete("k")
    assert time.monotonic() - began < 60


def test_s3_access_denied_names_the_missing_permission(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """moto enforces IAM policies once told to: a user allowed only reads cannot write or delete."""
    import boto3
    import requests

    try:
        server = services.start_moto(tmp_path / "moto-iam")
    except ImportError as exc:
        pytest.skip(f"storage stand-in unavailable: {exc}")
    try:
        admin = boto3.client("s3", endpoint_url=server.endpoint)
        admin.create_bucket(Bucket="locked")
        iam = boto3.client("iam", endpoint_url=server.endpoint)
        iam.create_user(UserName="reader")
        policy = {"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"], "Resource": "*"}]}
        iam.put_user_policy(UserName="reader", PolicyName="read", PolicyDocument=json.dumps(policy))
        keys = iam.create_access_key(UserName="reader")["AccessKey"]
        # From now on moto checks every request's key and policy.
        requests.post(f"{server.endpoint}/moto-api/reset-auth", data=b"0", timeout=5)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", keys["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", keys["SecretAccessKey"])
        store = S3Store("s3://locked/ctx", Settings(s3_endpoint_url=server.endpoint))

        assert not store.exists("a.tar.gz")  # allowed
        with pytest.raises(ContextStoreError, match="s3:PutObject") as info, store.writer("a.tar.gz") as out:
            out.write(b"x" * 10)
        assert not info.value.transient
        assert keys["SecretAccessKey"] not in str(info.value)
        with pytest.raises(ContextStoreError, match="s3:DeleteObject"):
            store.delete("a.tar.gz")

        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWN000000000")
        stranger = S3Store("s3://locked/ctx", Settings(s3_endpoint_url=server.endpoint))
        with pytest.raises(ContextStoreError, match="rejected the worker's AWS credentials"):
            stranger.delete("a.tar.gz")
    finally:
        server.stop()


def test_azure_wrong_key_names_the_role_and_hides_the_key(azurite: services.StandIn) -> None:
    wrong = base64.b64encode(b"not the key" * 6).decode()
    case = azure_case(azurite, settings=azure_settings(azurite, key=wrong))
    for attempt in (lambda: case.store.exists("k"), lambda: case.store.delete("k")):
        with pytest.raises(ContextStoreError, match="Storage Blob Data Contributor") as info:
            attempt()
        assert wrong not in str(info.value) and not info.value.transient
    assert wrong not in repr(case.store)
    with pytest.raises(ContextStoreError, match="Storage Blob Data Contributor"), \
            case.store.writer("k") as out:
        out.write(b"x")


# --- Azure with a token credential over HTTPS (what DefaultAzureCredential yields) -----------


class AzuriteToken:
    """A TokenCredential whose JWTs carry what Azurite checks (issuer, audience, validity);
    Azurite does not verify signatures, so none is made."""

    def __init__(self, audience: str = "https://storage.azure.com") -> None:
        self.audience = audience
        self.requested: list[tuple[str, ...]] = []

    def get_token(self, *scopes: str, **_: Any) -> Any:
        from azure.core.credentials import AccessToken

        self.requested.append(scopes)
        now = int(time.time())
        claims = {"iss": "https://sts.windows.net/00000000-0000-0000-0000-000000000000/",
                  "aud": self.audience, "iat": now - 60, "nbf": now - 60, "exp": now + 3600,
                  "oid": str(uuid.uuid4()), "tid": "00000000-0000-0000-0000-000000000000"}

        def part(obj: dict[str, Any]) -> str:
            return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

        token = f"{part({'alg': 'RS256', 'typ': 'JWT'})}.{part(claims)}.c2lnbmF0dXJl"
        return AccessToken(token, now + 3600)


@pytest.fixture
def trust_azurite_cert(azurite_https: services.StandIn, monkeypatch: pytest.MonkeyPatch) -> None:
    # requests (under azure-core) reads REQUESTS_CA_BUNDLE itself.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(azurite_https.root / "cert.pem"))


@pytest.mark.usefixtures("trust_azurite_cert")
def test_azure_token_credential_over_https(azurite_https: services.StandIn, tmp_path: Path) -> None:
    token = AzuriteToken()
    case = azure_case(azurite_https, credential=token, settings=Settings(
        azure_blob_endpoint=f"{azurite_https.endpoint}/{services.AZURITE_ACCOUNT}"))
    root = make_tree(tmp_path / "src", big=9 << 20)
    assert not case.store.exists("t.tar.gz")
    with case.store.writer("t.tar.gz") as out:
        write_context(root, BuildInputs(), out)
    assert case.store.exists("t.tar.gz")
    with case.store.reader("t.tar.gz") as stream:
        assert contents(stream.read()) == source_files(root)
    case.store.delete("t.tar.gz")
    assert not case.store.exists("t.tar.gz")
    assert token.requested and all("https://storage.azure.com/.default" in s for s in token.requested)


@pytest.mark.usefixtures("trust_azurite_cert")
def test_azure_token_for_another_audience_is_refused(azurite_https: services.StandIn) -> None:
    case = azure_case(azurite_https, credential=AzuriteToken(audience="https://management.azure.com"),
                      settings=Settings(azure_blob_endpoint=f"{azurite_https.endpoint}/{services.AZURITE_ACCOUNT}"))
    with pytest.raises(ContextStoreError, match="Storage Blob Data Contributor") as info:
        case.store.exists("k")
    assert not info.value.transient


# --- dispatch --------------------------------------------------------------------------


def test_store_for_url_picks_the_backend_and_keeps_settings() -> None:
    settings = Settings(s3_endpoint_url="http://127.0.0.1:1", azure_storage_key="c2VjcmV0",
                        gcs_endpoint_url="http://127.0.0.1:2")
    s3 = store_for_url("s3://bucket/some/prefix/", settings)
    assert isinstance(s3, S3Store) and (s3.bucket, s3.prefix) == ("bucket", "some/prefix")
    assert s3.endpoint_url == "http://127.0.0.1:1"
    assert s3.uri("k.tar.gz") == "s3://bucket/some/prefix/k.tar.gz"
    gcs = store_for_url("gs://bucket", settings)
    assert isinstance(gcs, GCSStore) and gcs.uri("k") == "gs://bucket/k"
    assert gcs.client._connection.API_BASE_URL == "http://127.0.0.1:2"
    azure = store_for_url("https://acct.blob.core.windows.net/ctr/p", settings)
    assert isinstance(azure, AzureBlobStore)
    assert (azure.account, azure.container, azure.prefix) == ("acct", "ctr", "p")
    assert azure.account_url == "https://acct.blob.core.windows.net"
    assert azure.uri("k") == "https://acct.blob.core.windows.net/ctr/p/k"
    assert "c2VjcmV0" not in repr(azure)
    # Existing callers pass no settings: they come from the environment, where the
    # emulator variable Google's clients know is honoured too.
    assert isinstance(store_for_url("s3://bucket/p"), S3Store)
    assert Settings.from_env({"STORAGE_EMULATOR_HOST": "http://127.0.0.1:3"}).gcs_endpoint_url \
        == "http://127.0.0.1:3"
    assert Settings.from_env({"BUILDQ_GCS_ENDPOINT_URL": "http://127.0.0.1:4",
                              "STORAGE_EMULATOR_HOST": "http://127.0.0.1:3"}).gcs_endpoint_url \
        == "http://127.0.0.1:4"


@pytest.mark.parametrize("url", ["https://example.com/ctr", "ftp://host/x", "https://acct.blob.core.windows.net/",
                                 "s3:///nobucket"])
def test_store_for_url_rejects_what_it_cannot_write(url: str) -> None:
    with pytest.raises(ConfigError):
        store_for_url(url, Settings())


# --- the part pipeline: order, bounded memory, failures -------------------------------------


def test_part_pipeline_keeps_order_and_bounds_parts_in_flight() -> None:
    lock = threading.Lock()
    live = {"now": 0, "max": 0}
    received: dict[int, bytes] = {}

    def send(number: int, part: bytes) -> int:
        with lock:
            live["now"] += 1
            live["max"] = max(live["max"], live["now"])
        time.sleep(0.01 * random.random())
        received[number] = part
        with lock:
            live["now"] -= 1
        return number

    started: list[bool] = []
    pipeline: PartPipeline[int] = PartPipeline(send, lambda n: 1000 + n, lambda: started.append(True),
                                               threads=3, in_flight=3)
    data = random.Random(9).randbytes(100_000)
    pos, rng = 0, random.Random(2)
    while pos < len(data):
        step = rng.randint(1, 5000)
        pipeline.write(data[pos:pos + step])
        pos += step
    results, whole = pipeline.finish()
    assert whole is None and started == [True]
    assert results == list(range(1, len(results) + 1))
    assert b"".join(received[n] for n in results) == data
    assert all(len(received[n]) == 1000 + n - 1 for n in results[:-1])
    assert live["max"] <= 3


def test_part_pipeline_small_object_is_handed_back_whole() -> None:
    pipeline: PartPipeline[None] = PartPipeline(lambda n, p: None, lambda n: 1 << 20)
    pipeline.write(b"abc")
    assert pipeline.finish() == ([], b"abc")


def test_part_pipeline_failure_surfaces_on_the_next_write() -> None:
    def send(number: int, part: bytes) -> None:
        raise TransientContextStoreError("part failed")

    pipeline: PartPipeline[None] = PartPipeline(send, lambda n: 10, threads=1, in_flight=1)
    with pytest.raises(TransientContextStoreError):
        for _ in range(100):
            pipeline.write(b"x" * 10)
            time.sleep(0.001)
    pipeline.abort()


def test_env_is_left_to_the_libraries() -> None:
    # The stores read no settings from the environment except what the SDKs read.
    import workers.stores.azure as azure_module
    import workers.stores.gcs as gcs_module
    import workers.stores.s3 as s3_module

    for module in (azure_module, gcs_module, s3_module):
        assert "os.environ" not in Path(module.__file__ or "").read_text()
    assert os.environ.get("AWS_ACCESS_KEY_ID") == "testing"


@pytest.fixture(scope="module", autouse=True)
def _quiet_azure_logs() -> Iterator[None]:
    import logging

    # azure-core logs every request at INFO with headers (redacted), which floods -x output.
    logger = logging.getLogger("azure")
    level = logger.level
    logger.setLevel(logging.WARNING)
    yield
    logger.setLevel(level)
