from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from config import ConfigError, LaunchConfig, config_from_mapping, load_config
from config.references import ImageRef
from config.schema import DEFAULT_BUILD_JOB_NAME

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "configs"
ECR = "123456789012.dkr.ecr.us-east-1.amazonaws.com"
ORIGIN = "team/launch-config.yaml"
SECRET = "local-0123456789abcdef0123456789abcdef01234567"


def refused(data: Any, *fragments: str) -> str:
    """The message of the ConfigError ``data`` raises; names the origin and each fragment."""
    with pytest.raises(ConfigError) as info:
        config_from_mapping(data, origin=ORIGIN)
    text = str(info.value)
    assert ORIGIN in text
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in {text!r}"
    assert "Traceback" not in text and "validation error" not in text
    return text


def aws(**builder: Any) -> dict[str, Any]:
    return {"environment": {"type": "aws", "region": "us-east-1"}, "builder": builder}


def gcp(**builder: Any) -> dict[str, Any]:
    return {
        "environment": {"type": "gcp", "region": "us-central1", "project": "my-proj"},
        "builder": builder,
    }


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ------------------------------------------------------------------ resolution


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


def default_file(home: Path, text: str) -> Path:
    return write(home / ".config" / "wandb" / "launch-config.yaml", text)


def test_explicit_path_wins_over_env_path_and_default(home: Path, tmp_path: Path) -> None:
    default_file(home, "builder: {type: noop}\n")
    env = write(
        tmp_path / "env.yaml",
        "builder: {type: kaniko, destination: r.example.com/a, "
        "build-context-store: 'file:///srv/ctx'}\n",
    )
    explicit = write(tmp_path / "explicit.yaml", "builder: {type: docker}\n")
    config = load_config(explicit, env_path=str(env))
    assert config.builder.type == "docker"
    assert config.origin == str(explicit)


def test_env_path_wins_over_default_path(home: Path, tmp_path: Path) -> None:
    default_file(home, "builder: {type: noop}\n")
    env = write(tmp_path / "env.yaml", "builder: {type: docker}\n")
    config = load_config(None, env_path=str(env))
    assert config.builder.type == "docker"
    assert config.origin == str(env)


def test_default_path_under_home_is_read_when_nothing_is_given(home: Path) -> None:
    path = default_file(home, "builder: {type: noop}\n")
    config = load_config()
    assert config.builder.type == "noop"
    assert config.origin == str(path)


def test_defaults_when_no_file_exists(home: Path) -> None:
    config = load_config()
    assert config.origin == "<defaults>"
    assert config.builder.type is None
    assert config.builder.build_job_name == DEFAULT_BUILD_JOB_NAME
    assert config.destination() is None
    assert config.to_mapping() == {}


def test_missing_explicit_path_is_an_error_naming_it(home: Path, tmp_path: Path) -> None:
    default_file(home, "builder: {type: noop}\n")
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert str(missing) in info.value.message
    assert "--config" in info.value.message


def test_missing_env_path_is_an_error_naming_the_variable(home: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env_path=str(tmp_path / "nope.yaml"))
    assert "BUILDQ_CONFIG" in info.value.message
    assert "nope.yaml" in info.value.message


def test_directory_given_as_config_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a file"):
        load_config(tmp_path)


def test_empty_file_gives_defaults_with_its_origin(tmp_path: Path) -> None:
    path = write(tmp_path / "empty.yaml", "# nothing yet\n")
    config = load_config(path)
    assert config.origin == str(path)
    assert config.to_mapping() == {}


# ------------------------------------------------------------------ file format


