"""What the README and the examples say about kaniko's cache and Azure's Secret is what the
code does: the rendered Job is compared with the documentation, and `buildq config check`
warns about the wiring the Azure example used to show."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from config import config_from_mapping

REPO = Path(__file__).resolve().parents[2]
AZURE_EXAMPLE = REPO / "examples" / "configs" / "azure-acr-kaniko.yaml"
#: What the Azure example wired until it was fixed: a registry login read as the store key.
REGISTRY_LOGIN_WIRING = {"secret-name": "acr-credentials", "secret-key": ".dockerconfigjson"}


def buildq(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("BUILDQ_") or k == "BUILDQ_BASE_POLICY"}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "tasks.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def kaniko_job(config: Path) -> dict[str, Any]:
    done = buildq("kaniko-job", str(REPO / "examples" / "hello"), "--config", str(config))
    assert done.returncode == 0, done.stderr
    job: dict[str, Any] = yaml.safe_load(done.stdout)
    return job


def container(job: dict[str, Any]) -> dict[str, Any]:
    (only,) = job["spec"]["template"]["spec"]["containers"]
    return dict(only)


def readme_default(key: str) -> str:
    """The default column of ``key``'s row in the README's launch-config table."""
    for line in (REPO / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] == f"`{key}`":
            return cells[1]
    raise AssertionError(f"the README has no row for {key}")


def test_readme_cache_repo_default_is_what_the_kaniko_job_gets(tmp_path: Path) -> None:
    config = tmp_path / "launch.yaml"
    config.write_text("builder:\n  type: kaniko\n  destination: registry.example.com/team/app\n"
                      "  build-context-store: s3://bucket/ctx\n")
    args = container(kaniko_job(config))["args"]
    assert "--cache=true" in args
    assert "--cache-repo=registry.example.com/team/app-cache" in args
    assert readme_default("builder.cache-repo") == "`<destination>-cache`"


def test_the_cache_turns_off_as_the_readme_says(tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text()
    assert re.search(r'`"--cache=false"` in the kaniko-config', readme)
    config = tmp_path / "launch.yaml"
    config.write_text(yaml.safe_dump({"builder": {
        "type": "kaniko", "destination": "registry.example.com/team/app",
        "build-context-store": "s3://bucket/ctx",
        "kaniko-config": {"spec": {"template": {"spec": {"containers": [
            {"args": ["--cache=false"]}]}}}}}}))
    args = container(kaniko_job(config))["args"]
    assert "--cache=false" in args and "--cache=true" not in args


def test_azure_example_gives_kaniko_the_storage_key_and_no_registry_secret() -> None:
    job = kaniko_job(AZURE_EXAMPLE)
    kaniko = container(job)
    example = yaml.safe_load(AZURE_EXAMPLE.read_text())["builder"]
    assert {"name": "AZURE_STORAGE_ACCESS_KEY", "valueFrom": {"secretKeyRef": {
        "name": example["secret-name"], "key": example["secret-key"]}}} in kaniko["env"]
    assert example["secret-key"] == "AZURE_STORAGE_ACCESS_KEY"
    # ACR is reached through the workload identity's credential helper, not a Secret.
    volumes = job["spec"]["template"]["spec"].get("volumes") or []
    assert not [v for v in volumes if "secret" in v], volumes
    checked = buildq("config", "check", "--config", str(AZURE_EXAMPLE))
    assert checked.returncode == 0 and "warning" not in checked.stderr, checked.stderr


def test_config_check_warns_when_the_azure_store_key_comes_from_a_registry_login(
        tmp_path: Path) -> None:
    data = yaml.safe_load(AZURE_EXAMPLE.read_text())
    data["builder"].update(REGISTRY_LOGIN_WIRING)
    config = tmp_path / "launch.yaml"
    config.write_text(yaml.safe_dump(data))
    checked = buildq("config", "check", "--config", str(config))
    assert checked.returncode == 0, checked.stderr
    (warning,) = [line for line in checked.stderr.splitlines() if line.startswith("warning:")]
    assert "'.dockerconfigjson'" in warning and "AZURE_STORAGE_ACCESS_KEY" in warning
    assert "secret-key: AZURE_STORAGE_ACCESS_KEY" in warning
    # buildq build prints the same warnings before it queues anything.
    assert config_from_mapping(data).warnings == (warning.removeprefix("warning: "),)


@pytest.mark.parametrize("change", [
    # A registry login Secret is right where the Job mounts it as docker's config.json.
    {"environment": None, "builder.destination": "registry.example.com/team/app",
     "builder.build-context-store": "s3://bucket/ctx"},
    # The key of an account-key Secret, whatever the Secret is called.
    {"builder.secret-key": "AZURE_STORAGE_ACCESS_KEY"},
], ids=["not-azure", "account-key"])
def test_no_warning_when_the_secret_is_what_the_job_reads(change: dict[str, Any]) -> None:
    data = yaml.safe_load(AZURE_EXAMPLE.read_text())
    data["builder"].update(REGISTRY_LOGIN_WIRING)
    for path, value in change.items():
        section, _, key = path.partition(".")
        if not key:
            data.pop(section)
        else:
            data[section][key] = value
    assert config_from_mapping(data).warnings == ()


def settings_default(variable: str) -> str:
    """The default column of ``variable``'s row in the README's settings table."""
    for line in (REPO / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and variable in cells[0]:
            return cells[1]
    raise AssertionError(f"the README's settings table has no row for {variable}")


@pytest.mark.parametrize(("variable", "field", "says"), [
    ("BUILDQ_SOURCE_ROOTS", "source_roots", "upload area only"),
    ("BUILDQ_ALLOWED_DESTINATIONS", "allowed_destinations", "launch-config's destination"),
    ("BUILDQ_SIGNING_KEY", "signing_key", "signing off"),
    ("BUILDQ_SIGNING_CERTS_DIR", "signing_certs_dir", "—"),
])
def test_readme_settings_defaults_are_what_an_unset_variable_gives(
        variable: str, field: str, says: str) -> None:
    from config.settings import Settings

    unset = Settings.from_env({"HOME": "/nonexistent"})
    # Unset, each of these is empty: the README says what empty means.
    assert getattr(unset, field) in ((), None)
    assert says in settings_default(variable)


def test_readme_s3_region_default_is_the_settings_default() -> None:
    from config.settings import Settings

    assert settings_default("BUILDQ_S3_REGION") == f"`{Settings.from_env({}).s3_region}`"
    assert Settings.from_env({"BUILDQ_S3_REGION": "eu-west-3"}).s3_region == "eu-west-3"
