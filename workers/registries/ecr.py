"""Amazon ECR: ``<account>.dkr.ecr.<region>.amazonaws.com/<repository>``.

Credentials come from boto3's default chain (environment, profile, IRSA, instance
role) in the registry's region; ``Settings.ecr_endpoint_url`` points the ECR API
elsewhere (moto in tests). The registry login is ``AWS:<token>`` from
``GetAuthorizationToken``, kept process-wide until shortly before its ``expiresAt``
(twelve hours on AWS; see ``workers.registries.base.renew_at``). The tag check asks the
ECR API (``DescribeImages``), not the registry: it is the action IAM policies grant, and
it tells a missing repository from a missing tag.
"""

from __future__ import annotations

import base64
import binascii
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from config.errors import RegistryError, TransientRegistryError
from config.references import ImageRef, classify_registry
from workers.registries.base import LOGIN_EXPIRY_MARGIN, Login, Registry, renew_at
from workers.sdk_errors import BOTOCORE, Fault

if TYPE_CHECKING:
    from config.settings import Settings

T = TypeVar("T")

_NO_CREDENTIALS_HINT = ("Give the workers an IAM role (instance profile, IRSA) or set AWS_PROFILE or "
                        "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in their environment.")
#: The IAM actions the Docker pool's push needs, named together in errors and by doctor.
PUSH_ACTIONS = ("ecr:InitiateLayerUpload, ecr:UploadLayerPart, ecr:CompleteLayerUpload, "
                "ecr:BatchCheckLayerAvailability, ecr:PutImage")


@dataclass(frozen=True)
class _Login:
    password: str
    renew_at: float


# Process-wide: each task builds a fresh backend, and one token serves them all for hours.
_logins: dict[tuple[str, str, str], _Login] = {}
_logins_lock = threading.Lock()


