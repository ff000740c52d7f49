"""The Kaniko Job manifest (merge rules, credentials, validation), and the dispatcher
against API errors the real server cannot be made to give on demand (5xx), on the
Kubernetes API stand-in. The dispatcher's other tests run on the real control plane with
the real kaniko executor: tests/kube/test_kaniko_dispatcher.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from config import config_from_mapping
from config.errors import ConfigError, TransientError
from config.names import HASH_LABEL
from config.references import parse_image_ref
from config.schema import LaunchConfig
from config.settings import Settings
from tests import services
from workers import kube as kube_module
from workers.builders.kaniko import (
    DEFAULT_KANIKO_IMAGE,
    KanikoDispatcher,
    KanikoRequest,
    merge_args,
    render_job,
)
from workers.context import BuildInputs

#: The Kubernetes version manifests are validated against (a current release).
K8S_VERSION = "1.33.0"
HASH = "ab" * 32
SECRET_VALUES = ("REGISTRY-PASSWORD-7f3a", "AZURE-ACCOUNT-KEY-91bc")
SETTINGS = Settings(registry_password=SECRET_VALUES[0], azure_storage_key=SECRET_VALUES[1],
                    kube_namespace="buildq-default")


def validated(manifest: dict[str, Any]) -> dict[str, Any]:
    """Every manifest a test produces must pass the real Job schema, strictly."""
    kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)
    text = json.dumps(manifest)
    for secret in SECRET_VALUES:
        assert secret not in text
    return manifest


def cfg(builder: dict[str, Any] | None = None, **top: Any) -> LaunchConfig:
    data = {"builder": {"type": "kaniko", "destination": "registry.example.com/team/app",
                        "build-context-store": "s3://contexts-bucket/ctx", **(builder or {})}, **top}
    return config_from_mapping(data)


def unchecked_cfg(builder: dict[str, Any]) -> LaunchConfig:
    """A config the loader would refuse, to test render_job's own guard behind it."""
    return LaunchConfig.model_validate(
        {"builder": {"type": "kaniko", "destination": "registry.example.com/team/app",
                     "build-context-store": "s3://contexts-bucket/ctx", **builder}})


def request(image: str = f"registry.example.com/team/app:{HASH[:24]}",
            context_uri: str = f"s3://contexts-bucket/ctx/{HASH}.tar.gz",
            build_args: dict[str, str] | None = None, **inputs: Any) -> KanikoRequest:
    return KanikoRequest(image=parse_image_ref(image), context_uri=context_uri, source_hash=HASH,
                         inputs=BuildInputs(build_args=tuple(sorted((build_args or {}).items())),
                                            **inputs))


