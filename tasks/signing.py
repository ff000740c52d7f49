"""Signed requests: Celery's ``auth`` serializer, and who signed the message being run.

With ``BUILDQ_SIGNING_KEY`` and ``BUILDQ_SIGNING_CERT`` set, every task message this
process sends is signed with its key (RSA-PSS over the JSON body, as Celery's message
signing does) and names its certificate; a worker accepts only messages whose signature
verifies against a certificate in ``BUILDQ_SIGNING_CERTS_DIR``. Anything else (plain
JSON, a bad signature, a certificate it does not hold, an expired one) is refused before
the task's code runs, and the worker logs the refusal. Results and events stay JSON.

The serializer is Celery's own; the one addition is that a verified message leaves its
signer's certificate subject behind for the task that runs it (see :func:`take_signer`),
so the record can name who asked with a verified identity.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from config.errors import ConfigError
from config.settings import Settings

#: Name and content type of the serializer, as Celery's ``setup_security`` registers it.
SERIALIZER = "auth"
CONTENT_TYPE = "application/data"
#: Digest of the signatures (Celery's default).
DIGEST = "sha256"

_last = threading.local()
log = logging.getLogger(__name__)


def _read(path: Any, name: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(f"{name}={path} cannot be read: {exc.strerror}.",
                          f"Point {name} at a PEM file this process can read.") from None


def enable(settings: Settings) -> None:
    """Register the signing serializer with this process's key, certificate and trust store."""
    try:
        from celery.security.certificate import Certificate, FSCertStore
        from celery.security.key import PrivateKey
        from celery.security.serialization import SecureSerializer
    except Exception as exc:  # ImproperlyConfigured without cryptography
        raise ConfigError(f"message signing needs the cryptography package: {exc}",
                          "pip install 'cryptography>=41'.") from None
    from kombu.serialization import registry

    if settings.signing_key is None or settings.signing_cert is None:
        missing = "BUILDQ_SIGNING_KEY" if settings.signing_key is None else "BUILDQ_SIGNING_CERT"
        raise ConfigError(f"message signing needs both BUILDQ_SIGNING_KEY and "
                          f"BUILDQ_SIGNING_CERT; {missing} is not set.",
                          "Set both (the PEM key and its certificate), or neither.")
    try:
        key = PrivateKey(_read(settings.signing_key, "BUILDQ_SIGNING_KEY"))
        cert = Certificate(_read(settings.signing_cert, "BUILDQ_SIGNING_CERT"))
        store = (FSCertStore(str(settings.signing_certs_dir))
                 if settings.signing_certs_dir is not None else None)
    except ConfigError:
        raise
    except Exception as exc:  # SecurityError: not PEM, not RSA, expired, duplicate ids
        raise ConfigError(f"message signing cannot start: {exc}",
                          "BUILDQ_SIGNING_KEY must be an RSA private key (PEM, no password), "
                          "BUILDQ_SIGNING_CERT its certificate, and BUILDQ_SIGNING_CERTS_DIR "
                          "a directory of unexpired PEM certificates with distinct serials."
                          ) from None
    if cert.has_expired():
        raise ConfigError(f"BUILDQ_SIGNING_CERT {settings.signing_cert} has expired.",
                          "Make a new certificate and add it to the workers' certificates "
                          "directory (see the README, 'Signed requests').")

    class Serializer(SecureSerializer):
        def deserialize(self, data: Any) -> Any:
            try:
                body = super().deserialize(data)  # raises SecurityError unless verified
            except Exception as exc:
                log.error("rejected a task message not signed by a trusted key: %s", exc)
                raise
            _last.signer = subject(self._cert_store[self._unpack(data)["signer"]])
            return body

    serializer = Serializer(key, cert, store, DIGEST, serializer="json")
    registry.register(SERIALIZER, serializer.serialize, serializer.deserialize,
                      content_type=CONTENT_TYPE, content_encoding="utf-8")


def subject(cert: Any) -> str:
    """A certificate's subject, RFC 4514 (``CN=alice,O=team``)."""
    return str(cert._cert.subject.rfc4514_string())


def take_signer() -> str | None:
    """The subject of the certificate that signed the message this thread decoded last,
    once: the task that message carries reads it as it starts."""
    signer: str | None = getattr(_last, "signer", None)
    _last.signer = None
    return signer


def celery_options(settings: Settings) -> dict[str, Any]:
    """App settings for signing: tasks (and remote control) signed, only signed accepted."""
    if not settings.signing:
        return {}
    return {"task_serializer": SERIALIZER, "accept_content": [SERIALIZER],
            "result_serializer": "json", "result_accept_content": ["json"],
            "event_serializer": "json"}
