"""``python -m bench.tracing``: what OpenTelemetry tracing costs on the request path, in one run.

Ours on its defaults (workers auto, batches where ``auto`` puts them, the prediction log on) in six
configurations, side by side: the [tracing] extra not importable (what ``pip install convserve`` gives), the
extra installed and tracing off (the default), and tracing on (``CONVSERVE_TRACING=true``) exporting OTLP/HTTP
with the SDK's default sampler (``parentbased_always_on``: every request traced) and with
``parentbased_traceidratio`` at 0.1, 0.05 and 0.01. The spans go to a minimal OTLP/HTTP receiver on this machine (a
process that reads each export and answers 200; its CPU is reported, a real collector would run elsewhere).
Single-PNG multipart uploads and raw PNG bodies at c=32, alternating rounds. The goals: off costs nothing
measurable against not installed; on with the default sampler at most 10% fewer req/s. Progress to stderr,
results to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench.load import warm
from bench.report import Row, print_run
from bench.servers import ServerSpec, _stat, free_port, running
from bench.targets import ROOT, model_repositories
from bench.workers import loads, rounds

RECEIVER = """
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the exporter's session uses it

    def do_POST(self):
        self.rfile.read(int(self.headers["content-length"]))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""

CONFIGURATIONS = {  # name: (tracing on, the sampler's environment, the extra importable)
    "not installed": (False, {}, False),
    "installed, off": (False, {}, True),
    "on, always_on": (True, {}, True),
    "on, ratio 0.1": (True, {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"},
                      True),
    "on, ratio 0.05": (True, {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.05"},
                       True),
    "on, ratio 0.01": (True, {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"},
                       True),
}


def ours(repository: Path, state: Path, name: str, endpoint: str, blocker: Path) -> ServerSpec:
    on, sampler, importable = CONFIGURATIONS[name]
    env = {"CONVSERVE_STATE_URL": f"sqlite:///{state}", "CONVSERVE_GRPC_PORT": "0",
           "CONVSERVE_TRACING": str(on).lower(), "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, **sampler}
    if not importable:  # as if the extra were not installed: the SDK and exporters cannot be imported
        env["PYTHONPATH"] = os.pathsep.join([str(blocker), str(ROOT)])
    return ServerSpec(
        name=f"ours, tracing {name}",
        command=[sys.executable, "-m", "service", "--models-dir", str(repository), "--host", "127.0.0.1",
                 "--port", "{port}"],
        ready_path="/v2/health/ready", predict_path="/models/mnist/predict", env=env)


@contextlib.contextmanager
def receiver() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-c", RECEIVER, str(port)], stdin=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        yield f"http://127.0.0.1:{port}", process
    finally:
        process.terminate()
        process.wait(10)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tracing", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measured window")
    parser.add_argument("--rounds", type=int, default=3, help="alternating windows per configuration")
    parser.add_argument("--image", type=Path, default=ROOT / "tests" / "data" / "mnist" / "0000.png")
    parser.add_argument("--only", nargs="*", choices=list(CONFIGURATIONS), help="a subset of the configurations")
    args = parser.parse_args(argv)
    names = args.only or list(CONFIGURATIONS)
    rows: list[Row] = []
    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-tracing-") as tmp_name, receiver() as (endpoint, collector):
        tmp = Path(tmp_name)
        blocker = tmp / "blocker"
        blocker.mkdir()
        (blocker / "sitecustomize.py").write_text(
            "import sys\nsys.modules['opentelemetry.sdk'] = sys.modules['opentelemetry.exporter'] = None\n")
        _, shipped = model_repositories(tmp)
        body_loads = loads(args.image, tmp)
        with contextlib.ExitStack() as stack:
            servers = {name: stack.enter_context(running(ours(shipped, tmp / f"{i}.sqlite", name, endpoint, blocker),
                                                         ROOT, tmp))
                       for i, name in enumerate(names)}
            collector_cpu = _stat(collector.pid)[1]
            for kind in ("multipart", "raw PNG"):
                load = body_loads[kind]["ours"]
                for server in servers.values():
                    warm(server, load, 2.0)
                result = rounds(servers, dict.fromkeys(servers, load), f"{kind} c=32", args.rounds, args.duration)
                rows += result.values()
                base = result.get("not installed") or result[names[0]]
                for name, row in result.items():
                    if row is base:
                        continue
                    lines.append(f"- **{kind}, {name} / {base.name.split(': ')[-1]}** = "
                                 f"{row.requests_per_s / base.requests_per_s:.3f}x ({row.requests_per_s:,.0f} / "
                                 f"{base.requests_per_s:,.0f} req/s; p99 {row.p99_ms:.1f} vs {base.p99_ms:.1f} ms; "
                                 f"CPU-ms per request {row.cpu_ms_per_request:.3f} vs {base.cpu_ms_per_request:.3f})")
            lines.append(f"- the OTLP receiver used {_stat(collector.pid)[1] - collector_cpu:.1f} CPU-s over the run")
    print_run(rows, lines)


if __name__ == "__main__":
    main()
