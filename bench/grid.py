"""``python -m bench.grid``: the batching grid of an earlier round on the bundled mnist model.

In order:

1. floor: onnxruntime alone in this process at batch 1, 64 and 256;
2. ours: ``python -m service`` with batching off and over a small batching grid, single-PNG uploads
   with wrk at each concurrency, plus 256-image KServe v2 binary requests; the trivial
   ``/v2/health/live`` route on the first server is the HTTP ceiling;
3. peers under the same load: the inline onnxruntime app, the Keras ``model.predict`` app, BentoML;
4. head to head: ours (best batching config) and the inline app alternated at c=32, and the v2 load
   alternated with the floor, so that the goal ratios compare windows seconds apart on a shared machine;
5. overload: open-loop arrivals at twice ours' c=32 capacity with a small queue bound;
6. the floor again; the table and the goal ratios, printed, saved as JSON (bench/results/grid.json) and, with
   ``--docs FILE``, written as Markdown.

Every server is a subprocess on a free loopback port, checked for a correct answer before it is
measured, and stopped whatever happens. Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import targets
from bench.floor import onnx_floor
from bench.load import UPLOAD_SCRIPT, V2_SCRIPT, Load, measure, multipart_body, post, v2_binary_body, warm
from bench.openloop import http_request, run_open_loop
from bench.report import (
    Ratio,
    Row,
    machine_info,
    markdown_table,
    overload_lines,
    ratio,
    render_markdown,
    write_docs,
    write_json,
)
from bench.servers import RunningServer, ServerSpec, running
from bench.targets import ROOT, OursConfig

V2_ROWS = 256


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.grid", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per measured point")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2 s points, c=1 and 32, one batching config, no docs rewrite")
    parser.add_argument("--skip-peers", action="store_true", help="measure only the floor, ceiling and ours")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "grid.json",
                        help="JSON results file")
    parser.add_argument("--docs", type=Path, default=None,
                        help="Markdown report to write (default: none; docs/benchmarks.md is python -m bench's)")
    parser.add_argument("--concurrency", type=_ints, default=None, help="wrk connections, e.g. 1,8,32,64")
    parser.add_argument("--batch-sizes", type=_ints, default=None, help="batching grid: max batch sizes, e.g. 8,32")
    parser.add_argument("--queue-delays-us", type=_ints, default=None,
                        help="batching grid: max queue delays, e.g. 0,500")
    parser.add_argument("--v2-concurrency", type=_ints, default=[4], help="connections for the 256-image v2 requests")
    parser.add_argument("--rounds", type=int, default=3,
                        help="head-to-head rounds: ours vs the inline app and v2 vs the floor, alternated")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads for every server and the floor (default: the server's, half the CPUs)")
    parser.add_argument("--image", type=Path, default=ROOT / "tests" / "data" / "mnist" / "0000.png",
                        help="the PNG every upload sends")
    parser.add_argument("--overload-queue-size", type=int, default=64,
                        help="CONVSERVE_MAX_QUEUE_SIZE of the overload run")
    parser.add_argument("--overload-connections", type=int, default=256, help="open-loop connection bound")
    parser.add_argument("--bento-install-timeout", type=float, default=600.0,
                        help="seconds allowed for pip install bentoml into bench/.venv-bentoml")
    return parser.parse_args(argv)


@dataclass(frozen=True)
class Plan:
    """What one run measures, from the options (``--quick`` shrinks everything)."""

    duration_s: float
    warmup_s: float
    concurrency: list[int]
    configs: list[OursConfig]
    v2_concurrency: list[int]
    threads: int
    floor_batches: tuple[int, ...]
    floor_iterations: int
    overload_s: float
    peers: bool
    rounds: int
    """Head-to-head rounds (ours vs inline app, v2 vs floor), each window half a point long."""


def make_plan(args: argparse.Namespace) -> Plan:
    from service.settings import available_cpus  # the server's own default: half the usable CPUs

    quick = args.quick
    sizes = args.batch_sizes or ([32] if quick else [8, 32])
    delays = args.queue_delays_us if args.queue_delays_us is not None else ([0] if quick else [0, 500])
    configs = [OursConfig(batching=False)] + [OursConfig(True, b, d) for b in sizes for d in delays]
    if not quick:
        configs.append(OursConfig(batching=True, shipped=True))
    return Plan(
        duration_s=2.0 if quick else args.duration,
        warmup_s=1.0 if quick else 2.0,
        concurrency=args.concurrency or ([1, 32] if quick else [1, 8, 32, 64]),
        configs=configs,
        v2_concurrency=args.v2_concurrency,
        threads=args.threads or max(1, available_cpus() // 2),
        floor_batches=(1, 64, 256),
        floor_iterations=50 if quick else 300,
        overload_s=3.0 if quick else 6.0,
        peers=not args.skip_peers,
        rounds=1 if quick else args.rounds,
    )


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# --- Correctness before speed --------------------------------------------------------------------

def _predicted_class(payload: dict[str, Any]) -> int:
    """The winning class of one image, from ours' (predictions[0]) or the peers' response shape."""
    if "predictions" in payload:
        payload = payload["predictions"][0]
    return int(payload["class_id"])


def check_upload(server: RunningServer, image: bytes, expected: int | None) -> None:
    """One upload must answer 200 with the right digit, or the server is not measured."""
    body, content_type = multipart_body(image)
    status, _, answer = post(server.base_url + server.spec.predict_path, body, {"Content-Type": content_type})
    if status != 200:
        raise RuntimeError(f"{server.spec.name}: upload answered {status}: {answer[:300]!r}")
    got = _predicted_class(json.loads(answer))
    if expected is not None and got != expected:
        raise RuntimeError(f"{server.spec.name}: predicted {got}, the image is a {expected}")


def check_v2(server: RunningServer, body: bytes, header_length: int) -> None:
    """The binary v2 request must answer 200 with [256, 10] float32 probabilities in binary."""
    status, headers, answer = post(server.base_url + "/v2/models/mnist/infer", body,
                                   {"Content-Type": "application/octet-stream",
                                    "Inference-Header-Content-Length": str(header_length)})
    length = {k.lower(): v for k, v in headers.items()}.get("inference-header-content-length")
    if status != 200 or length is None or len(answer) - int(length) != V2_ROWS * 10 * 4:
        raise RuntimeError(f"v2 binary request answered {status} ({len(answer)} bytes): {answer[:200]!r}")


# --- The measurements ----------------------------------------------------------------------------

@dataclass
class Context:
    """What every measurement needs: the plan, the temp dir, the request bodies and the results so far."""

    plan: Plan
    tmp: Path
    image: bytes
    label: int | None
    upload: Load
    v2: Load
    v2_body: bytes
    v2_header_length: int
    rows: list[Row]
    skipped: dict[str, str]

    def add(self, row: Row) -> None:
        self.rows.append(row)
        log(f"{row.name} c={row.concurrency}: {row.requests_per_s:,.1f} req/s, {row.images_per_s:,.0f} img/s, "
            f"p50 {row.p50_ms:.2f} ms, p99 {row.p99_ms:.2f} ms, errors {row.errors}, CPU {row.server_cpu_s} s, "
            f"CPU wait {row.server_wait_s} s")


def measure_floor(ctx: Context, when: str) -> None:
    """onnxruntime alone; done at the start and at the end of the run, the busier machine shows in the gap."""
    log(f"floor ({when}): onnxruntime in-process")
    for row in onnx_floor(targets.MODEL_DIR / "1" / "model.onnx", ctx.plan.threads, list(ctx.plan.floor_batches),
                          ctx.plan.floor_iterations, min_seconds=ctx.plan.duration_s / 4):
        row.name += f" ({when})"
        ctx.add(row)


def bench_ours(ctx: Context, config: OursConfig, repositories: tuple[Path, Path], ceiling: bool) -> None:
    """Uploads at every concurrency (c=32 only for the as-shipped config), the v2 binary load, and the ceiling."""
    plan = ctx.plan
    spec = targets.ours(config, repositories, plan.threads)
    log(f"starting {spec.name}")
    with running(spec, ROOT, ctx.tmp) as server:
        check_upload(server, ctx.image, ctx.label)
        check_v2(server, ctx.v2_body, ctx.v2_header_length)
        warm(server, ctx.upload, plan.warmup_s, max(plan.concurrency))
        if ceiling:
            ctx.add(measure(server, "ceiling: ours GET /v2/health/live", Load("/v2/health/live"), 32,
                            plan.duration_s, "ceiling"))
        for c in [32] if config.shipped else plan.concurrency:
            ctx.add(measure(server, f"{config.label}: upload", ctx.upload, c, plan.duration_s, "ours"))
        if not config.shipped:
            warm(server, ctx.v2, 1.0, concurrency=plan.v2_concurrency[0])
            for c in plan.v2_concurrency:
                ctx.add(measure(server, f"{config.label}: v2 binary x{V2_ROWS}", ctx.v2, c, plan.duration_s, "v2"))


def bench_peer(ctx: Context, spec: ServerSpec) -> None:
    """The same upload load at the same concurrencies against a peer; a peer that fails is reported, not fatal."""
    log(f"starting {spec.name}")
    try:
        with running(spec, ROOT, ctx.tmp) as server:
            check_upload(server, ctx.image, ctx.label)
            warm(server, ctx.upload, ctx.plan.warmup_s, max(ctx.plan.concurrency))
            for c in ctx.plan.concurrency:
                ctx.add(measure(server, spec.name, ctx.upload, c, ctx.plan.duration_s, "peer"))
    except Exception as exc:  # one peer failing must not lose the others' results
        ctx.skipped[spec.name] = str(exc).replace("\n", " | ")[:1500]
        log(f"{spec.name} not measured: {exc}")


def find(rows: list[Row], group: str, concurrency: int | None = None, name: str | None = None,
         best: bool = False) -> Row | None:
    """The row of ``group`` (at ``concurrency``, with ``name`` in its name); ``best``: highest req/s of those."""
    matches = [r for r in rows if r.group == group and (concurrency is None or r.concurrency == concurrency)
               and (name is None or name in r.name)]
    if not matches:
        return None
    return max(matches, key=lambda r: r.requests_per_s) if best else matches[0]


def best_batching(rows: list[Row]) -> Row | None:
    """Ours with batching on (grid configs, not as-shipped) with the most req/s at c=32."""
    grid = [r for r in rows if r.group == "ours" and r.concurrency == 32 and "batching b" in r.name]
    return max(grid, key=lambda r: r.requests_per_s) if grid else None


def bench_overload(ctx: Context, configs: list[OursConfig], repositories: tuple[Path, Path],
                   queue_size: int, connections: int) -> dict[str, Any]:
    """Open loop at twice the c=32 capacity of the best batching config, with a small queue bound."""
    top = best_batching(ctx.rows) or find(ctx.rows, "ours", 32, best=True)
    if top is None:
        return {"error": "no c=32 result for ours to size the arrival rate"}
    config = next(c for c in configs if top.name.startswith(c.label + ":"))
    unloaded = find(ctx.rows, "ours", 1, name=config.label + ":")
    spec = targets.ours(config, repositories, ctx.plan.threads, {"CONVSERVE_MAX_QUEUE_SIZE": str(queue_size)})
    rate = 2 * top.requests_per_s
    log(f"overload: {config.label}, queue size {queue_size}, {rate:.0f} req/s for {ctx.plan.overload_s:g} s")
    with running(spec, ROOT, ctx.tmp) as server:
        check_upload(server, ctx.image, ctx.label)
        warm(server, ctx.upload, 1.0)
        body, content_type = multipart_body(ctx.image)
        request = http_request("POST", spec.predict_path, f"127.0.0.1:{server.port}", body, content_type)
        cpu = server.cpu_seconds()
        result = run_open_loop("127.0.0.1", server.port, request, rate, ctx.plan.overload_s, connections)
        result["server_cpu_s"] = round(server.cpu_seconds() - cpu, 2)
        result["rss_mb"] = round(server.rss_mb(), 1)
    unloaded_p50 = unloaded.p50_ms if unloaded else float("nan")
    result.update(config=config.label, max_queue_size=queue_size, capacity=top.requests_per_s,
                  unloaded_p50_ms=unloaded_p50, ok_p99_vs_unloaded_p50=result["ok_p99_ms"] / unloaded_p50)
    for line in overload_lines(result):
        log(line)
    return result


def pooled(name: str, rounds: list[Row]) -> Row:
    """One row for several rounds of the same load: totals for counts and CPU, medians for latency."""
    cpu = [r.server_cpu_s for r in rounds if r.server_cpu_s is not None]
    wait = [r.server_wait_s for r in rounds if r.server_wait_s is not None]
    return Row(name=name, concurrency=rounds[0].concurrency, duration_s=sum(r.duration_s for r in rounds),
               requests=sum(r.requests for r in rounds), images_per_request=rounds[0].images_per_request,
               p50_ms=statistics.median(r.p50_ms for r in rounds), p99_ms=statistics.median(r.p99_ms for r in rounds),
               errors=sum(r.errors for r in rounds), server_cpu_s=round(sum(cpu), 2) if cpu else None,
               rss_mb=max((r.rss_mb for r in rounds if r.rss_mb is not None), default=None),
               server_wait_s=round(sum(wait), 2) if wait else None, group="h2h",
               extra={"rounds": [round(r.images_per_s, 1) for r in rounds]})


def head_to_head(ctx: Context, config: OursConfig, repositories: tuple[Path, Path]) -> None:
    """The goal comparisons measured seconds apart instead of minutes: ours (best batching config) and the
    inline app both running, c=32 windows alternated; then the v2 binary load alternated with the floor."""
    plan = ctx.plan
    seconds = max(1.0, plan.duration_s / 2)
    rounds: dict[str, list[Row]] = {}
    ours_spec = targets.ours(config, repositories, plan.threads)
    log(f"head to head, {plan.rounds} round(s): {config.label} vs the inline app; v2 vs the floor")
    with contextlib.ExitStack() as stack:
        ours_server = stack.enter_context(running(ours_spec, ROOT, ctx.tmp))
        check_upload(ours_server, ctx.image, ctx.label)
        warm(ours_server, ctx.upload, plan.warmup_s, 32)
        inline_server = None
        if plan.peers:
            inline_server = stack.enter_context(running(targets.inline_app(plan.threads), ROOT, ctx.tmp))
            check_upload(inline_server, ctx.image, ctx.label)
            warm(inline_server, ctx.upload, plan.warmup_s, 32)
        for i in range(plan.rounds):
            windows = [(f"{config.label}: upload", ours_server, ctx.upload, 32)]
            if inline_server is not None:
                windows.append((inline_server.spec.name, inline_server, ctx.upload, 32))
            if i % 2:  # alternate which goes first
                windows.reverse()
            windows.append((f"{config.label}: v2 binary x{V2_ROWS}", ours_server, ctx.v2, plan.v2_concurrency[0]))
            for name, server, load, c in windows:
                row = measure(server, f"head to head: {name}", load, c, seconds, "h2h-round")
                rounds.setdefault(name, []).append(row)
                ctx.add(row)
            floor = onnx_floor(targets.MODEL_DIR / "1" / "model.onnx", plan.threads, [V2_ROWS], 10,
                               min_seconds=seconds)[0]
            floor.group = "h2h-round"
            rounds.setdefault(f"floor: onnxruntime in-process, batch {V2_ROWS}", []).append(floor)
            ctx.add(floor)
    for name, rows in rounds.items():
        ctx.rows.append(pooled(f"head to head ({len(rows)} x {seconds:g} s): {name}", rows))


def goal_ratios(rows: list[Row]) -> list[Ratio]:
    """The three goals of the throughput issue, and a few comparisons for context, all from this run."""
    best = best_batching(rows)
    inline = find(rows, "peer", 32, name="peer a")
    keras = find(rows, "peer", 32, name="peer b")
    bento = find(rows, "peer", 32, name="peer c")
    v2 = find(rows, "v2", name=best.name.split(":")[0] + ":") if best else find(rows, "v2", best=True)
    floor256 = find(rows, "floor", name="batch 256", best=True)  # the better of start and end: the harder goal
    off = find(rows, "ours", 32, name="batching off")
    ceiling = find(rows, "ceiling")
    h2h_ours = find(rows, "h2h", name=": upload")
    h2h_inline = find(rows, "h2h", name="peer a")
    h2h_v2 = find(rows, "h2h", name="v2 binary")
    h2h_floor = find(rows, "h2h", name="floor")
    return [
        _per_round(ratio("ours (best batching, c=32) / inline app (a), head to head", h2h_ours, h2h_inline, goal=1.3,
                         p99_no_worse=True), h2h_ours, h2h_inline),
        _per_round(ratio("v2 binary 256 images/s / raw onnxruntime batch 256, head to head", h2h_v2, h2h_floor,
                         goal=0.7, per="images"), h2h_v2, h2h_floor),
        ratio("ours (best batching, c=32) / keras predict app (b)", best, keras, goal=50),
        ratio("ours (best batching, c=32) / inline app (a), from the grid (minutes apart)", best, inline, goal=1.3,
              p99_no_worse=True),
        ratio("v2 binary 256 / floor batch 256 (better of start and end), from the grid", v2, floor256, goal=0.7,
              per="images"),
        ratio("ours (best batching, c=32) / BentoML (c)", best, bento),
        ratio("ours batching on (best) / off, c=32", best, off),
        ratio("ours (best batching, c=32) / HTTP ceiling (health route)", best, ceiling),
    ]


def _per_round(r: Ratio, top: Row | None, bottom: Row | None) -> Ratio:
    """Add the ratio of each head-to-head round, which shows how much of the spread is the machine."""
    if top is not None and bottom is not None and r.value is not None:
        each = [f"{a / b:.2f}" for a, b in zip(top.extra["rounds"], bottom.extra["rounds"]) if b]
        r.note = "; ".join(filter(None, [r.note, f"per round {', '.join(each)}"]))
    return r


# --- The run -------------------------------------------------------------------------------------

def _label(image: Path) -> int | None:
    labels = image.parent / "labels.json"
    try:
        return int(json.loads(labels.read_text())[image.name])
    except (OSError, KeyError, ValueError):
        return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.output, args.image = args.output.resolve(), args.image.resolve()
    args.docs = args.docs.resolve() if args.docs else args.docs
    plan = make_plan(args)
    os.chdir(ROOT)  # the peers' default paths and the Lua scripts are relative to the repository
    command = " ".join([".venv/bin/python -m bench.grid", *(argv if argv is not None else sys.argv[1:])])
    machine = machine_info()
    log(f"plan: {len(plan.configs)} convserve configs x c={plan.concurrency}, {plan.duration_s:g} s each; "
        f"{plan.threads} intra-op thread(s); load average {machine['load_average_at_start']}")

    with tempfile.TemporaryDirectory(prefix="convserve-bench-") as tmp_name:
        tmp = Path(tmp_name)
        v2_body, v2_header_length = v2_binary_body(V2_ROWS)
        (tmp / "v2_body.bin").write_bytes(v2_body)
        ctx = Context(
            plan=plan, tmp=tmp, image=args.image.read_bytes(), label=_label(args.image),
            upload=Load(None, UPLOAD_SCRIPT, {"IMAGE": str(args.image)}),
            v2=Load("/v2/models/mnist/infer", V2_SCRIPT,
                    {"BODY_FILE": str(tmp / "v2_body.bin"), "HEADER_LENGTH": str(v2_header_length)}, V2_ROWS),
            v2_body=v2_body, v2_header_length=v2_header_length, rows=[], skipped={})

        measure_floor(ctx, "start")

        repositories = targets.model_repositories(tmp)
        for i, config in enumerate(plan.configs):
            try:
                bench_ours(ctx, config, repositories, ceiling=i == 0)
            except Exception as exc:  # reported, and the run exits non-zero at the end
                ctx.skipped[config.label] = str(exc).replace("\n", " | ")[:1500]
                log(f"{config.label} not measured: {exc}")

        bento_status = "skipped (--skip-peers)"
        if plan.peers:
            bench_peer(ctx, targets.inline_app(plan.threads))
            bench_peer(ctx, targets.keras_app(plan.threads))
            log("BentoML: checking bench/.venv-bentoml")
            usable, bento_status = targets.ensure_bento_venv(args.bento_install_timeout)
            log(f"BentoML: {bento_status}")
            if usable:
                (tmp / "bentoml-home").mkdir()
                bench_peer(ctx, targets.bento_service(plan.threads, tmp / "bentoml-home"))
            else:
                ctx.skipped["peer c: bentoml"] = bento_status
        machine["bentoml"] = bento_status

        top = best_batching(ctx.rows)
        if top is not None and plan.rounds > 0:
            try:
                head_to_head(ctx, next(c for c in plan.configs if top.name.startswith(c.label + ":")), repositories)
            except Exception as exc:  # the grid's ratios still stand
                ctx.skipped["head to head"] = str(exc).replace("\n", " | ")[:1500]
                log(f"head to head not measured: {exc}")

        try:
            overload = bench_overload(ctx, plan.configs, repositories, args.overload_queue_size,
                                      args.overload_connections)
        except Exception as exc:
            overload = {"error": f"{exc.__class__.__name__}: {exc}"}

        measure_floor(ctx, "end")

    machine["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    ratios = goal_ratios(ctx.rows)
    results = {
        "command": command,
        "quick": args.quick,
        "settings": {"duration_s": plan.duration_s, "warmup_s": plan.warmup_s, "concurrency": plan.concurrency,
                     "threads": plan.threads, "v2_concurrency": plan.v2_concurrency,
                     "floor_batches": list(plan.floor_batches), "floor_iterations": plan.floor_iterations,
                     "configs": [c.label for c in plan.configs], "image": str(args.image), "rounds": plan.rounds},
        "machine": machine,
        "rows": [r.to_dict() for r in ctx.rows],
        "ratios": [vars(r) for r in ratios],
        "overload": overload,
        "skipped": ctx.skipped,
    }

    table = [r for r in ctx.rows if r.group != "h2h-round"]
    print(markdown_table(table))
    print()
    print("\n".join(r.line() for r in ratios))
    print()
    print("\n".join(overload_lines(overload)))
    for name, reason in ctx.skipped.items():
        print(f"not measured: {name}: {reason}")
    write_json(args.output, results)
    log(f"wrote {args.output}")
    docs = args.docs
    if docs is not None and str(docs):
        write_docs(docs, render_markdown(results, table, ratios))
        log(f"wrote {docs}")
    return 1 if any(c.label in ctx.skipped for c in plan.configs) else 0


if __name__ == "__main__":
    sys.exit(main())
