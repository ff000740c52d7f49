"""The destination policy's rule, decided from the environment and the operator's own
launch-config, never from the request (the cluster tests send requests to workers)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from config.errors import ForbiddenError
from config.policy import DestinationPolicy, check_push_targets
from config.references import parse_destination
from config.settings import Settings

ECR = "123456789012.dkr.ecr.us-east-1.amazonaws.com"


def allowed(policy: DestinationPolicy, destination: str) -> bool:
    return policy.allows(parse_destination(destination))


def test_patterns_replace_the_default_and_glob_over_registry_and_repository() -> None:
    policy = DestinationPolicy.from_settings(
        Settings.from_env({"BUILDQ_ALLOWED_DESTINATIONS": f"{ECR.upper()}/ml-*, ghcr.io/org/app"}))
    assert allowed(policy, f"{ECR}/ml-train")
    assert allowed(policy, f"{ECR}/ml-train/nested")  # * crosses '/'
    assert allowed(policy, "ghcr.io/org/app")
    assert not allowed(policy, "ghcr.io/org/app2")
    assert not allowed(policy, f"{ECR}/prod")
    # Named patterns are the whole rule: loopback registries are not added to them.
    assert not allowed(policy, "127.0.0.1:5000/ml-x")
    with pytest.raises(ForbiddenError, match="BUILDQ_ALLOWED_DESTINATIONS=") as caught:
        policy.check(parse_destination(f"{ECR}/prod"), "destination")
    assert f"{ECR}/prod" in caught.value.message


def test_default_is_the_operators_destination_and_below_plus_loopback(tmp_path: Path) -> None:
    config = tmp_path / "launch-config.yaml"
    config.write_text(f"builder:\n  type: docker\n  destination: {ECR}/team/app\n")
    policy = DestinationPolicy.from_settings(Settings.from_env({"BUILDQ_CONFIG": str(config),
                                                                "HOME": str(tmp_path)}))
    assert allowed(policy, f"{ECR}/team/app")
    assert allowed(policy, f"{ECR}/team/app/gpu")
    assert not allowed(policy, f"{ECR}/team/app-evil")
    assert not allowed(policy, f"{ECR}/team")
    for loopback in ("localhost:5000/x", "127.0.0.1:5000/x", "127.0.0.2/x"):
        assert allowed(policy, loopback), loopback
    assert not allowed(policy, "127.evil.example/x")
    assert str(config) in policy.rule()


def test_every_push_target_is_checked() -> None:
    policy = DestinationPolicy(home=f"{ECR}/team/app")
    dest = parse_destination(f"{ECR}/team/app")
    check_push_targets(policy, dest, f"{ECR}/team/app/cache", None)
    with pytest.raises(ForbiddenError, match=re.escape("builder.cache-repo")):
        check_push_targets(policy, dest, "ghcr.io/elsewhere/cache", None)
    smuggled = {"spec": {"template": {"spec": {"containers": [
        {"args": ["--cache=true", "--cache-repo=ghcr.io/elsewhere/cache:tag"]}]}}}}
    with pytest.raises(ForbiddenError, match=re.escape("kaniko-config --cache-repo ghcr.io/elsewhere/cache")):
        check_push_targets(policy, dest, None, smuggled)
