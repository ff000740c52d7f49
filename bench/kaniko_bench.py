"""One small build through the kaniko pool against the same build on the docker pool.

The kaniko pool runs on the test control plane (tests/kube: etcd, kube-apiserver,
kube-controller-manager and the test kubelet on this machine's Docker Engine) with the
real kaniko executor (tests/kube/kaniko), the context in an S3 store (moto); the docker
pool builds on the same Engine. Each round builds a fresh context (a new message file) on
each pool, so neither finds the image and both build and push. Wall time is request to
record. For the kaniko builds a watch on the Jobs and pods of the namespace times the
orchestration: request → Job created → pod running → pod finished (kaniko has pushed and
written the digest) → record.

The binaries must be built (scripts/bootstrap --tests); this script does not build them.

    python bench/kaniko_bench.py [--quick]
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, BenchResult, Cluster, Row, exit_on_sigterm, median, remove_images, table

from config.names import HASH_LABEL
from tests import services

NAMESPACE = "buildq"
ACCOUNT = "buildq-kaniko"
AWS_KEYS_SECRET = "aws-standin-keys"
AWS_KEYS = {"AWS_ACCESS_KEY_ID": "AKIABENCH00000000000", "AWS_SECRET_ACCESS_KEY": "bench"}


def _log(msg: str) -> None:
    print(f"[kaniko] {msg}", file=sys.stderr, flush=True)


class Timeline:
    """When each Job was created, its pod first ran and finished, seen by watches here."""

    def __init__(self, plane: Any) -> None:
        self.plane = plane
        self.created: dict[str, float] = {}
        self.running: dict[str, float] = {}
        self.finished: dict[str, float] = {}
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._watch, args=(kind,), daemon=True)
                        for kind in ("jobs", "pods")]
        for thread in self.threads:
            thread.start()

    def _watch(self, kind: str) -> None:
        from kubernetes import client, watch

        api = self.plane.api_client()
        try:
            batch: Any = client.BatchV1Api(api)
            core: Any = client.CoreV1Api(api)
            fn = batch.list_namespaced_job if kind == "jobs" else core.list_namespaced_pod
            while not self.stop.is_set():
                for event in watch.Watch().stream(fn, NAMESPACE, timeout_seconds=5):
                    now = time.monotonic()
                    obj = event["raw_object"]
                    key = (obj["metadata"].get("annotations") or {}).get(HASH_LABEL, "")
                    if kind == "jobs":
                        self.created.setdefault(key, now)
                        continue
                    phase = (obj.get("status") or {}).get("phase")
                    if phase == "Running":
                        self.running.setdefault(key, now)
                    elif phase in ("Succeeded", "Failed"):
                        self.finished.setdefault(key, now)
        finally:
            api.close()

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(10)


def _context(root: Path, base: str, name: str) -> Path:
    ctx = root / name
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(f"FROM {base}\nCOPY msg.txt /msg.txt\nRUN cat /msg.txt > /copied.txt\n")
    (ctx / "msg.txt").write_text(f"{uuid.uuid4()}\n")
    return ctx


def _secret(plane: Any, name: str, data: dict[str, str]) -> None:
    manifest = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": NAMESPACE},
                "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}
    done = plane.kubectl("apply", "-f", "-", stdin=json.dumps(manifest))
    if done.returncode:
        raise RuntimeError(f"kubectl apply Secret {name}: {done.stderr}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round instead of three")
    args = parser.parse_args(argv)
    exit_on_sigterm()
    rounds = 1 if args.quick else 3
    result = BenchResult(
        "kaniko", "kaniko pool (test control plane, real executor) vs docker pool: one small build",
        baseline="the same build (FROM a registry base, COPY, RUN) on the docker pool, same Engine",
        method=(f"{rounds} round(s); each builds a fresh context on each pool (no cache hit), "
                "request to record; the kaniko steps from watches on the namespace's Jobs and pods"),
        quick=args.quick, params={"rounds": rounds})

    from tests.kube import build, kaniko
    from tests.kube.cluster import ControlPlane

    stale = build.out_of_date()
    if stale:
        result.write(error=f"test cluster binaries not built ({', '.join(stale)}): "
                           "run scripts/bootstrap --tests")
        _log("run scripts/bootstrap --tests first: the test cluster's binaries are not built")
        return 1
    with tempfile.TemporaryDirectory(prefix="buildq-kaniko-bench-") as tmp:
        root = Path(tmp)
        plane = ControlPlane(root / "kube")
        plane.directory.mkdir()
        cluster: Cluster | None = None
        moto: services.StandIn | None = None
        timeline: Timeline | None = None
        try:
            started = time.monotonic()
            plane.up(say=lambda _line: None)
            _log(f"control plane up in {time.monotonic() - started:.0f} s")
            cluster = Cluster.start(root, [])
            assert cluster.registry is not None
            image = kaniko.push_image(cluster.registry.host, say=lambda _line: None)
            base = cluster.push_base("bench/busybox:base")
            applied = plane.kubectl("apply", "-k", str(REPO / "deploy" / "kubernetes"), timeout=120)
            if applied.returncode:
                raise RuntimeError(f"kubectl apply -k deploy/kubernetes: {applied.stderr}")
            _secret(plane, AWS_KEYS_SECRET, AWS_KEYS)
            moto = services.start_moto(root / "moto")
            import boto3

            boto3.client("s3", endpoint_url=moto.endpoint, region_name="us-east-1",
                         **{k.lower(): v for k, v in AWS_KEYS.items()}).create_bucket(Bucket="bench")
            cluster.env.update({
                **AWS_KEYS, "AWS_DEFAULT_REGION": "us-east-1",
                "BUILDQ_S3_ENDPOINT_URL": moto.endpoint,
                "KUBECONFIG": str(plane.token_kubeconfig(root / "sa.kubeconfig", NAMESPACE, ACCOUNT)),
                "BUILDQ_KUBE_NAMESPACE": NAMESPACE,
            })
            for pool, concurrency in (("control", 2), ("docker", 1), ("kaniko", 1)):
                cluster.start_worker(pool, concurrency)
            cluster.use()
            timeline = Timeline(plane)
            from tasks import build_image

            kaniko_config = {"spec": {"template": {"spec": {"containers": [
                {"envFrom": [{"secretRef": {"name": AWS_KEYS_SECRET}}]}]}}}}
            host = cluster.registry.host
            walls: dict[str, list[float]] = {"kaniko": [], "docker": []}
            steps: dict[str, list[float]] = {"request → Job created": [], "Job created → pod running": [],
                                             "pod running → pushed (pod finished)": [],
                                             "pushed → record": []}
            for n in range(rounds):
                for pool in ("docker", "kaniko"):
                    ctx = _context(root, base, f"{pool}-{n}")
                    config: dict[str, Any] = {"builder": {"type": pool,
                                                          "destination": f"{host}/bench/{pool}"}}
                    if pool == "kaniko":
                        config["builder"].update({"build-context-store": "s3://bench/ctx",
                                                  "kaniko-image": image, "kaniko-config": kaniko_config})
                    sent = time.monotonic()
                    record = build_image.delay(str(ctx), builder=pool, config=config).get(timeout=900)
                    done = time.monotonic()
                    if record["status"] != "built":
                        raise RuntimeError(f"{pool} build did not build: {record.get('error')}")
                    walls[pool].append(done - sent)
                    _log(f"round {n + 1}: {pool} {done - sent:.1f} s")
                    if pool == "kaniko":
                        key = record["source_hash"]
                        created, running = timeline.created[key], timeline.running[key]
                        finished = timeline.finished[key]
                        for name, value in zip(steps, (created - sent, running - created,
                                                       finished - running, done - finished), strict=True):
                            steps[name].append(value)
            rows = [Row("one small build, kaniko pool: request to record (median)",
                        median(walls["kaniko"]), "s",
                        baseline=median(walls["docker"]), baseline_label="docker pool (median)")]
            rows += [Row(f"↳ kaniko: {name} (median)", median(values), "s") for name, values in steps.items()]
            print(table(rows))
            result.write(rows, figures={"walls_s": walls, "kaniko_steps_s": steps})
            return 0
        except Exception as exc:
            result.write(error=f"{type(exc).__name__}: {exc}")
            raise
        finally:
            if timeline is not None:
                timeline.close()
            if cluster is not None:
                cluster.stop()
            if moto is not None:
                moto.stop()
            plane.down()
            if cluster is not None and cluster.registry_host:
                remove_images(cluster.registry_host)


if __name__ == "__main__":
    sys.exit(main())
