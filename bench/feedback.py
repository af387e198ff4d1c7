"""``python -m bench.feedback``: what the prediction log costs on the request path, log on vs off in one run.

Ours on its defaults (workers auto, a SQLite state store, 10% of inputs kept) against the same server with
``CONVSERVE_PREDICTION_LOG=false``, single-PNG multipart uploads and raw PNG bodies at c=32, in alternating
rounds. The goal: at most 5% fewer req/s with the log on. After the run, the log-on server's own counters
say how many records were written and dropped. Progress to stderr, results to stdout.

With ``--pinned`` each server is one worker pinned to one core (``taskset``) and wrk runs on the others, as in
bench.closedloop: on a shared 2-core machine, two runs of the unpinned form of the same code gave 0.95x and 1.12x,
so that form cannot tell a 5% cost from the machine's noise.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import re
import tempfile
from pathlib import Path

import httpx

from bench.closedloop import cores, generator_pinned, server_spec
from bench.load import warm
from bench.report import Row, print_run
from bench.servers import ServerSpec, running
from bench.targets import ROOT, model_repositories, service_defaults
from bench.workers import loads, rounds


def ours(repository: Path, state: Path, log: bool, core: str | None = None) -> ServerSpec:
    env = {"CONVSERVE_PREDICTION_LOG": str(log).lower()}
    spec = (service_defaults("ours", repository, state, env) if core is None
            else server_spec(repository, state, env, core))
    return dataclasses.replace(spec, name=f"{spec.name}, prediction log {'on' if log else 'off'}")


def counter(text: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.feedback", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measured window")
    parser.add_argument("--rounds", type=int, default=3, help="alternating windows per configuration")
    parser.add_argument("--image", type=Path, default=ROOT / "tests" / "data" / "mnist" / "0000.png")
    parser.add_argument("--pinned", action="store_true",
                        help="one worker per server pinned to one core, the load generator on the others")
    args = parser.parse_args(argv)
    pins = cores() if args.pinned else None
    core, generator = pins if pins else (None, None)
    rows: list[Row] = []
    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-feedback-") as tmp_name:
        tmp = Path(tmp_name)
        _, shipped = model_repositories(tmp)
        body_loads = loads(args.image, tmp)
        with contextlib.ExitStack() as stack:
            servers = {"on": stack.enter_context(running(ours(shipped, tmp / "on.sqlite", True, core), ROOT, tmp)),
                       "off": stack.enter_context(running(ours(shipped, tmp / "off.sqlite", False, core), ROOT, tmp))}
            stack.enter_context(generator_pinned(generator))
            for kind in ("multipart", "raw PNG"):
                load = body_loads[kind]["ours"]
                for server in servers.values():
                    warm(server, load, 2.0)
                result = rounds(servers, dict.fromkeys(servers, load), f"{kind} c=32", args.rounds, args.duration)
                rows += result.values()
                on, off = result["on"], result["off"]
                lines.append(f"- **{kind}, log on / log off** = {on.requests_per_s / off.requests_per_s:.3f}x "
                             f"({on.requests_per_s:,.0f} / {off.requests_per_s:,.0f} req/s; p99 {on.p99_ms:.1f} vs "
                             f"{off.p99_ms:.1f} ms; CPU-ms per request {on.cpu_ms_per_request:.3f} vs "
                             f"{off.cpu_ms_per_request:.3f})")
            metrics = httpx.get(servers["on"].base_url + "/metrics", timeout=10).text
            written = counter(metrics, "convserve_prediction_log_written_total")
            dropped = counter(metrics, "convserve_prediction_log_dropped_total")
            lines.append(f"- log-on server: {written:,.0f} records written, {dropped:,.0f} dropped")
    print_run(rows, lines)


if __name__ == "__main__":
    main()