class ECRRegistry(Registry):
    """ECR through boto3; pushes and logins still speak the registry v2 API."""

    pull_permission = "ecr:DescribeImages"
    push_permission = "ecr:InitiateLayerUpload"

    def __init__(self, host: str, settings: Settings, session: Any = None) -> None:
        super().__init__(host, settings)
        kind = classify_registry(ImageRef(self.host, "probe"))
        if kind.kind != "ecr" or not kind.account or not kind.region:
            raise RegistryError(f"{self.host} is not an ECR registry host.",
                                "ECR hosts look like <account-id>.dkr.ecr.<region>.amazonaws.com.")
        self.account: str = kind.account
        self.region: str = kind.region
        self._boto_session = session
        self._client_cache: Any = None

    # -- boto3 ---------------------------------------------------------------------------

    @property
    def _client(self) -> Any:
        if self._client_cache is None:
            import boto3
            from botocore.config import Config

            session = self._boto_session or boto3.session.Session()
            self._client_cache = session.client(
                "ecr", region_name=self.region, endpoint_url=self.settings.ecr_endpoint_url,
                config=Config(retries={"mode": "standard", "max_attempts": 3},
                              connect_timeout=5, read_timeout=30))
        return self._client_cache

    def _call(self, action: str, fn: Callable[[], T], what: str) -> T:
        """Run one ECR API call; its failures become buildq errors naming ``action``.

        The service's own answers that are not faults (a missing image or repository, one
        that already exists) come back as botocore's ClientError for the caller to read.
        """
        try:
            return fn()
        except Exception as exc:
            if not BOTOCORE.owns(exc):
                raise
            read = BOTOCORE.read(exc)
            fault = read.fault
            if fault is Fault.UNREACHABLE:
                raise TransientRegistryError(
                    f"the ECR API for {self.region} could not be reached ({type(exc).__name__}).",
                    "Check the network path to ECR (or BUILDQ_ECR_ENDPOINT_URL); buildq retries.",
                ) from None
            if fault is Fault.BUSY:
                raise TransientRegistryError(
                    f"the ECR API in {self.region} answered {read.code} to {action}.",
                    "buildq retries with backoff.") from None
            if fault is Fault.NO_CREDENTIALS:
                raise RegistryError(
                    f"no AWS credentials for ECR {self.host}: boto3's default chain found none.",
                    _NO_CREDENTIALS_HINT) from None
            if fault is Fault.REJECTED:
                raise RegistryError(
                    f"AWS rejected the workers' credentials ({read.code}) for {action} in "
                    f"{self.region}.",
                    "Check the access key, session token and clock of the workers; "
                    + _NO_CREDENTIALS_HINT) from None
            if fault is Fault.DENIED:
                raise RegistryError(
                    f"AWS denied {action} on {what} in {self.region} ({read.code}): the credentials "
                    f"boto3 found lack the IAM permission {action}.",
                    f"Allow {action} on arn:aws:ecr:{self.region}:{self.account}:repository/* "
                    "in the IAM policy of the role or user the workers run as.",
                ) from None
            if fault is Fault.FAILED:
                raise RegistryError(f"the ECR API call {action} failed: {type(exc).__name__}.",
                                    "Check the AWS configuration of the workers.") from None
            raise

    # -- Registry ------------------------------------------------------------------------

    def credentials_hint(self) -> str:
        return ("Give the workers AWS credentials (role, profile or environment) allowed "
                f"ecr:GetAuthorizationToken, {self.pull_permission} and {PUSH_ACTIONS}.")

    def login(self) -> Login:
        key = (self.account, self.region, self.settings.ecr_endpoint_url or "")
        now = time.time()
        with _logins_lock:
            cached = _logins.get(key)
        if cached and cached.renew_at > now:
            return Login("AWS", cached.password, cached.renew_at)
        answer = self._call(
            "ecr:GetAuthorizationToken",
            lambda: self._client.get_authorization_token(registryIds=[self.account]),
            f"registry {self.account}")
        data = (answer.get("authorizationData") or [{}])[0]
        try:
            decoded = base64.b64decode(data.get("authorizationToken") or "", validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            decoded = ""
        user, sep, password = decoded.partition(":")
        if not sep or not password:
            raise TransientRegistryError(
                f"ECR in {self.region} returned an authorization token buildq cannot read.",
                "buildq retries; if this persists, check BUILDQ_ECR_ENDPOINT_URL.")
        expires = data.get("expiresAt")
        # No expiry (or one already past) means: do not reuse it.
        expires_at = expires.timestamp() if hasattr(expires, "timestamp") else float(expires or 0)
        renew = renew_at(now, expires_at, LOGIN_EXPIRY_MARGIN)
        with _logins_lock:
            _logins[key] = _Login(password, renew)
        return Login(user, password, renew)

    def identity(self) -> str:
        credentials = (self._boto_session or _default_session()).get_credentials()
        if credentials is None:
            raise RegistryError(
                f"no AWS credentials for ECR {self.host}: boto3's default chain found none.",
                _NO_CREDENTIALS_HINT)
        # The key id is not a secret, but its tail is enough to tell which one is used.
        key_id = str(credentials.access_key or "")
        return (f"AWS access key …{key_id[-4:]} from boto3's {credentials.method} credentials, "
                f"account {self.account}, region {self.region}")

    def manifest_digest(self, ref: ImageRef, tag: str) -> str | None:
        image_id = {"imageDigest": tag} if tag.startswith("sha256:") else {"imageTag": tag}
        from botocore.exceptions import ClientError

        def describe() -> dict[str, Any]:
            result: dict[str, Any] = self._client.describe_images(
                registryId=self.account, repositoryName=ref.repository, imageIds=[image_id])
            return result

        try:
            answer = self._call("ecr:DescribeImages", describe, f"repository {ref.repository}")
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code == "ImageNotFoundException":
                return None
            if code == "RepositoryNotFoundException":
                self._missing_repository(ref)
                # A repository created just now holds no tags.
                return None
            raise RegistryError(f"ECR DescribeImages on {ref.repository} failed ({code}).",
                                "Check the repository name in builder.destination.") from None
        details = answer.get("imageDetails") or []
        digest = details[0].get("imageDigest") if details else None
        return str(digest) if digest else None

    def _missing_repository(self, ref: ImageRef) -> None:
        if not self.settings.create_repositories:
            raise RegistryError(
                f"the ECR repository {ref.repository} does not exist in account {self.account}, "
                f"region {self.region}.",
                f"Create it (aws ecr create-repository --repository-name {ref.repository} "
                f"--region {self.region}), or set BUILDQ_CREATE_REPOSITORIES=true and allow "
                "ecr:CreateRepository.")
        from botocore.exceptions import ClientError

        try:
            self._call("ecr:CreateRepository", lambda: self._client.create_repository(
                registryId=self.account, repositoryName=ref.repository), ref.repository)
        except ClientError as exc:
            # Another worker created it between our two calls: exactly what we wanted.
            if exc.response.get("Error", {}).get("Code") != "RepositoryAlreadyExistsException":
                raise RegistryError(f"ECR CreateRepository {ref.repository} failed.",
                                    "Create the repository by hand.") from None


def _default_session() -> Any:
    import boto3

    return boto3.session.Session()
