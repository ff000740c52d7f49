"""``buildq flower``: Flower for buildq's Celery app, never open to the network without a login."""

from __future__ import annotations

import os
import sys

from config.errors import ConfigError, ServiceError
from config.names import is_loopback_host
from config.settings import Settings
from tasks.connection import check_redis

#: Flower options ``buildq flower`` owns; passing them through would bypass its checks.
_OWNED = ("--address", "--port", "--basic_auth", "--basic-auth", "--auth")


def check_logins(value: str) -> str:
    """``user:password[,user:password]``, each part non-empty; returns it unchanged."""
    for login in value.split(","):
        user, sep, password = login.partition(":")
        if not sep or not user.strip() or not password:
            # Never echo the value: it is a password.
            raise ConfigError("the Flower login is not USER:PASSWORD.",
                              "Set BUILDQ_FLOWER_BASIC_AUTH (or --basic-auth) to user:password;"
                              " separate several logins with commas.")
    return value


def flower_command(settings: Settings, *, port: int, address: str | None, basic_auth: str | None,
                   no_auth: bool, extra: list[str]) -> tuple[list[str], dict[str, str]]:
    """The Flower command line and environment, or an error that explains what is missing."""
    if settings.embedded:
        raise ServiceError("Flower watches workers through Redis, and BUILDQ_REDIS_URL is not set.",
                           "Set BUILDQ_REDIS_URL to the Redis your workers use.")
    for arg in extra:
        if arg.split("=", 1)[0] in _OWNED:
            raise ConfigError(f"{arg.split('=', 1)[0]} is set by buildq flower itself.",
                              "Use buildq flower --port/--address/--basic-auth/--no-auth.")
    logins = basic_auth or settings.flower_basic_auth
    env = {k: v for k, v in os.environ.items()
           if k not in ("FLOWER_BASIC_AUTH", "FLOWER_UNAUTHENTICATED_API", "FLOWER_AUTH")}
    if no_auth:
        if logins and basic_auth:
            raise ConfigError("--no-auth and --basic-auth contradict each other.", "Pass one of them.")
        if address and not is_loopback_host(address):
            raise ConfigError(f"--no-auth serves Flower without a login, so it listens on 127.0.0.1,"
                              f" not {address}.", "Drop --address, or set a login with --basic-auth.")
        address = address or "127.0.0.1"
        # Flower refuses its API without a login unless told; safe here: loopback only.
        env["FLOWER_UNAUTHENTICATED_API"] = "true"
    else:
        if not logins:
            raise ConfigError(
                "Flower needs a login: it shows every build and can revoke tasks and stop workers.",
                "Set BUILDQ_FLOWER_BASIC_AUTH=user:password (or pass --basic-auth), or run"
                " `buildq flower --no-auth` to serve it on 127.0.0.1 only.")
        # In the environment, not on the command line, where `ps` would show the password.
        env["FLOWER_BASIC_AUTH"] = check_logins(logins)
        address = address or "0.0.0.0"
    argv = [sys.executable, "-m", "celery", "-A", "tasks.app:app", "flower",
            f"--port={port}", f"--address={address}", *extra]
    return argv, env


def run_flower(settings: Settings, *, port: int, address: str | None, basic_auth: str | None,
               no_auth: bool, extra: list[str]) -> None:
    argv, env = flower_command(settings, port=port, address=address, basic_auth=basic_auth,
                               no_auth=no_auth, extra=extra)
    check_redis(settings)
    # Replace this process, so signals from compose or kubelet reach Flower itself.
    os.execve(argv[0], argv, env)