def container(manifest: dict[str, Any]) -> dict[str, Any]:
    containers = manifest["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def args_of(manifest: dict[str, Any], flag: str) -> list[str]:
    return [a.split("=", 1)[1] for a in container(manifest)["args"] if a.split("=", 1)[0] == flag]


# --------------------------------------------------------------------------- manifest


def test_defaults() -> None:
    m = validated(render_job(request(build_args={"A": "1"}, target="final", platform="linux/amd64"),
                             cfg(), SETTINGS))
    c = container(m)
    assert c["image"] == DEFAULT_KANIKO_IMAGE
    assert args_of(m, "--context") == [f"s3://contexts-bucket/ctx/{HASH}.tar.gz"]
    assert args_of(m, "--destination") == [f"registry.example.com/team/app:{HASH[:24]}"]
    assert args_of(m, "--cache") == ["true"]
    assert args_of(m, "--cache-repo") == ["registry.example.com/team/app-cache"]
    assert args_of(m, "--snapshot-mode") == ["redo"]
    assert args_of(m, "--compressed-caching") == ["false"]
    assert args_of(m, "--digest-file") == ["/dev/termination-log"]
    assert args_of(m, "--build-arg") == ["A=1"]
    assert args_of(m, "--target") == ["final"]
    assert args_of(m, "--custom-platform") == ["linux/amd64"]
    assert args_of(m, "--label") == [f"buildq.source-hash={HASH}"]
    spec = m["spec"]
    assert spec["backoffLimit"] == 0 and spec["activeDeadlineSeconds"] == 1800
    assert spec["ttlSecondsAfterFinished"] > 0
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    assert m["metadata"]["name"] == f"launch-agent-build-{HASH[:24]}"
    assert m["metadata"]["namespace"] == "buildq-default"
    for meta in (m["metadata"], spec["template"]["metadata"]):
        assert meta["labels"][HASH_LABEL] == HASH[:24]
        assert meta["annotations"][HASH_LABEL] == HASH


def test_kaniko_image_key_and_file_context() -> None:
    m = validated(render_job(request(context_uri=f"file:///srv/ctx/{HASH}.tar.gz"),
                             cfg({"kaniko-image": "mirror.example.com/kaniko:v9",
                                  "build-context-store": "file:///srv/ctx"}), SETTINGS))
    assert container(m)["image"] == "mirror.example.com/kaniko:v9"
    # Kaniko reads a local .tar.gz as a tar:// context.
    assert args_of(m, "--context") == [f"tar:///srv/ctx/{HASH}.tar.gz"]


def test_user_arg_overrides_default_and_repeatable_flags_accumulate() -> None:
    kaniko = {"spec": {"template": {"spec": {"containers": [{"args": [
        "--snapshot-mode=full", "--cache=false", "--build-arg=FROM_CONFIG=x",
        "--build-arg=OTHER=y", "--registry-mirror=mirror.example.com", "--reproducible",
        "--verbosity=debug"]}]}}}}
    m = validated(render_job(request(build_args={"FROM_REQUEST": "1"}),
                             cfg({"kaniko-config": kaniko}), SETTINGS))
    assert args_of(m, "--snapshot-mode") == ["full"]
    assert args_of(m, "--cache") == ["false"]
    assert args_of(m, "--build-arg") == ["FROM_REQUEST=1", "FROM_CONFIG=x", "OTHER=y"]
    assert args_of(m, "--registry-mirror") == ["mirror.example.com"]
    assert args_of(m, "--reproducible") == ["true"]
    assert args_of(m, "--verbosity") == ["debug"]
    # The replaced flag keeps its place among ours.
    flags = [a.split("=")[0] for a in container(m)["args"]]
    assert flags.index("--snapshot-mode") < flags.index("--digest-file")


def test_merge_args_rules() -> None:
    merged = merge_args([("--cache", "true"), ("--build-arg", "A=1")],
                        ["--build-arg=B=2", "--build-arg=A=1", "--cache=false", "--cache=true"])
    assert merged == ["--cache=true", "--build-arg=A=1", "--build-arg=B=2"]


def test_two_containers_is_a_clear_error() -> None:
    kaniko = {"spec": {"template": {"spec": {"containers": [{"name": "a"}, {"name": "b"}]}}}}
    with pytest.raises(ConfigError, match="2 containers; the kaniko Job runs exactly one"):
        render_job(request(), unchecked_cfg({"kaniko-config": kaniko}), SETTINGS)


def test_arg_without_value_is_a_clear_error() -> None:
    kaniko = {"spec": {"template": {"spec": {"containers": [{"args": ["--cache-ttl"]}]}}}}
    with pytest.raises(ConfigError, match=r"'--cache-ttl' needs a value.*--cache-ttl=<value>"):
        render_job(request(), unchecked_cfg({"kaniko-config": kaniko}), SETTINGS)


def test_owned_flags_and_restart_policy_are_refused() -> None:
    with pytest.raises(ConfigError, match="--digest-file"):
        merge_args([], ["--digest-file=/tmp/x"])
    kaniko = {"spec": {"template": {"spec": {"restartPolicy": "OnFailure"}}}}
    with pytest.raises(ConfigError, match="restartPolicy: Never"):
        render_job(request(), unchecked_cfg({"kaniko-config": kaniko}), SETTINGS)


def test_destination_is_reserved_when_rendering_too() -> None:
    """A second --destination would push the build under a tag that is not its source hash."""
    with pytest.raises(ConfigError, match="--destination is set by buildq"):
        merge_args([], ["--destination=elsewhere.example.com/app:latest"])


def test_kaniko_config_deep_merge() -> None:
    kaniko = {
        "metadata": {"namespace": "builds", "labels": {"team": "ml"},
                     "annotations": {"owner": "ml-infra"}},
        "spec": {"activeDeadlineSeconds": 600, "ttlSecondsAfterFinished": 60,
                 "template": {
                     "metadata": {"labels": {"pod-label": "x"}},
                     "spec": {
                         "serviceAccountName": "kaniko-builder",
                         "nodeSelector": {"pool": "builds"},
                         "tolerations": [{"key": "builds", "operator": "Exists", "effect": "NoSchedule"}],
                         "imagePullSecrets": [{"name": "mirror-pull"}],
                         "volumes": [{"name": "cache", "emptyDir": {}}],
                         "containers": [{
                             "resources": {"limits": {"memory": "4Gi"}, "requests": {"cpu": "1"}},
                             "env": [{"name": "HTTP_PROXY", "value": "http://proxy:3128"},
                                     {"name": "AWS_REGION", "value": "us-east-1"}],
                             "volumeMounts": [{"name": "cache", "mountPath": "/cache"}],
                         }],
                     }}}}
    m = validated(render_job(request(), cfg({"kaniko-config": kaniko},
                                            environment={"type": "aws", "region": "us-east-1"}),
                             SETTINGS))
    assert m["metadata"]["namespace"] == "builds"
    assert m["metadata"]["labels"]["team"] == "ml"
    assert m["metadata"]["labels"][HASH_LABEL] == HASH[:24]
    assert m["metadata"]["annotations"]["owner"] == "ml-infra"
    assert m["spec"]["activeDeadlineSeconds"] == 600 and m["spec"]["ttlSecondsAfterFinished"] == 60
    assert m["spec"]["backoffLimit"] == 0
    tmpl = m["spec"]["template"]
    assert tmpl["metadata"]["labels"]["pod-label"] == "x"
    pod = tmpl["spec"]
    assert pod["serviceAccountName"] == "kaniko-builder"
    assert pod["nodeSelector"] == {"pool": "builds"}
    assert pod["tolerations"][0]["key"] == "builds"
    assert pod["imagePullSecrets"] == [{"name": "mirror-pull"}]
    assert {v["name"] for v in pod["volumes"]} == {"cache"}
    c = container(m)
    assert c["resources"] == {"limits": {"memory": "4Gi"}, "requests": {"cpu": "1"}}
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env == {"AWS_REGION": "us-east-1", "HTTP_PROXY": "http://proxy:3128"}
    assert [v["mountPath"] for v in c["volumeMounts"]] == ["/cache"]
    assert c["args"]  # ours survive a container block without args


def test_name_and_namespace(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    long_name = "b" * 40
    m = validated(render_job(request(), cfg({"build-job-name": long_name}), SETTINGS))
    name = m["metadata"]["name"]
    assert len(name) <= 63 and name.startswith(long_name + "-") and HASH[:16] in name
    # No kaniko-config namespace, in a pod: the pod's own namespace.
    (tmp_path / "namespace").write_text("from-pod\n")
    monkeypatch.setattr(kube_module, "SERVICE_ACCOUNT_DIR", tmp_path)
    assert render_job(request(), cfg(), SETTINGS)["metadata"]["namespace"] == "from-pod"
    kaniko = {"metadata": {"namespace": "from-config"}}
    assert render_job(request(), cfg({"kaniko-config": kaniko}), SETTINGS)["metadata"][
        "namespace"] == "from-config"


def test_cache_repo_is_never_the_destination() -> None:
    m = validated(render_job(request(), cfg({"cache-repo": "registry.example.com/team/cache"}),
                             SETTINGS))
    assert args_of(m, "--cache-repo") == ["registry.example.com/team/cache"]
    with pytest.raises(ConfigError, match="cache-repo"):
        cfg({"cache-repo": "registry.example.com/team/app"})
    default = render_job(request(), cfg(), SETTINGS)
    assert args_of(default, "--cache-repo") != [args_of(default, "--destination")[0].rsplit(":", 1)[0]]


def _docker_config(m: dict[str, Any]) -> dict[str, Any]:
    pod = m["spec"]["template"]
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "docker-config")
    mount = next(v for v in container(m)["volumeMounts"] if v["name"] == "docker-config")
    assert mount["mountPath"] == "/kaniko/.docker"
    if "secret" in volume:
        return {"secret": volume["secret"]}
    field = volume["downwardAPI"]["items"][0]["fieldRef"]["fieldPath"]
    key = field.split("['")[1].rstrip("']")
    return dict(json.loads(pod["metadata"]["annotations"][key]))


def test_aws_credentials() -> None:
    ecr = "123456789012.dkr.ecr.us-east-1.amazonaws.com"
    settings = Settings(s3_endpoint_url="http://127.0.0.1:9000", registry_password=SECRET_VALUES[0])
    m = validated(render_job(
        request(image=f"{ecr}/app:{HASH[:24]}"),
        cfg({"destination": f"{ecr}/app",
             "kaniko-config": {"spec": {"template": {"spec": {"serviceAccountName": "irsa-kaniko"}}}}},
            environment={"type": "aws", "region": "us-east-1"}), settings))
    env = {e["name"]: e.get("value") for e in container(m)["env"]}
    assert env == {"AWS_REGION": "us-east-1", "S3_ENDPOINT": "http://127.0.0.1:9000",
                   "S3_FORCE_PATH_STYLE": "true"}
    assert _docker_config(m) == {"credHelpers": {ecr: "ecr-login"}}
    assert m["spec"]["template"]["spec"]["serviceAccountName"] == "irsa-kaniko"


def test_gcp_credentials() -> None:
    gar = "us-central1-docker.pkg.dev/proj/repo/app"
    m = validated(render_job(
        request(image=f"{gar}:{HASH[:24]}", context_uri=f"gs://ctx-bucket/p/{HASH}.tar.gz"),
        cfg({"destination": gar, "build-context-store": "gs://ctx-bucket/p",
             "secret-name": "gcp-sa", "secret-key": "sa.json"},
            environment={"type": "gcp", "region": "us-central1", "project": "proj"}), SETTINGS))
    c = container(m)
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env == {"GOOGLE_APPLICATION_CREDENTIALS": "/secret/sa.json"}
    volumes = {v["name"]: v for v in m["spec"]["template"]["spec"]["volumes"]}
    assert volumes["gcp-credentials"]["secret"] == {"secretName": "gcp-sa"}
    assert _docker_config(m) == {"credHelpers": {"us-central1-docker.pkg.dev": "gcr"}}


def test_azure_credentials_reference_a_secret_only() -> None:
    m = validated(render_job(
        request(image=f"myreg.azurecr.io/app:{HASH[:24]}",
                context_uri=f"https://acct1.blob.core.windows.net/ctx/{HASH}.tar.gz"),
        cfg({"destination": "https://myreg.azurecr.io/app",
             "build-context-store": "https://acct1.blob.core.windows.net/ctx"},
            environment={"type": "azure"}), SETTINGS))
    (env,) = container(m)["env"]
    assert env == {"name": "AZURE_STORAGE_ACCESS_KEY", "valueFrom": {"secretKeyRef": {
        "name": "azure-storage-access-key", "key": "AZURE_STORAGE_ACCESS_KEY"}}}
    assert _docker_config(m) == {"credHelpers": {"myreg.azurecr.io": "acr-env"}}
    assert m["spec"]["template"]["metadata"]["labels"]["azure.workload.identity/use"] == "true"


def test_other_registry_mounts_the_dockerconfigjson_secret() -> None:
    m = validated(render_job(request(), cfg({"secret-name": "regcred"}), SETTINGS))
    assert _docker_config(m) == {"secret": {"secretName": "regcred", "items": [
        {"key": ".dockerconfigjson", "path": "config.json"}]}}


def test_store_endpoints_reach_the_job_env() -> None:
    """Emulator endpoints travel to kaniko as env (GCS: the variable Go's client honours)."""
    settings = Settings(gcs_endpoint_url="http://127.0.0.1:9023",
                        azure_blob_endpoint="http://127.0.0.1:10000/acct1",
                        azure_storage_key=SECRET_VALUES[1])
    gs = validated(render_job(request(context_uri=f"gs://ctx-bucket/p/{HASH}.tar.gz"),
                              cfg({"build-context-store": "gs://ctx-bucket/p"}), settings))
    assert container(gs)["env"] == [{"name": "STORAGE_EMULATOR_HOST", "value": "http://127.0.0.1:9023"}]
    az = validated(render_job(
        request(context_uri=f"https://acct1.blob.core.windows.net/ctx/{HASH}.tar.gz"),
        cfg({"build-context-store": "https://acct1.blob.core.windows.net/ctx"}), settings))
    env = {e["name"]: e for e in container(az)["env"]}
    # Kaniko has no Blob endpoint override: the workers' (for Azurite) stays theirs.
    assert "BUILDQ_AZURE_BLOB_ENDPOINT" not in env
    assert "value" not in env["AZURE_STORAGE_ACCESS_KEY"]  # a Secret reference only
    # Without an override nothing about endpoints is added.
    plain = validated(render_job(request(context_uri=f"gs://ctx-bucket/p/{HASH}.tar.gz"),
                                 cfg({"build-context-store": "gs://ctx-bucket/p"}), SETTINGS))
    assert "env" not in container(plain)


def test_registry_endpoint_mapping_and_insecure_registries() -> None:
    settings = Settings(registry_endpoints={"registry.example.com": "127.0.0.1:5999"})
    m = validated(render_job(request(), cfg(), settings))
    assert args_of(m, "--destination") == [f"127.0.0.1:5999/team/app:{HASH[:24]}"]
    assert args_of(m, "--cache-repo") == ["127.0.0.1:5999/team/app-cache"]
    # A loopback endpoint is plain HTTP; the logical host is never contacted.
    assert args_of(m, "--insecure-registry") == ["127.0.0.1:5999"]
    assert args_of(m, "--registry-map") == ["registry.example.com=127.0.0.1:5999"]
    # The Job still names the image as the user configured it.
    assert m["metadata"]["annotations"]["buildq/image"] == f"registry.example.com/team/app:{HASH[:24]}"

    insecure = Settings(insecure_registries=("registry.example.com",))
    m = validated(render_job(request(), cfg(), insecure))
    assert args_of(m, "--destination") == [f"registry.example.com/team/app:{HASH[:24]}"]
    assert args_of(m, "--insecure-registry") == ["registry.example.com"]
    assert args_of(validated(render_job(request(), cfg(), SETTINGS)), "--insecure-registry") == []

    # A cloud registry's credential helper is keyed on the host kaniko really pushes to.
    ecr = "123456789012.dkr.ecr.us-east-1.amazonaws.com"
    mapped = Settings(registry_endpoints={ecr: "ecr.internal:443"})
    m = validated(render_job(request(image=f"{ecr}/app:{HASH[:24]}"), cfg({"destination": f"{ecr}/app"},
                             environment={"type": "aws", "region": "us-east-1"}), mapped))
    assert _docker_config(m) == {"credHelpers": {"ecr.internal:443": "ecr-login"}}


def test_a_loopback_look_alike_host_is_not_made_insecure() -> None:
    """Only a literal loopback address (or localhost) is plain HTTP; a name is never guessed."""
    for host, insecure in (("127.evil.example", []), ("127.0.0.1:5000", ["127.0.0.1:5000"]),
                           ("localhost:5000", ["localhost:5000"])):
        m = validated(render_job(request(image=f"{host}/team/app:{HASH[:24]}"),
                                 cfg({"destination": f"{host}/team/app"}), SETTINGS))
        assert args_of(m, "--insecure-registry") == insecure, host


def test_repeatable_and_bare_boolean_flags_of_kaniko() -> None:
    """Two --git or --credential-helpers both reach kaniko; --dryrun alone means true."""
    kaniko = {"spec": {"template": {"spec": {"containers": [{"args": [
        "--git=branch=main", "--git=depth=1", "--credential-helpers=ecr",
        "--credential-helpers=google", "--secret=id=npm,env=NPM_TOKEN", "--dryrun",
        "--pre-cleanup", "--materialize"]}]}}}}
    m = validated(render_job(request(), cfg({"kaniko-config": kaniko}), SETTINGS))
    assert args_of(m, "--git") == ["branch=main", "depth=1"]
    assert args_of(m, "--credential-helpers") == ["ecr", "google"]
    assert args_of(m, "--secret") == ["id=npm,env=NPM_TOKEN"]
    assert [args_of(m, f) for f in ("--dryrun", "--pre-cleanup", "--materialize")] == [["true"]] * 3


def test_every_s3_store_gives_kaniko_a_region() -> None:
    """Kaniko's S3 client needs a region even for an S3-compatible endpoint."""
    def region(config: LaunchConfig, settings: Settings) -> list[str]:
        env = container(validated(render_job(request(), config, settings))).get("env", [])
        return [e["value"] for e in env if e["name"] == "AWS_REGION"]

    assert region(cfg(), SETTINGS) == [Settings.s3_region] == ["us-east-1"]
    assert region(cfg(), Settings.from_env({"BUILDQ_S3_REGION": "eu-west-3"})) == ["eu-west-3"]
    assert region(cfg(environment={"type": "aws", "region": "ap-south-1"}),
                  Settings.from_env({"BUILDQ_S3_REGION": "eu-west-3"})) == ["ap-south-1"]
    gs = render_job(request(context_uri=f"gs://ctx-bucket/p/{HASH}.tar.gz"),
                    cfg({"build-context-store": "gs://ctx-bucket/p"}), SETTINGS)
    assert "env" not in container(gs)


def test_a_file_store_is_mounted_where_kaniko_reads_it() -> None:
    config = cfg({"build-context-store": "file:///srv/ctx"})
    # Valid, with a warning: a hostPath volume works on a single node or a shared filesystem.
    (warning,) = config.warnings
    assert "hostPath" in warning and "single-node" in warning
    m = validated(render_job(request(context_uri=f"file:///srv/ctx/{HASH}.tar.gz"), config, SETTINGS))
    assert args_of(m, "--context") == [f"tar:///srv/ctx/{HASH}.tar.gz"]
    (volume,) = m["spec"]["template"]["spec"]["volumes"]
    assert volume == {"name": "context-store", "hostPath": {"path": "/srv/ctx", "type": "Directory"}}
    assert container(m)["volumeMounts"] == [{"name": "context-store", "mountPath": "/srv/ctx",
                                             "readOnly": True}]


def _service_account_token(directory: Path, namespace: str, name: str) -> None:
    import base64

    claims = {"sub": f"system:serviceaccount:{namespace}:{name}"}
    payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    (directory / "token").write_text(f"eyJhbGciOiJSUzI1NiJ9.{payload}.c2lnbmF0dXJl")
    (directory / "namespace").write_text(namespace)


def test_job_runs_as_the_pools_service_account_unless_kaniko_config_names_one(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def account(config: LaunchConfig) -> str | None:
        pod = validated(render_job(request(), config, SETTINGS))["spec"]["template"]["spec"]
        return pod.get("serviceAccountName")

    # Out of a cluster there is no own account: the namespace's default, unless named.
    monkeypatch.setattr(kube_module, "SERVICE_ACCOUNT_DIR", tmp_path)
    assert account(cfg()) is None
    _service_account_token(tmp_path, "buildq", "buildq-kaniko")
    assert account(cfg()) == "buildq-kaniko"
    named = {"spec": {"template": {"spec": {"serviceAccountName": "irsa-kaniko"}}}}
    assert account(cfg({"kaniko-config": named})) == "irsa-kaniko"
    # In another namespace the pool's account does not exist: nothing is guessed.
    elsewhere = {"metadata": {"namespace": "other"}}
    assert account(cfg({"kaniko-config": elsewhere})) is None


def _node_selector(platform: str | None, config: LaunchConfig) -> dict[str, str] | None:
    pod = validated(render_job(request(platform=platform), config, SETTINGS))["spec"]["template"]
    return pod["spec"].get("nodeSelector")


def test_a_platform_selects_a_node_of_its_os_and_architecture() -> None:
    assert _node_selector("linux/arm64", cfg()) == {"kubernetes.io/os": "linux",
                                                    "kubernetes.io/arch": "arm64"}
    assert _node_selector("linux/amd64", cfg()) == {"kubernetes.io/os": "linux",
                                                    "kubernetes.io/arch": "amd64"}
    # A variant is no node label: linux/arm/v7 goes to an arm node, kaniko picks v7.
    m = validated(render_job(request(platform="linux/arm/v7"), cfg(), SETTINGS))
    assert m["spec"]["template"]["spec"]["nodeSelector"]["kubernetes.io/arch"] == "arm"
    assert args_of(m, "--custom-platform") == ["linux/arm/v7"]
    # No platform asked for: the Job goes wherever the scheduler puts it, as before.
    assert _node_selector(None, cfg()) is None


def test_kaniko_config_node_selector_wins_per_label_and_null_drops_ours() -> None:
    def selector(labels: dict[str, str | None]) -> LaunchConfig:
        return cfg({"kaniko-config": {"spec": {"template": {"spec": {"nodeSelector": labels}}}}})

    # Their label is added to ours.
    assert _node_selector("linux/arm64", selector({"pool": "builds"})) == {
        "kubernetes.io/os": "linux", "kubernetes.io/arch": "arm64", "pool": "builds"}
    # Their kubernetes.io/arch wins (say, amd64 nodes with QEMU build every platform).
    assert _node_selector("linux/arm64", selector({"kubernetes.io/arch": "amd64"})) == {
        "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64"}
    # null drops our selector for that label; dropping both leaves none.
    assert _node_selector("linux/arm64", selector({"kubernetes.io/arch": None})) == {
        "kubernetes.io/os": "linux"}
    assert _node_selector("linux/arm64", selector({"kubernetes.io/arch": None,
                                                   "kubernetes.io/os": None})) is None
    # Without a platform their selector stands alone, nulls left out.
    assert _node_selector(None, selector({"pool": "builds", "kubernetes.io/arch": None})) == {
        "pool": "builds"}


def test_a_node_selector_that_is_not_labels_is_a_clear_error() -> None:
    for bad, expected in (("arm64", "a mapping of node labels"), ({"kubernetes.io/arch": 64},
                                                                  r"a string \(or null\)")):
        kaniko = {"spec": {"template": {"spec": {"nodeSelector": bad}}}}
        with pytest.raises(ConfigError, match=expected):
            cfg({"kaniko-config": kaniko})
        # render_job's own guard, behind the loader's.
        with pytest.raises(ConfigError, match="nodeSelector"):
            render_job(request(platform="linux/arm64"), unchecked_cfg({"kaniko-config": kaniko}),
                       SETTINGS)


# --------------------------------------------------------------------------- API errors
# The dispatcher's tests run on the real control plane with the real kaniko executor
# (tests/kube/test_kaniko_dispatcher.py, tests/faults/test_kaniko.py for an API server
# that goes away or stalls). A real kube-apiserver cannot be made to answer 500, 503 or
# 429, and the fault proxy speaks TCP, not HTTP: those answers come from a server that
# gives nothing else.


class AnswersWith(services.HTTPStandIn):
    """An API endpoint whose every answer is one error Status (what a sick API server or
    the load balancer before it sends); counts the requests."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__()
        self.code, self.reason = code, reason
        self.requests: list[tuple[str, str]] = []

    def route(self, method: str, path: str, headers: dict[str, str],
              body: bytes) -> tuple[int, dict[str, str], bytes]:
        self.requests.append((method, path))
        return self.json(self.code, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                     "reason": self.reason, "code": self.code,
                                     "message": f"stand-in answers {self.code}"})

    def api_client(self) -> Any:
        from kubernetes import client

        configuration = client.Configuration()
        configuration.host = self.url
        return client.ApiClient(configuration)


@pytest.mark.parametrize(("code", "reason"), [(500, "InternalError"), (503, "ServiceUnavailable"),
                                              (429, "TooManyRequests")])
def test_api_server_errors_are_retried_then_transient(code: int, reason: str) -> None:
    server = AnswersWith(code, reason)
    try:
        with pytest.raises(TransientError, match=f"answered {code} {reason}"):
            KanikoDispatcher(cfg(), SETTINGS, server.api_client()).run(request(), lambda _: None)
    finally:
        server.httpd.shutdown()
    creates = [r for r in server.requests if r[0] == "POST"]
    # Each attempt of the create was made, then the build is left to the stage's retry.
    assert len(creates) == kube_module.API_ATTEMPTS, server.requests
    assert {path for _, path in creates} == {"/apis/batch/v1/namespaces/buildq-default/jobs"}


def test_a_server_error_then_an_answer_is_the_answer() -> None:
    from kubernetes.client.exceptions import ApiException

    answers: list[Exception | str] = [ApiException(status=500, reason="InternalError"),
                                      ApiException(status=503, reason="ServiceUnavailable"), "created"]

    def call() -> str:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise kube_module.translate(answer, kube_module.CREATE_JOBS, "builds")
        return answer

    assert kube_module.retrying(call) == "created"
    assert answers == []
