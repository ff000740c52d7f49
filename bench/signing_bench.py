"""What message signing costs a request on the cache-hit path.

The same workers (2 control, 1 docker) serve the same cache hits twice: with signing off,
then restarted with ``BUILDQ_SIGNING_KEY``/``_CERT``/``_CERTS_DIR`` while this client signs
with its own key. A cache hit crosses the broker once (client → control) and its answer
comes back through the result backend, so the difference is one signature by the client
and its verification on the worker (twice: the consumer checks it, the pool process
decodes it again), plus the larger message. Also timed alone: sign and verify of one
request's message, in this process.

    python bench/signing_bench.py [--quick]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BenchResult, Cluster, Row, exit_on_sigterm, median, percentile, table

from tests import services


def _log(msg: str) -> None:
    print(f"[signing] {msg}", file=sys.stderr, flush=True)


def _identity(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:3072", "-nodes", "-days", "2",
                    "-subj", f"/O=buildq-bench/CN={name}", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return key, cert


def _point(env: dict[str, str]) -> None:
    import threading

    from config.settings import Settings
    from tasks.app import app, configure

    configure(Settings.from_env(env))
    app._pool = None
    app._local = threading.local()
    app.amqp._producer_pool = None


def _hits(ctx: Path, dest: str, n: int) -> tuple[list[float], list[dict[str, Any]]]:
    from tasks import build_image

    latencies, records = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        record = build_image.delay(str(ctx), destination=dest).get(timeout=120)
        latencies.append((time.perf_counter() - t0) * 1000)
        records.append(record)
    return latencies, records


def _sign_verify(key: Path, cert: Path, trusted: Path, reps: int) -> tuple[float, float]:
    """Median ms to sign, and to verify, one request's message body in this process."""
    from celery.security.certificate import Certificate, FSCertStore
    from celery.security.key import PrivateKey
    from celery.security.serialization import SecureSerializer

    s = SecureSerializer(PrivateKey(key.read_text()), Certificate(cert.read_text()),
                         FSCertStore(str(trusted)), "sha256", serializer="json")
    body = [["/srv/src/app"], {"destination": "registry.example.com/team/app"},
            {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    signs, verifies = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        packed = s.serialize(body)
        t1 = time.perf_counter()
        s.deserialize(packed)
        t2 = time.perf_counter()
        signs.append((t1 - t0) * 1000)
        verifies.append((t2 - t1) * 1000)
    return median(signs), median(verifies)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke test)")
    args = parser.parse_args(argv)
    exit_on_sigterm()
    n = 10 if args.quick else 40
    result = BenchResult(
        name="signing", title="Cache hit with and without message signing",
        baseline="the same cache hits, same workers and context, with signing off.",
        method=f"{n} sequential `build_image.delay(...).get()` cache hits of a 200-file context "
               "(base policy tag) against 2 control and 1 docker worker; then the workers are "
               "restarted with an RSA-3072 key, its certificate and a trusted-certificates "
               "directory, this client signs with its own key, and the same hits are timed. "
               "Sign and verify of one message are also timed alone.",
        quick=args.quick, params={"requests": n})
    root = Path(tempfile.mkdtemp(prefix="buildq-signing-bench-"))
    cluster = Cluster.start(root, [])
    try:
        cluster.env["BUILDQ_BASE_POLICY"] = "tag"
        ctx = root / "ctx"
        ctx.mkdir()
        (ctx / "Dockerfile").write_text(f"FROM {services.BASE_IMAGE}\nCOPY . /app\n")
        for i in range(200):
            (ctx / f"f{i:03}.txt").write_text(f"{uuid.uuid4()}\n" * 40)
        assert cluster.registry is not None
        dest = f"{cluster.registry.host}/bench/signing"
        for pool, concurrency in (("control", 2), ("docker", 1)):
            cluster.start_worker(pool, concurrency)
        _point(cluster.env)
        from tasks import build_image

        first = build_image.delay(str(ctx), destination=dest).get(timeout=600)
        if first["status"] != "built":
            raise RuntimeError(f"the first build did not build: {first}")
        _hits(ctx, dest, 3)  # warm both sides
        plain, plain_records = _hits(ctx, dest, n)
        _log(f"signing off: median {median(plain):.1f} ms, p90 {percentile(plain, 90):.1f} ms")

        keys, trusted = root / "keys", root / "trusted"
        keys.mkdir()
        trusted.mkdir()
        worker_key, worker_cert = _identity(keys, "workers")
        client_key, client_cert = _identity(keys, "client")
        for cert in (worker_cert, client_cert):
            (trusted / cert.name).write_text(cert.read_text())
        for _, proc in list(cluster.workers):
            cluster.stop_worker(proc)
        cluster.env.update({"BUILDQ_SIGNING_KEY": str(worker_key),
                            "BUILDQ_SIGNING_CERT": str(worker_cert),
                            "BUILDQ_SIGNING_CERTS_DIR": str(trusted)})
        for pool, concurrency in (("control", 2), ("docker", 1)):
            cluster.start_worker(pool, concurrency)
        _point({**cluster.env, "BUILDQ_SIGNING_KEY": str(client_key),
                "BUILDQ_SIGNING_CERT": str(client_cert)})
        _hits(ctx, dest, 3)
        signed, signed_records = _hits(ctx, dest, n)
        _log(f"signing on: median {median(signed):.1f} ms, p90 {percentile(signed, 90):.1f} ms")
        sign_ms, verify_ms = _sign_verify(client_key, client_cert, trusted, 200)
        _log(f"one message: sign {sign_ms:.2f} ms, verify {verify_ms:.2f} ms")

        statuses = {r["status"] for r in plain_records + signed_records}
        verified = all(r["requester_verified"] for r in signed_records)
        cost = median(signed) - median(plain)
        rows = [
            Row("cache hit, signing on: median round trip", median(signed), "ms",
                baseline=median(plain), baseline_label="signing off (median)",
                target="<= signing off + 10 ms", passed=cost <= 10),
            Row("cache hit, signing on: p90 round trip", percentile(signed, 90), "ms",
                baseline=percentile(plain, 90), baseline_label="signing off (p90)"),
            Row("sign one request message (RSA-3072, client)", sign_ms, "ms"),
            Row("verify one request message (worker)", verify_ms, "ms"),
        ]
        print(table(rows))
        result.write(rows, figures={"plain_ms": plain, "signed_ms": signed,
                                    "median_cost_ms": cost, "sign_ms": sign_ms,
                                    "verify_ms": verify_ms},
                     invariants={"all cache hits skipped": statuses == {"skipped"},
                                 "signed records name a verified requester": verified})
        return 0 if statuses == {"skipped"} and verified else 1
    except Exception as exc:
        result.write(error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
