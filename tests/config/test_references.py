from __future__ import annotations

import pytest

from config.errors import ConfigError
from config.references import (
    ImageRef,
    RegistryKind,
    classify_registry,
    parse_destination,
    parse_image_ref,
)

DIGEST = "sha256:" + "ab" * 32


def test_reference_without_host_defaults_to_docker_hub_library() -> None:
    ref = parse_image_ref("ubuntu:22.04")
    assert ref == ImageRef("docker.io", "library/ubuntu", tag="22.04")
    assert ref.name == "docker.io/library/ubuntu"


def test_reference_with_user_namespace_stays_under_docker_hub() -> None:
    assert parse_image_ref("team/app") == ImageRef("docker.io", "team/app")


def test_host_with_port_is_not_mistaken_for_a_tag() -> None:
    ref = parse_image_ref("localhost:5000/team/app")
    assert ref.registry == "localhost:5000"
    assert ref.repository == "team/app"
    assert ref.tag is None


def test_host_with_port_and_tag() -> None:
    ref = parse_image_ref("registry.example.com:8443/a/b/c:v1.2")
    assert (ref.registry, ref.repository, ref.tag) == ("registry.example.com:8443", "a/b/c", "v1.2")


def test_nested_repository_paths_are_kept_whole() -> None:
    ref = parse_image_ref("registry.example.com/org/team/sub/app")
    assert ref.repository == "org/team/sub/app"


def test_digest_reference_keeps_digest_and_optional_tag() -> None:
    ref = parse_image_ref(f"ghcr.io/org/app@{DIGEST}")
    assert ref.digest == DIGEST and ref.tag is None
    both = parse_image_ref(f"ghcr.io/org/app:v1@{DIGEST}")
    assert both.tag == "v1" and both.digest == DIGEST
    assert str(both) == f"ghcr.io/org/app:v1@{DIGEST}"


def test_with_tag_joins_name_and_tag() -> None:
    assert ImageRef("r.example.com", "a/b").with_tag("abc123") == "r.example.com/a/b:abc123"


def test_uppercase_repository_is_refused_with_lowercase_hint() -> None:
    with pytest.raises(ConfigError) as info:
        parse_image_ref("registry.example.com/Team/App")
    assert "'Team'" in info.value.message
    assert "team" in (info.value.hint or "")


@pytest.mark.parametrize(
    "text",
    ["", " app", "registry.example.com//app", "registry.example.com/app/", "app:", "a$b", "app:-x"],
)
def test_illegal_references_are_refused(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_image_ref(text)


def test_malformed_digest_is_refused() -> None:
    with pytest.raises(ConfigError, match="digest"):
        parse_image_ref("ghcr.io/org/app@sha256:xyz")


def test_destination_accepts_acr_https_prefix() -> None:
    ref = parse_destination("https://myregistry.azurecr.io/my-app")
    assert ref == ImageRef("myregistry.azurecr.io", "my-app")


def test_destination_ignores_trailing_slash() -> None:
    assert parse_destination("registry.example.com/app/").name == "registry.example.com/app"


def test_destination_with_tag_is_refused_naming_key_and_fix() -> None:
    with pytest.raises(ConfigError) as info:
        parse_destination("registry.example.com/app:latest", key="builder.uri")
    message = info.value.message
    assert "builder.uri" in message
    assert "destination must not carry a tag: buildq tags with the source hash" in message
    assert info.value.hint == "Write builder.uri: registry.example.com/app"


def test_destination_with_digest_is_refused() -> None:
    with pytest.raises(ConfigError, match="must not carry a tag"):
        parse_destination(f"registry.example.com/app@{DIGEST}")


def test_destination_with_http_scheme_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        parse_destination("http://registry.example.com/app")
    assert "BUILDQ_INSECURE_REGISTRIES" in (info.value.hint or "")


def test_destination_that_is_only_a_host_is_refused() -> None:
    with pytest.raises(ConfigError, match="repository path"):
        parse_destination("localhost:5000")


def test_ecr_host_is_parsed_for_account_and_region() -> None:
    ref = parse_destination("123456789012.dkr.ecr.eu-west-1.amazonaws.com/team/app")
    assert classify_registry(ref) == RegistryKind("ecr", account="123456789012", region="eu-west-1")


def test_ecr_host_without_dkr_is_not_ecr() -> None:
    ref = parse_destination("123456789012.ecr.eu-west-1.amazonaws.com/app")
    assert classify_registry(ref).kind == "v2"


def test_artifact_registry_nested_image_path() -> None:
    ref = parse_destination("europe-west4-docker.pkg.dev/my-proj/images/team/app")
    kind = classify_registry(ref)
    assert kind == RegistryKind(
        "gar", region="europe-west4", project="my-proj", registry_name="images"
    )
    assert ref.repository == "my-proj/images/team/app"


def test_acr_host_gives_registry_name() -> None:
    ref = parse_destination("https://myregistry.azurecr.io/app")
    assert classify_registry(ref) == RegistryKind("acr", registry_name="myregistry")


@pytest.mark.parametrize(
    "text", ["docker.io/team/app", "ghcr.io/org/app", "gcr.io/proj/app", "localhost:5000/a"]
)
def test_other_registries_are_plain_v2(text: str) -> None:
    assert classify_registry(parse_image_ref(text)).kind == "v2"
