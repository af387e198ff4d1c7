"""What an explanation costs: ``/explain`` latency at c=1 for mnist and cifar10, and its CPU in predictions.

    python -m bench.explain [--requests 40] [--threads 1]

Starts ``python -m service`` on a repository linking the bundled mnist and cifar10, then per model
sends one image sequentially (one connection, keep-alive): ``--requests`` explanations, then as many
predictions. Latency is measured at the client; CPU is the server process tree's user + system time
over each run (idle between runs), so "cost in predictions" is CPU per /explain over CPU per /predict.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.servers import ServerSpec, running, settle

ROOT = Path(__file__).resolve().parent.parent
IMAGES = {"mnist": ROOT / "tests" / "data" / "mnist" / "0000.png",
          "cifar10": ROOT / "tests" / "data" / "cifar10" / "cat_1.jpg"}
WARMUP = 5


def measure(server, http: httpx.Client, path: str, image: bytes, content_type: str, n: int) -> dict[str, float]:
    """n sequential POSTs: latency percentiles (ms), server CPU per request (ms), response size (KiB)."""
    for _ in range(WARMUP):
        http.post(path, content=image, headers={"content-type": content_type}).raise_for_status()
    settle(server)
    latencies = []
    cpu_before = server.cpu_seconds()
    for _ in range(n):
        started = time.perf_counter()
        response = http.post(path, content=image, headers={"content-type": content_type})
        latencies.append((time.perf_counter() - started) * 1000)
        response.raise_for_status()
    cpu = (server.cpu_seconds() - cpu_before) * 1000 / n
    latencies.sort()
    return {"p50": statistics.median(latencies), "p95": latencies[min(n - 1, round(0.95 * (n - 1)))],
            "cpu": cpu, "kib": len(response.content) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=40, help="requests per measured run")
    parser.add_argument("--threads", type=int, default=1, help="the server's intra-op threads")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="convserve-bench-explain-") as tmp:
        repository = Path(tmp) / "models"
        repository.mkdir()
        for name in IMAGES:
            (repository / name).symlink_to(ROOT / "models" / name, target_is_directory=True)
        spec = ServerSpec(
            name="ours explain",
            command=[sys.executable, "-m", "service", "--models-dir", str(repository), "--host", "127.0.0.1",
                     "--port", "{port}"],
            ready_path="/v2/health/ready", predict_path="/models/mnist/predict",
            env={"CONVSERVE_INFERENCE_THREADS": str(args.threads), "CONVSERVE_ACCESS_LOG": "false",
                 "CONVSERVE_REPOSITORY_POLL_SECONDS": "0", "CONVSERVE_LOG_LEVEL": "warning"})
        rows = []
        with running(spec, ROOT, Path(tmp)) as server, httpx.Client(base_url=server.base_url, timeout=60) as http:
            for name, path in IMAGES.items():
                image = path.read_bytes()
                kind = "image/png" if path.suffix == ".png" else "image/jpeg"
                explained = measure(server, http, f"/models/{name}/explain", image, kind, args.requests)
                predicted = measure(server, http, f"/models/{name}/predict", image, kind, args.requests)
                rows.append((name, explained, predicted))
                print(f"{name}: done", file=sys.stderr)
    print(f"explain vs predict at c=1, {args.requests} sequential requests each, {args.threads} intra-op thread(s)")
    print("| model | /explain p50 / p95 ms | /predict p50 ms | CPU ms per /explain | CPU ms per /predict "
          "| one /explain costs | /explain response |")
    print("|---|---|---|---|---|---|---|")
    for name, e, p in rows:
        print(f"| {name} | {e['p50']:.1f} / {e['p95']:.1f} | {p['p50']:.1f} | {e['cpu']:.1f} | {p['cpu']:.2f} "
              f"| {e['cpu'] / p['cpu']:.0f} predictions | {e['kib']:.0f} KiB |")


if __name__ == "__main__":
    main()
