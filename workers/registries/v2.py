"""A plain registry v2: credentials from the settings, else from docker's config.json."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any
from urllib.parse import urlsplit

from config.errors import ConfigError
from workers.registries.base import Login, Registry

#: Keys under which ``docker login`` files Docker Hub credentials.
DOCKER_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "docker.io",
                   "registry-1.docker.io")


def _auth_key_host(key: str) -> str:
    # config.json keys come as "host:port", "https://host:port" or "https://host/v1/".
    if "://" in key:
        return urlsplit(key).netloc
    return key.split("/", 1)[0]


class V2Registry(Registry):
    """Any registry speaking the v2 API with Basic or Bearer-token auth."""

    def login(self) -> Login | None:
        # Static credentials: they do not expire, and are read again with a new instance.
        username = self.settings.registry_username
        password = self.settings.registry_password
        if username and password:
            return Login(username, password)
        found = self._from_docker_config()
        return Login(*found) if found else None

    def _from_docker_config(self) -> tuple[str, str] | None:
        path = self.settings.docker_config_dir / "config.json"
        try:
            config: Any = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"docker's config file {path} cannot be read: {type(exc).__name__}.",
                "Fix or remove it, or point DOCKER_CONFIG at a directory with a valid config.json.",
            ) from None
        auths = config.get("auths") if isinstance(config, dict) else None
        if not isinstance(auths, dict):
            return None
        wanted = {self.host}
        if self.host in DOCKER_HUB_KEYS:
            wanted.update(DOCKER_HUB_KEYS)
        for key, entry in auths.items():
            if (key in wanted or _auth_key_host(key) in wanted) and isinstance(entry, dict):
                creds = _entry_credentials(entry)
                if creds:
                    return creds
        return None


def _entry_credentials(entry: dict[str, Any]) -> tuple[str, str] | None:
    encoded = entry.get("auth")
    if isinstance(encoded, str) and encoded:
        try:
            decoded = base64.b64decode(encoded, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            decoded = ""
        username, sep, password = decoded.partition(":")
        if sep and username:
            return username, password
    user, secret = entry.get("username"), entry.get("password")
    if isinstance(user, str) and isinstance(secret, str) and user:
        return user, secret
    return None
