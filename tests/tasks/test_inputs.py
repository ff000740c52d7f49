"""Equal inputs give one hash on every path: the chain, `buildq hash` and `buildq kaniko-job`."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import yaml

from config.names import HASH_LABEL
from tasks import build_image
from tests.tasks.conftest import REPO, Cluster


def _app(tmp_path: Path, base: str) -> Path:
    root = tmp_path / f"inputs-{uuid.uuid4().hex[:8]}"
    (root / "docker").mkdir(parents=True)
    (root / "docker" / "Dockerfile").write_text(
        f"FROM {base} AS first\nARG GREETING\nRUN echo $GREETING > /greeting\n"
        f"FROM {base} AS second\nCOPY --from=first /greeting /greeting\nCOPY msg.txt /msg.txt\n")
    (root / "msg.txt").write_text(f"inputs {uuid.uuid4()}\n")
    return root


def _cli(cluster: Cluster, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "tasks.cli", *args], env=cluster.env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_chain_cli_hash_and_kaniko_manifest_agree_on_the_source_hash(
        cluster: Cluster, tmp_path: Path, base_image: str) -> None:
    dest = f"{cluster.registry.host}/inputs/agree"
    app = _app(tmp_path, base_image)
    options = ["--dockerfile", "docker/Dockerfile", "--build-arg", "GREETING=hello",
               "--target", "second", "--platform", "linux/amd64"]

    record = build_image.delay(str(app), destination=dest, dockerfile="docker/Dockerfile",
                               build_args={"GREETING": "hello"}, target="second",
                               platform="linux/amd64").get(timeout=180)
    assert record["status"] == "built", record

    printed = _cli(cluster, "hash", str(app), *options, "--full").strip()
    assert printed == record["source_hash"]

    config = tmp_path / "kaniko.yaml"
    config.write_text(yaml.safe_dump({"builder": {
        "type": "kaniko", "destination": dest,
        "build-context-store": f"file://{tmp_path}/contexts"}}))
    job = yaml.safe_load(_cli(cluster, "kaniko-job", str(app), *options, "--config", str(config)))
    assert job["metadata"]["annotations"][HASH_LABEL] == record["source_hash"]
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert f"--destination={record['image']}" in args
    assert f"--context=tar://{tmp_path}/contexts/{record['source_hash']}.tar.gz" in args

    # One input changed on every path changes the hash on every path.
    other = _cli(cluster, "hash", str(app), *options[:-2], "--platform", "linux/arm64", "--full")
    assert other.strip() != record["source_hash"]
