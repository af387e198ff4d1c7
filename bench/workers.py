"""``python -m bench.workers``: what worker processes buy, on the bundled mnist model.

1. scaling: ours with 1 worker and with N (2, and the usable CPUs when that is more), every other setting
   at its default, single-PNG multipart uploads at c=32, in alternating rounds;
2. ours on its defaults (workers auto, bundled config.pbtxt) against the inline FastAPI + onnxruntime app
   (bench/peers/inline_onnx_app.py) served by uvicorn with 1 and with N workers (the better one is its best
   configuration here): raw PNG body, multipart, and Open Inference Protocol JSON, c=32, alternating rounds;
3. cost: ours' server CPU-ms per multipart request (the whole process tree) divided by the in-process cost
   of the same request (decode + digit normalisation + its share of a batch-32 inference);
4. RSS of the supervisor and of each worker.

Rows from the rounds are pooled (requests and CPU summed). Progress to stderr, results to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from bench.floor import session
from bench.load import UPLOAD_SCRIPT, Load, measure, warm
from bench.report import Row, print_run
from bench.servers import RunningServer, ServerSpec, _rss_kb, process_tree, running
from bench.targets import MODEL_DIR, ROOT, model_repositories
from service.preprocessing import ImageLimits, ImageSpec, preprocess
from service.settings import available_cpus

BODY_SCRIPT = ROOT / "bench" / "lua" / "body.lua"
CONCURRENCY = 32


def ours(repository: Path, workers: str) -> ServerSpec:
    """``python -m service`` with every default but the worker count."""
    return ServerSpec(
        name=f"ours, workers={workers}",
        command=[sys.executable, "-m", "service", "--models-dir", str(repository), "--host", "127.0.0.1",
                 "--port", "{port}", "--workers", workers],
        ready_path="/v2/health/ready", predict_path="/models/mnist/predict")


def inline(workers: int) -> ServerSpec:
    return ServerSpec(
        name=f"inline app, uvicorn workers={workers}",
        command=[sys.executable, "-m", "uvicorn", "bench.peers.inline_onnx_app:app", "--host", "127.0.0.1",
                 "--port", "{port}", "--no-access-log", "--log-level", "warning", "--workers", str(workers)],
        ready_path="/openapi.json", predict_path="/predict",
        env={"THREADS": "1", "MODEL": str(MODEL_DIR / "1" / "model.onnx")})


def loads(image: Path, tmp: Path) -> dict[str, dict[str, Load]]:
    """Per body kind, the load for ours and for the inline app (same bytes, each server's route)."""
    raw = Load(None, BODY_SCRIPT, {"BODY_FILE": str(image), "CONTENT_TYPE": "image/png"})
    pixels = np.asarray(Image.open(image).convert("L"), dtype=np.float32)
    v2 = tmp / "v2.json"
    v2.write_text(json.dumps({"inputs": [{"name": "image", "shape": [1, *pixels.shape, 1], "datatype": "FP32",
                                          "data": pixels.ravel().tolist()}]}))
    v2_env = {"BODY_FILE": str(v2), "CONTENT_TYPE": "application/json"}
    multipart = Load(None, UPLOAD_SCRIPT, {"IMAGE": str(image)})
    return {
        "multipart": {"ours": multipart, "inline": multipart},
        "raw PNG": {"ours": raw, "inline": replace(raw, path="/predict/raw")},
        "v2 JSON": {"ours": Load("/v2/models/mnist/infer", BODY_SCRIPT, v2_env),
                    "inline": Load("/v2/models/mnist/infer", BODY_SCRIPT, v2_env)},
    }


def pooled(rows: list[Row]) -> Row:
    """Rounds of one configuration as one row: requests, time and CPU summed; latency the rounds' median."""
    first = rows[0]
    return replace(first, duration_s=sum(r.duration_s for r in rows), requests=sum(r.requests for r in rows),
                   errors=sum(r.errors for r in rows), server_cpu_s=round(sum(r.server_cpu_s or 0 for r in rows), 2),
                   server_wait_s=round(sum(r.server_wait_s or 0 for r in rows), 2),
                   p50_ms=float(np.median([r.p50_ms for r in rows])),
                   p99_ms=float(np.median([r.p99_ms for r in rows])), extra={"rounds": len(rows)})


def rounds(servers: dict[str, RunningServer], load_for: dict[str, Load], label: str, count: int,
           duration: float) -> dict[str, Row]:
    """``count`` alternating windows per server (the order flips each round), pooled per server."""
    measured: dict[str, list[Row]] = {key: [] for key in servers}
    order = list(servers)
    for i in range(count):
        for key in order if i % 2 == 0 else reversed(order):
            print(f"  {label}: {servers[key].spec.name}, round {i + 1}", file=sys.stderr)
            measured[key].append(measure(servers[key], f"{label}: {servers[key].spec.name}", load_for[key],
                                         CONCURRENCY, duration, label))
    return {key: pooled(rows) for key, rows in measured.items()}


def in_process_ms(image: Path, batch: int = 32, repeats: int = 2000) -> dict[str, float]:
    """The cost of one upload's work without HTTP: decode + digit normalisation, and 1/batch of a batch run."""
    data = image.read_bytes()
    spec, limits = ImageSpec(28, 28, 1, digit=True), ImageLimits(10 << 20, 25_000_000)
    for _ in range(50):
        preprocess(data, spec, limits)
    started = time.process_time()
    for _ in range(repeats):
        row = preprocess(data, spec, limits)
    prep = (time.process_time() - started) / repeats * 1000
    runtime = session(MODEL_DIR / "1" / "model.onnx", 1)
    rows = np.repeat(row[None], batch, axis=0)
    for _ in range(20):
        runtime.run(None, {"image": rows})
    started = time.process_time()
    runs = max(20, repeats // batch)
    for _ in range(runs):
        runtime.run(None, {"image": rows})
    infer = (time.process_time() - started) / runs / batch * 1000
    return {"preprocess_ms": prep, "inference_ms_per_image": infer, "total_ms": prep + infer}


def rss_by_process(server: RunningServer) -> list[tuple[int, str, float]]:
    out = []
    for pid in process_tree(server.process.pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        role = ("supervisor" if pid == server.process.pid else "worker" if "spawn_main" in cmdline
                else "resource tracker" if "resource_tracker" in cmdline else "other")
        out.append((pid, role, _rss_kb(pid) / 1024))
    return out


def ratio_line(name: str, top: Row, bottom: Row) -> str:
    value = top.requests_per_s / bottom.requests_per_s if bottom.requests_per_s else float("nan")
    return (f"- **{name}** = {value:.2f}x ({top.requests_per_s:,.0f} / {bottom.requests_per_s:,.0f} req/s; "
            f"p99 {top.p99_ms:.1f} vs {bottom.p99_ms:.1f} ms)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.workers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measured window")
    parser.add_argument("--rounds", type=int, default=3, help="alternating windows per configuration")
    parser.add_argument("--image", type=Path, default=ROOT / "tests" / "data" / "mnist" / "0000.png")
    args = parser.parse_args(argv)
    cpus = available_cpus()
    counts = sorted({2, cpus})
    rows: list[Row] = []
    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp_name:
        tmp = Path(tmp_name)
        _, shipped = model_repositories(tmp)
        body_loads = loads(args.image, tmp)
        multipart = body_loads["multipart"]["ours"]

        print("scaling: ours with 1 and N workers", file=sys.stderr)
        with contextlib.ExitStack() as stack:
            servers = {str(n): stack.enter_context(running(ours(shipped, str(n)), ROOT, tmp)) for n in [1, *counts]}
            for server in servers.values():
                warm(server, multipart, 2.0)
            scaling = rounds(servers, dict.fromkeys(servers, multipart), "multipart c=32", args.rounds,
                             args.duration)
            rows += scaling.values()
            for n in counts:
                lines.append(ratio_line(f"{n} workers / 1 worker, multipart c=32", scaling[str(n)], scaling["1"]))
            rss = {key: rss_by_process(server) for key, server in servers.items()}

        print("ours on defaults vs the inline app", file=sys.stderr)
        with contextlib.ExitStack() as stack:
            servers = {"ours": stack.enter_context(running(ours(shipped, "auto"), ROOT, tmp))}
            for n in [1, cpus] if cpus > 1 else [1]:
                servers[f"inline{n}"] = stack.enter_context(running(inline(n), ROOT, tmp))
            for kind, by_server in body_loads.items():
                load_for = {key: by_server["ours" if key == "ours" else "inline"] for key in servers}
                for key, server in servers.items():
                    warm(server, load_for[key], 1.0)
                result = rounds(servers, load_for, f"{kind} c=32", args.rounds, args.duration)
                rows += result.values()
                best = max((row for key, row in result.items() if key != "ours"), key=lambda r: r.requests_per_s)
                lines.append(ratio_line(f"ours (defaults) / inline app at its best ({best.name.split(': ')[1]}), "
                                        f"{kind}", result["ours"], best))
                if kind == "multipart":
                    ours_cpu_ms = result["ours"].cpu_ms_per_request

    cost = in_process_ms(args.image)
    lines.append(f"- **server CPU-ms per multipart request / in-process cost** = {ours_cpu_ms:.3f} / "
                 f"{cost['total_ms']:.3f} ms = {ours_cpu_ms / cost['total_ms']:.2f} (in-process: decode + "
                 f"normalise {cost['preprocess_ms']:.3f} ms, inference {cost['inference_ms_per_image']:.3f} ms "
                 "per image at batch 32)")
    for key, processes in rss.items():
        described = ", ".join(f"{role} {mb:.0f} MB" for _, role, mb in processes)
        lines.append(f"- RSS, {key} worker(s): {described}; total {sum(mb for *_, mb in processes):.0f} MB")
    print_run(rows, lines, f", {cpus} usable CPUs (cgroup-aware)")


if __name__ == "__main__":
    main()
