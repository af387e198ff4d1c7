"""Closed-loop load with wrk, and the request bodies the benchmark sends.

wrk keeps ``concurrency`` keep-alive connections busy for a fixed time. The request scripts
(bench/upload.lua, bench/lua/v2_binary.lua) are combined with bench/lua/report.lua, whose
``done()`` prints one JSON line of counts and latency percentiles that :func:`run_wrk` parses.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.report import Row
from bench.servers import RunningServer, settle

BENCH_DIR = Path(__file__).resolve().parent
UPLOAD_SCRIPT = BENCH_DIR / "upload.lua"
V2_SCRIPT = BENCH_DIR / "lua" / "v2_binary.lua"
REPORT_SCRIPT = BENCH_DIR / "lua" / "report.lua"
BOUNDARY = "convservebenchboundary"  # the same as bench/upload.lua's


@dataclass(frozen=True)
class Load:
    """What wrk sends: a request script (None: plain GET), its environment, and images per request."""

    path: str | None
    """None: the server's upload route (ServerSpec.predict_path)."""
    script: Path | None = None
    env: dict[str, str] | None = None
    images_per_request: int = 1


# --- Request bodies ------------------------------------------------------------------------------

def multipart_body(image: bytes, image_type: str = "image/png") -> tuple[bytes, str]:
    """The body and content type bench/upload.lua sends: one image in form field ``file``."""
    name = "image." + image_type.removeprefix("image/")
    body = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            f"Content-Type: {image_type}\r\n\r\n").encode() + image + f"\r\n--{BOUNDARY}--\r\n".encode()
    return body, f"multipart/form-data; boundary={BOUNDARY}"


def v2_binary_body(rows: int, seed: int = 0) -> tuple[bytes, int]:
    """A KServe v2 binary-tensor request: random uint8-valued float32 [rows,28,28,1], binary output.

    Returns the body (JSON header + raw little-endian float32) and the JSON header's length.
    """
    x = np.random.default_rng(seed).integers(0, 256, (rows, 28, 28, 1)).astype("<f4")
    header = json.dumps({
        "inputs": [{"name": "image", "shape": list(x.shape), "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes}}],
        "parameters": {"binary_data_output": True},
    }).encode()
    return header + x.tobytes(), len(header)


def post(url: str, body: bytes, headers: dict[str, str], timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
    """One request with the standard library: (status, headers, body). For checks, not for load."""
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


# --- wrk -----------------------------------------------------------------------------------------

def run_wrk(url: str, concurrency: int, duration_s: float, script: Path | None = None,
            env: dict[str, str] | None = None, timeout_s: float = 20.0) -> dict[str, Any]:
    """Run wrk and return report.lua's numbers (latencies in microseconds)."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as wrapper:
        if script is not None:
            wrapper.write(f'dofile("{script}")\n')
        wrapper.write(f'dofile("{REPORT_SCRIPT}")\n')
    threads = max(1, min(2, concurrency))
    command = ["wrk", f"-t{threads}", f"-c{concurrency}", f"-d{max(1, round(duration_s))}s",
               f"--timeout={timeout_s:g}s", "-s", wrapper.name, url]
    try:
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})},
                              timeout=duration_s + timeout_s + 30)
    finally:
        os.unlink(wrapper.name)
    for line in done.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            return json.loads(line.removeprefix("BENCH_JSON "))
    raise RuntimeError(f"wrk printed no result (exit {done.returncode}): {done.stdout[-500:]} {done.stderr[-500:]}")


def measure(server: RunningServer, name: str, load: Load, concurrency: int, duration_s: float,
            group: str) -> Row:
    """One measured window: wrk at ``concurrency`` for ``duration_s``, with the server's CPU and RSS."""
    settled = time.monotonic()
    settle(server)
    settled = time.monotonic() - settled
    cpu_before, wait_before = server.cpu_seconds(), server.runqueue_wait_seconds()
    result = run_wrk(server.base_url + (load.path or server.spec.predict_path), concurrency, duration_s,
                     load.script, load.env)
    cpu = server.cpu_seconds() - cpu_before
    wait = server.runqueue_wait_seconds() - wait_before
    socket_errors = result["connect"] + result["read"] + result["write"] + result["timeout"]
    return Row(
        name=name, concurrency=concurrency, duration_s=result["duration_us"] / 1e6,
        requests=result["requests"] - result["status"], images_per_request=load.images_per_request,
        p50_ms=result["p50_us"] / 1000, p99_ms=result["p99_us"] / 1000,
        errors=result["status"] + socket_errors, server_cpu_s=round(cpu, 2), rss_mb=round(server.rss_mb(), 1),
        server_wait_s=round(wait, 2), group=group,
        extra={"p90_ms": result["p90_us"] / 1000, "max_ms": result["max_us"] / 1000, "non_2xx": result["status"],
               "socket_errors": socket_errors,
               "settle_s": round(settled, 2)},
    )


def warm(server: RunningServer, load: Load, seconds: float, concurrency: int = 8) -> None:
    """Unmeasured load so that first-request costs (allocations, caches, JIT paths) are paid up front."""
    if seconds > 0:
        run_wrk(server.base_url + (load.path or server.spec.predict_path), concurrency, seconds, load.script,
                load.env)
        settle(server)
