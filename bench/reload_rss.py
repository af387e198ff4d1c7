"""Memory over load/unload cycles and swap latency, against a real server.

    python -m bench.reload_rss [--cycles 20] [--models-dir models] [--model mnist]

Starts ``python -m service`` with the repository API on, unloads and loads a model through
it ``--cycles`` times while measuring the server's RSS, then publishes a new version of the
model into a copy of the repository and times how long until requests see it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

TOKEN = "bench-token"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--model", default="mnist")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="convserve-reload-"))
    repo = workdir / "models"
    shutil.copytree(args.models_dir / args.model, repo / args.model)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "CONVSERVE_ADMIN_TOKEN": TOKEN, "CONVSERVE_REPOSITORY_POLL_SECONDS": "0.2",
           "CONVSERVE_ACCESS_LOG": "false"}
    server = subprocess.Popen([sys.executable, "-m", "service", "--models-dir", str(repo), "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    auth = {"authorization": f"Bearer {TOKEN}"}
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            for _ in range(300):
                try:
                    if http.get("/v2/health/ready").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
            image = Path("tests/data/mnist/0000.png").read_bytes()
            http.post(f"/models/{args.model}/predict", content=image, headers={"content-type": "image/png"})
            samples = [rss_mb(server.pid)]
            for _ in range(args.cycles):
                http.post(f"/v2/repository/models/{args.model}/unload", headers=auth).raise_for_status()
                http.post(f"/v2/repository/models/{args.model}/load", headers=auth).raise_for_status()
                http.post(f"/models/{args.model}/predict", content=image, headers={"content-type": "image/png"})
                samples.append(rss_mb(server.pid))
            print(f"RSS over {args.cycles} unload/load cycles (MB): start {samples[0]:.1f}, "
                  f"after cycle 1 {samples[1]:.1f}, end {samples[-1]:.1f}, max {max(samples):.1f}")
            print("per cycle:", " ".join(f"{s:.0f}" for s in samples))

            versions = sorted(int(p.name) for p in (repo / args.model).iterdir() if p.name.isdigit())
            new = versions[-1] + 1
            staging = repo / args.model / ".staging-bench"
            shutil.copytree(repo / args.model / str(versions[-1]), staging)
            published = time.monotonic()
            os.rename(staging, repo / args.model / str(new))
            while True:
                response = http.post(f"/models/{args.model}/predict", content=image,
                                     headers={"content-type": "image/png"})
                if response.json().get("version") == new:
                    break
            print(f"swap: version {new} answered {time.monotonic() - published:.3f}s after the rename "
                  f"(poll interval 0.2s, includes load and warm-up)")
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