def test_malformed_yaml_reports_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.yaml", "builder:\n  type: docker\n  destination: [a\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = info.value.message
    assert str(path) in message
    assert "line 4" in message and "column" in message
    assert "not valid YAML" in message


def test_malformed_yaml_never_quotes_the_api_key_line(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.yaml", f"api_key: {SECRET}: oops\nbuilder: {{type: docker}}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "line 1" in str(info.value)
    assert SECRET not in str(info.value)


def test_duplicate_key_is_refused_with_both_lines(tmp_path: Path) -> None:
    path = write(
        tmp_path / "dup.yaml",
        "builder:\n  destination: r.example.com/a\n  destination: r.example.com/b\n",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = info.value.message
    assert "'destination' appears twice" in message
    assert "line 3" in message and "first on line 2" in message


def test_yaml_merge_keys_are_not_duplicates() -> None:
    # Anchors and merges are a normal way to share blocks in a config.
    from config.reading import parse_yaml

    data = parse_yaml("base: &b {type: docker}\nbuilder:\n  <<: *b\n  type: noop\n", "x")
    assert data["builder"] == {"type": "noop"}


@pytest.mark.parametrize("text", ["- builder\n", "just a string\n", "42\n"])
def test_top_level_that_is_not_a_mapping_is_refused(tmp_path: Path, text: str) -> None:
    path = write(tmp_path / "list.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in info.value.message
    assert "expected a mapping" in info.value.message


def test_non_utf8_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"builder:\n  type: d\xf6cker\n")
    with pytest.raises(ConfigError, match="UTF-8"):
        load_config(path)


# ------------------------------------------------------------- agent keys, secrets


def test_wandb_agent_keys_are_accepted_and_ignored() -> None:
    data = {
        "entity": "team",
        "project": "p",
        "queue": "q",
        "queues": ["default", "gpu"],
        "max_jobs": -1,
        "max_schedulers": 2,
        "base_url": "https://api.wandb.ai",
        "api_key": SECRET,
        "verbosity": 1,
        "secure_mode": True,
        "builder": {"type": "docker"},
    }
    config = config_from_mapping(data)
    assert config.to_mapping() == {"builder": {"type": "docker"}}


def test_api_key_never_appears_in_mapping_or_errors() -> None:
    data = {"api_key": SECRET, "builder": {"type": "dockr", "destination": "X/Y"}}
    text = refused(data, "builder.type")
    assert SECRET not in text
    good = config_from_mapping({"api_key": SECRET, "builder": {"type": "docker"}})
    assert SECRET not in json.dumps(good.to_mapping())
    assert SECRET not in repr(good)


def test_helm_values_agent_config_block_is_read() -> None:
    values = {"agent": {"apiKey": SECRET}, "agentConfig": {"builder": {"type": "noop"}}}
    config = config_from_mapping(values)
    assert config.builder.type == "noop"


# ------------------------------------------------------------------ unknown keys


def test_unknown_top_level_key_suggests_the_close_one() -> None:
    refused({"buidler": {"type": "docker"}}, "buidler", "Did you mean 'builder'?")


def test_unknown_builder_key_suggests_hyphenated_spelling() -> None:
    refused(
        {"builder": {"build_context_store": "s3://bucket/x"}},
        "builder.build_context_store",
        "a key of builder",
        "Did you mean 'build-context-store'?",
    )


def test_unknown_environment_key_is_refused() -> None:
    refused(
        {"environment": {"type": "aws", "region": "us-east-1", "regoin": "x"}},
        "environment.regoin",
        "Did you mean 'region'?",
    )


def test_environment_profile_is_accepted_with_a_warning() -> None:
    config = config_from_mapping(
        {"environment": {"type": "aws", "region": "us-east-1", "profile": "dev"}}
    )
    assert any("AWS_PROFILE" in w for w in config.warnings)


def test_section_that_is_not_a_mapping_is_refused() -> None:
    refused({"builder": "docker"}, "builder", "found 'docker'", "expected a mapping")


def test_empty_section_is_treated_as_absent() -> None:
    assert config_from_mapping({"builder": None}).builder.type is None


# ------------------------------------------------------------------ environment


def test_aws_environment_needs_region() -> None:
    refused({"environment": {"type": "aws"}}, "environment.region", "the AWS region", "region:")


def test_aws_environment_refuses_gcp_style_region() -> None:
    refused(
        {"environment": {"type": "aws", "region": "us-east1"}},
        "environment.region",
        "found 'us-east1'",
        "like us-east-1",
    )


def test_gcp_environment_needs_region_and_project() -> None:
    text = refused(
        {"environment": {"type": "gcp"}}, "environment.region", "environment.project", "2 problems"
    )
    assert "Google Cloud project id" in text


def test_azure_environment_needs_nothing_else() -> None:
    assert config_from_mapping({"environment": {"type": "azure"}}).environment is not None


def test_unknown_environment_type_lists_the_allowed_ones() -> None:
    refused(
        {"environment": {"type": "gce"}},
        "environment.type",
        "found 'gce'",
        "expected one of aws, gcp, azure",
    )


def test_environment_without_type_is_refused() -> None:
    refused({"environment": {"region": "us-east-1"}}, "environment.type", "one of aws, gcp, azure")


def test_region_given_as_number_is_a_type_error() -> None:
    text = refused(
        {"environment": {"type": "aws", "region": 5}},
        "environment.region",
        "the number 5",
        "a string",
    )
    # Reported once, not again as "missing".
    assert "found nothing" not in text


# ------------------------------------------------------------------ builder


def test_unknown_builder_type_lists_allowed_and_suggests() -> None:
    refused(
        {"builder": {"type": "Docker"}},
        "builder.type",
        "found 'Docker'",
        "expected one of docker, kaniko, noop",
        "Did you mean 'docker'?",
    )


def test_destination_with_tag_is_refused_in_config() -> None:
    refused(
        {"builder": {"destination": "registry.example.com/app:v1"}},
        "builder.destination",
        "must not carry a tag",
        "Write builder.destination: registry.example.com/app",
    )


def test_destination_with_uppercase_repository_is_refused() -> None:
    refused(
        {"builder": {"destination": "registry.example.com/MyApp"}},
        "builder.destination",
        "lowercase",
        "'myapp'",
    )


def test_ecr_destination_in_other_region_is_refused() -> None:
    refused(
        aws(destination="123456789012.dkr.ecr.eu-west-1.amazonaws.com/app"),
        "builder.destination",
        "eu-west-1",
        "the environment's region us-east-1",
        f"{ECR}/app",
    )


def test_ecr_destination_in_same_region_is_accepted() -> None:
    config = config_from_mapping(aws(destination=f"{ECR}/team/app"))
    assert config.destination() == ImageRef(ECR, "team/app")


def test_ecr_destination_without_environment_is_accepted() -> None:
    dest = "123456789012.dkr.ecr.ap-south-1.amazonaws.com/app"
    assert config_from_mapping({"builder": {"destination": dest}}).destination() is not None


def test_ecr_host_missing_dkr_is_refused_with_the_real_host() -> None:
    refused(
        aws(destination="123456789012.ecr.us-east-1.amazonaws.com/app"),
        "builder.destination",
        "<account-id>.dkr.ecr.<region>.amazonaws.com",
        f"{ECR}/app",
    )


def test_artifact_registry_uri_in_other_region_is_refused() -> None:
    refused(
        gcp(uri="europe-west4-docker.pkg.dev/my-proj/images/app"),
        "builder.uri",
        "'europe-west4'",
        "the environment's region us-central1",
    )


def test_artifact_registry_uri_in_other_project_is_refused() -> None:
    refused(
        gcp(uri="us-central1-docker.pkg.dev/other-proj/images/app"),
        "builder.uri",
        "'other-proj'",
        "the environment's project my-proj",
        "us-central1-docker.pkg.dev/my-proj/images/app",
    )


def test_artifact_registry_multi_region_covering_environment_is_accepted() -> None:
    config = config_from_mapping(gcp(uri="us-docker.pkg.dev/my-proj/images/app"))
    assert config.destination() is not None


def test_artifact_registry_uri_without_image_name_is_refused() -> None:
    refused(
        gcp(uri="us-central1-docker.pkg.dev/my-proj/images"),
        "builder.uri",
        "<region>-docker.pkg.dev/<project-id>/<repository>/<image-name>",
    )


def test_artifact_registry_nested_image_is_accepted() -> None:
    config = config_from_mapping(gcp(uri="us-central1-docker.pkg.dev/my-proj/images/team/app"))
    dest = config.destination()
    assert dest is not None and dest.repository == "my-proj/images/team/app"


def test_destination_and_uri_naming_different_repositories_are_refused() -> None:
    refused(
        {"builder": {"destination": "r.example.com/a", "uri": "r.example.com/b"}},
        "builder.uri",
        "the same repository as builder.destination",
    )


def test_destination_wins_over_uri_when_both_agree() -> None:
    config = config_from_mapping(
        {"builder": {"destination": "https://r.example.com/a", "uri": "r.example.com/a"}}
    )
    assert config.destination() == ImageRef("r.example.com", "a")


def test_acr_destination_with_https_is_accepted() -> None:
    config = config_from_mapping(
        {"environment": {"type": "azure"}, "builder": {"destination": "https://x.azurecr.io/repo"}}
    )
    assert config.destination() == ImageRef("x.azurecr.io", "repo")


# ------------------------------------------------------------ build-context-store


@pytest.mark.parametrize(
    ("environment", "store", "expected"),
    [
        ({"type": "aws", "region": "us-east-1"}, "gs://bucket/p", "s3://<bucket>/<path>"),
        (
            {"type": "gcp", "region": "us-central1", "project": "my-proj"},
            "s3://bucket/p",
            "gs://<bucket>/<path>",
        ),
        (
            {"type": "azure"},
            "s3://bucket/p",
            "https://<storage-account>.blob.core.windows.net/<container>",
        ),
        ({"type": "aws", "region": "us-east-1"}, "file:///srv/ctx", "s3://<bucket>/<path>"),
    ],
)
def test_context_store_scheme_must_fit_environment(
    environment: dict[str, str], store: str, expected: str
) -> None:
    refused(
        {"environment": environment, "builder": {"build-context-store": store}},
        "builder.build-context-store",
        f"found {store!r}",
        expected,
    )


@pytest.mark.parametrize(
    "store",
    [
        "file:///var/lib/buildq/contexts",
        "s3://bucket/prefix",
        "gs://bucket/prefix",
        "https://acct123.blob.core.windows.net/contexts",
        # Azure's China, US Government and Germany clouds, whose Blob hosts kaniko reads too.
        "https://acct123.blob.core.chinacloudapi.cn/contexts",
        "https://acct123.blob.core.usgovcloudapi.net/contexts",
        "https://acct123.blob.core.cloudapi.de/contexts",
    ],
)
def test_any_known_store_is_accepted_without_environment(store: str) -> None:
    config = config_from_mapping({"builder": {"build-context-store": store}})
    assert config.builder.build_context_store == store


def test_unknown_store_scheme_is_refused_without_environment() -> None:
    refused(
        {"builder": {"build-context-store": "ftp://host/x"}},
        "builder.build-context-store",
        "file:///<absolute/path>",
        "with no environment",
    )


def test_azure_store_without_container_is_refused() -> None:
    refused(
        {
            "environment": {"type": "azure"},
            "builder": {"build-context-store": "https://acct123.blob.core.windows.net/"},
        },
        "builder.build-context-store",
        "a container after the account",
    )


def test_s3_store_without_bucket_is_refused() -> None:
    refused(
        aws(**{"build-context-store": "s3:///path"}),
        "builder.build-context-store",
        "a bucket name after s3://",
    )


def test_kaniko_needs_destination_and_context_store() -> None:
    text = refused(
        aws(type="kaniko"),
        "builder.destination",
        "builder.build-context-store",
        "s3://<bucket>/<path>",
    )
    assert "2 problems" in text


# ------------------------------------------------------------ other builder keys


def test_kaniko_config_args_must_be_flags() -> None:
    config = {"spec": {"template": {"spec": {"containers": [{"args": ["cache=false"]}]}}}}
    refused(
        {"builder": {"kaniko-config": config}},
        "builder.kaniko-config.spec.template.spec.containers[0].args[0]",
        '"--key=value"',
    )


def test_kaniko_config_may_not_fix_the_destination() -> None:
    config = {"spec": {"template": {"spec": {"containers": [{"args": ["--destination=x/y"]}]}}}}
    refused(
        {"builder": {"kaniko-config": config}},
        "containers[0].args[0]",
        "no --destination flag",
    )


def test_kaniko_config_with_a_date_value_is_refused() -> None:
    import datetime

    refused(
        {"builder": {"kaniko-config": {"metadata": {"created": datetime.date(2024, 1, 1)}}}},
        "builder.kaniko-config.metadata.created",
        "a string, number, boolean, list or mapping",
    )


def test_kaniko_image_must_be_a_valid_reference() -> None:
    refused(
        {"builder": {"kaniko-image": "Kaniko:latest"}}, "builder.kaniko-image", "an image reference"
    )


def test_cache_repo_must_differ_from_destination() -> None:
    refused(
        {"builder": {"destination": "r.example.com/app", "cache-repo": "r.example.com/app"}},
        "builder.cache-repo",
        "a repository other than the destination",
        "r.example.com/app-cache",
    )


def test_cache_repo_must_not_carry_a_tag() -> None:
    refused({"builder": {"cache-repo": "r.example.com/cache:x"}}, "builder.cache-repo", "tag")


def test_platform_takes_one_platform_or_several() -> None:
    for platform in ("linux/amd64", "linux/amd64,linux/arm64", ["linux/amd64", "linux/arm/v7"]):
        cfg = config_from_mapping({"builder": {"platform": platform}}, origin="t")
        assert cfg.builder.platform == platform


@pytest.mark.parametrize(("platform", "why"), [
    ("linux/amd46", "unknown architecture 'amd46'"),
    ("amd64", "is not written os/arch[/variant]"),
    (["linux/arm64", "linux/arm64/v8"], "names linux/arm64/v8 twice"),
    ([], "is an empty list"),
])
def test_platform_refuses_unknown_duplicate_or_no_platform(platform: object, why: str) -> None:
    text = refused({"builder": {"platform": platform}}, "builder.platform", why)
    assert "os/arch[/variant] (linux/amd64, linux/arm64, linux/arm/v7)" in text


def test_build_job_name_must_be_a_dns_label() -> None:
    refused(
        {"builder": {"build-job-name": "My_Build"}},
        "builder.build-job-name",
        "lowercase letters, digits and '-'",
    )


def test_secret_key_without_secret_name_is_refused() -> None:
    refused({"builder": {"secret-key": "config.json"}}, "builder.secret-name", "Kubernetes secret")


def test_all_problems_of_a_file_are_reported_together() -> None:
    data = {
        "bogus": 1,
        "environment": {"type": "aws", "region": "us-east-1"},
        "builder": {
            "type": "kaniko",
            "destination": "123456789012.dkr.ecr.eu-west-1.amazonaws.com/app:v1",
            "build-context-store": "gs://bucket/x",
            "platform": "amd64",
        },
    }
    text = refused(
        data, "bogus", "builder.destination", "builder.build-context-store", "builder.platform"
    )
    assert "4 problems" in text
    lines = text.splitlines()
    assert len(lines) == 5
    assert all(line.startswith(ORIGIN) for line in lines)


# ------------------------------------------------------------ legacy registry


def test_legacy_ecr_registry_gives_destination_and_warning() -> None:
    config = config_from_mapping(
        {
            "environment": {"type": "aws", "region": "us-east-1"},
            "registry": {"type": "ecr", "uri": f"{ECR}/legacy-app"},
        }
    )
    assert config.destination() == ImageRef(ECR, "legacy-app")
    assert any(
        "registry is deprecated" in w and f"destination: {ECR}/legacy-app" in w
        for w in config.warnings
    )


def test_legacy_gcr_registry_built_from_parts_and_environment() -> None:
    config = config_from_mapping(
        {
            "environment": {"type": "gcp", "region": "us-central1", "project": "my-proj"},
            "registry": {"type": "gcr", "repository": "images", "image-name": "app"},
        }
    )
    dest = config.destination()
    assert dest is not None
    assert dest.name == "us-central1-docker.pkg.dev/my-proj/images/app"
    assert any(dest.name in w for w in config.warnings)


def test_legacy_acr_registry_with_https_uri() -> None:
    config = config_from_mapping(
        {"registry": {"type": "acr", "uri": "https://myreg.azurecr.io/app"}}
    )
    assert config.destination() == ImageRef("myreg.azurecr.io", "app")


def test_legacy_ecr_registry_without_uri_is_refused() -> None:
    refused(
        {"registry": {"type": "ecr", "repository": "app"}},
        "registry.uri",
        "<account-id>.dkr.ecr.<region>.amazonaws.com/<repository>",
        "builder.destination",
    )


def test_legacy_registry_region_is_checked_against_environment() -> None:
    refused(
        {
            "environment": {"type": "aws", "region": "us-west-2"},
            "registry": {"type": "ecr", "uri": f"{ECR}/app"},
        },
        "registry.uri",
        "the environment's region us-west-2",
    )


def test_legacy_registry_type_must_match_its_uri() -> None:
    refused(
        {"registry": {"type": "ecr", "uri": "ghcr.io/org/app"}},
        "registry.uri",
        "a repository URI of type ecr",
    )


def test_legacy_registry_is_ignored_when_destination_is_set() -> None:
    config = config_from_mapping(
        {
            "registry": {"type": "ecr", "uri": f"{ECR}/old"},
            "builder": {"destination": "r.example.com/new"},
        }
    )
    assert config.destination() == ImageRef("r.example.com", "new")
    assert any("registry is ignored" in w for w in config.warnings)


def test_legacy_local_registry_means_no_destination() -> None:
    config = config_from_mapping({"registry": {"type": "local"}})
    assert config.destination() is None
    assert config.warnings


# ------------------------------------------------------------ mapping round trip


@pytest.mark.parametrize("example", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_examples_load_and_round_trip_through_mapping(example: Path) -> None:
    config = load_config(example)
    assert config.warnings == ()
    assert config.destination() is not None
    mapping = config.to_mapping()
    json.dumps(mapping)
    again = config_from_mapping(mapping, origin=config.origin)
    assert again == config
    assert again.to_mapping() == mapping


def test_to_mapping_uses_wandb_key_names_and_only_set_keys() -> None:
    config = config_from_mapping(
        aws(type="kaniko", destination=f"{ECR}/app", **{"build-context-store": "s3://bkt/x"})
    )
    assert config.to_mapping() == {
        "environment": {"type": "aws", "region": "us-east-1"},
        "builder": {
            "type": "kaniko",
            "destination": f"{ECR}/app",
            "build-context-store": "s3://bkt/x",
        },
    }


def test_legacy_block_round_trips_with_its_warning() -> None:
    data = {"registry": {"type": "acr", "uri": "https://myreg.azurecr.io/app"}}
    config = config_from_mapping(data)
    assert config.to_mapping() == data
    assert config_from_mapping(config.to_mapping()).warnings == config.warnings


def test_config_is_frozen() -> None:
    config = config_from_mapping({"builder": {"type": "docker"}})
    with pytest.raises(ValidationError):
        config.builder.type = "noop"
    assert isinstance(config, LaunchConfig)


def test_misspelled_required_key_is_reported_once() -> None:
    text = refused(
        aws(type="kaniko", destination=f"{ECR}/app", build_context_store="s3://bkt/x"),
        "builder.build_context_store",
        "Did you mean 'build-context-store'?",
    )
    assert "found nothing" not in text


def test_tab_indentation_gets_a_tab_specific_hint(tmp_path: Path) -> None:
    path = write(
        tmp_path / "tab.yaml", "builder:\n  type: docker\n\tdestination: r.example.com/a\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "line 3, column 1" in info.value.message
    assert "spaces" in (info.value.hint or "")
