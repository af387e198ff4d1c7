"""Result rows, the derived ratios, the machine description, and the three outputs.

Every measurement becomes a :class:`Row`; the run as a whole is printed as a Markdown table,
saved as JSON and, for ``python -m bench.grid --docs FILE``, rendered as Markdown.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

# In docs/benchmarks.md, everything after this line survives a rewrite (hand-written analysis).
KEEP_MARKER = "<!-- bench: everything below this line is kept when the harness rewrites this file -->"


@dataclass
class Row:
    """One measured configuration: a server under one load, or the in-process runtime at one batch size."""

    name: str
    concurrency: int | None
    """Connections held open by the load generator; None for in-process measurements."""
    duration_s: float
    requests: int
    """Requests (or runtime calls) answered with a 2xx status."""
    images_per_request: int
    p50_ms: float
    p99_ms: float
    errors: int = 0
    """Non-2xx responses plus socket errors (connect, read, write, timeout)."""
    server_cpu_s: float | None = None
    """CPU seconds (user + system) the server process tree used during the measured window."""
    rss_mb: float | None = None
    """Resident memory of the server process tree at the end of the window."""
    server_wait_s: float | None = None
    """Seconds the server's threads were runnable but waiting for a CPU (a busy machine, not a slow server)."""
    group: str = ""
    """Which part of the benchmark: floor, ceiling, ours, v2, peer."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    @property
    def images_per_s(self) -> float:
        return self.requests_per_s * self.images_per_request

    @property
    def cpu_ms_per_request(self) -> float | None:
        if self.server_cpu_s is None or not self.requests:
            return None
        return 1000 * self.server_cpu_s / self.requests

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(requests_per_s=round(self.requests_per_s, 2), images_per_s=round(self.images_per_s, 2),
                    cpu_ms_per_request=_round(self.cpu_ms_per_request, 3))
        return data


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _fmt(value: float | int | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:,.{digits}f}"


def markdown_table(rows: list[Row]) -> str:
    """One line per row; throughput columns first, then latency, errors and the server's cost."""
    lines = [
        "| configuration | concurrency | req/s | images/s | p50 ms | p99 ms | errors | server CPU s "
        "| CPU ms/req | CPU wait s | RSS MB |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.name} | {_fmt(r.concurrency)} | {_fmt(r.requests_per_s)} | {_fmt(r.images_per_s, 0)} "
            f"| {_fmt(r.p50_ms, 2)} | {_fmt(r.p99_ms, 2)} | {r.errors} | {_fmt(r.server_cpu_s, 2)} "
            f"| {_fmt(r.cpu_ms_per_request, 2)} | {_fmt(r.server_wait_s, 2)} | {_fmt(r.rss_mb, 0)} |")
    return "\n".join(lines)


# --- Derived ratios ------------------------------------------------------------------------------

@dataclass
class Ratio:
    """A comparison measured within one run, with its goal."""

    name: str
    numerator: str
    denominator: str
    value: float | None
    goal: float | None
    """None: informational, no goal."""
    met: bool | None
    note: str = ""

    def line(self) -> str:
        if self.value is None:
            return f"- **{self.name}**: not measured ({self.note})"
        verdict = f" (goal >= {self.goal:g}x: {'met' if self.met else 'NOT met'})" if self.goal is not None else ""
        note = f"; {self.note}" if self.note else ""
        return (f"- **{self.name}** = {self.value:.2f}x{verdict}{note}  \n"
                f"  {self.numerator} / {self.denominator}")


def ratio(name: str, top: Row | None, bottom: Row | None, goal: float | None = None, per: str = "requests",
          p99_no_worse: bool = False) -> Ratio:
    """``top`` over ``bottom`` in requests/s (or images/s), with the goal and an optional p99 condition."""
    if top is None or bottom is None:
        missing = "numerator" if top is None else "denominator"
        return Ratio(name, top.name if top else "-", bottom.name if bottom else "-", None, goal, None,
                     f"{missing} missing from this run")
    a, b = (top.images_per_s, bottom.images_per_s) if per == "images" else (top.requests_per_s, bottom.requests_per_s)
    if not b:
        return Ratio(name, top.name, bottom.name, None, goal, None, "denominator is 0 (all requests failed?)")
    value = a / b
    met = goal is None or value >= goal
    notes = []
    if p99_no_worse:
        worse = top.p99_ms > bottom.p99_ms
        met = met and not worse
        notes.append(f"p99 {top.p99_ms:.1f} ms vs {bottom.p99_ms:.1f} ms ({'worse' if worse else 'no worse'})")
    if top.server_cpu_s and bottom.server_cpu_s and top.images_per_s and bottom.images_per_s:
        # Work per CPU-second: what the ratio would be if both had had the same CPU (steadier on a shared machine).
        per_cpu = (top.requests * top.images_per_request / top.server_cpu_s) / (
            bottom.requests * bottom.images_per_request / bottom.server_cpu_s)
        notes.append(f"per CPU-second {per_cpu:.2f}x")
    note = "; ".join(notes)
    label = f" @ c={top.concurrency}" if top.concurrency else ""
    label_b = f" @ c={bottom.concurrency}" if bottom.concurrency else ""
    return Ratio(name, f"{top.name}{label} ({a:,.0f} {per}/s)", f"{bottom.name}{label_b} ({b:,.0f} {per}/s)",
                 value, goal, met, note)


# --- The machine ---------------------------------------------------------------------------------

def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _meminfo_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _wrk_version() -> str:
    try:
        out = subprocess.run(["wrk", "--version"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return "not found"
    return (out.stdout + out.stderr).splitlines()[0].split(" [")[0] if (out.stdout + out.stderr) else "unknown"


def _revision() -> str:
    """The commit measured, and whether service/ had uncommitted changes (the server runs from the work tree)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "service"], capture_output=True, text=True,
                               timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return head.stdout.strip() + (" + uncommitted changes in service/" if dirty.stdout.strip() else "")


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, memory, load, software versions, date."""
    load = os.getloadavg()
    return {
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "revision": _revision(),
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "ram_gib": _round(_meminfo_gib(), 1),
        "kernel": platform.release(),
        "load_average_at_start": [round(x, 2) for x in load],
        "python": sys.version.split()[0],
        "onnxruntime": _version("onnxruntime"),
        "fastapi": _version("fastapi"),
        "starlette": _version("starlette"),
        "uvicorn": _version("uvicorn"),
        "uvloop": _version("uvloop"),
        "httptools": _version("httptools"),
        "numpy": _version("numpy"),
        "pillow": _version("pillow"),
        "tensorflow": next((v for v in map(_version, ("tensorflow", "tensorflow-cpu")) if v != "not installed"),
                           "not installed"),
        "keras": _version("keras"),
        "wrk": _wrk_version(),
    }


# --- Outputs -------------------------------------------------------------------------------------

def write_json(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")


def _machine_lines(machine: dict[str, Any]) -> list[str]:
    software = ", ".join(f"{k} {machine[k]}" for k in (
        "python", "onnxruntime", "fastapi", "starlette", "uvicorn", "uvloop", "numpy", "pillow", "tensorflow", "keras"))
    return [
        f"- Date: {machine['date_utc']}; convserve revision {machine.get('revision', 'unknown')}",
        f"- CPU: {machine['cpu_model']}, {machine['logical_cpus']} logical CPUs ({machine['usable_cpus']} usable)",
        f"- RAM: {machine['ram_gib']} GiB; kernel {machine['kernel']}",
        f"- Load average (1/5/15 min) at start: {machine['load_average_at_start']}, "
        f"at end: {machine.get('load_average_at_end', '-')}",
        f"- Software: {software}; load generator {machine['wrk']}",
        f"- BentoML (separate venv): {machine.get('bentoml', 'not used')}",
        "- **The machine was shared**: model trainings and other developers' tests ran in the background "
        "throughout, on the same 2 cores as the servers and the load generator. Absolute numbers are noisy "
        "(run-to-run differences of 20-30% are normal here); the ratios compare configurations measured "
        "minutes apart in the same run, and the CPU ms/request column is the steadiest figure.",
    ]


def render_markdown(results: dict[str, Any], rows: list[Row], ratios: list[Ratio]) -> str:
    """The body of docs/benchmarks.md: how to run, what is measured, machine, table, ratios, overload."""
    s = results["settings"]
    out = [
        "# Benchmarks",
        "",
        "Throughput and latency of convserve on the bundled `mnist` model (models/mnist/1), next to the floor "
        "and ceiling it cannot beat and to the ways people usually serve such a model. Generated by "
        "`python -m bench.grid`; do not edit above the marker at the end.",
        "",
        "## How to run",
        "",
        "```sh",
        results["command"],
        "```",
        "",
        "Options: `--duration S` (seconds per measurement), `--quick` (smoke run: short, small grid, "
        "does not rewrite this file), `--skip-peers`, `--output FILE` (JSON; default bench/results/grid.json), "
        "`--batch-sizes`, `--queue-delays-us`, `--concurrency`, `--docs FILE`. See `python -m bench.grid --help`.",
        "",
        "## What is measured",
        "",
        f"- **Floor**: onnxruntime in the benchmark process, {s['threads']} intra-op thread(s) (what the server "
        f"uses here), batches of {', '.join(map(str, s['floor_batches']))}, {s['floor_iterations']} timed runs "
        "after warm-up. It is the model's cost alone, no HTTP, no decoding.",
        "- **Ceiling**: the server's trivial `GET /v2/health/live` under the same load generator: HTTP alone.",
        f"- **Ours**: `POST /models/mnist/predict`, one 28x28 PNG (tests/data/mnist/0000.png) per request, with "
        f"wrk (keep-alive, up to 2 threads, {s['duration_s']:g} s per point after {s['warmup_s']:g} s of warm-up per "
        "server) at each concurrency; batching off, and on over a grid of max batch size x max queue delay. "
        "The bench serves the model from a temporary repository without config.pbtxt so that "
        "`CONVSERVE_MAX_BATCH_SIZE`/`CONVSERVE_MAX_QUEUE_DELAY_US` apply; access log off and repository polling "
        "off. `as shipped` serves the bundled model directory, its config.pbtxt included, with every default "
        "(access log on); its label says what that config.pbtxt set for batching when the bench ran (max batch "
        "size, and a queue delay only if the file sets one; without one `CONVSERVE_MAX_QUEUE_DELAY_US` applies).",
        f"- **v2 binary**: `POST /v2/models/mnist/infer` with 256 images per request in the binary tensor extension "
        f"(random uint8-valued float32 [256,28,28,1], binary output), concurrency {s['v2_concurrency']}.",
        "- **Peers**, same model, same load: (a) bench/peers/inline_onnx_app.py (FastAPI, Pillow, `session.run` "
        "inline in the handler), (b) bench/peers/keras_predict_app.py (the same app with Keras `model.predict` "
        "on the SavedModel), (c) bench/peers/bento_service.py (BentoML, Pillow, onnxruntime; own venv). All use "
        f"{s['threads']} intra-op thread(s) and no access log, served by uvicorn with uvloop/httptools like ours.",
        f"- **Head to head**: the goal comparisons again, as {s.get('rounds', 0)} alternating rounds of "
        f"{max(1.0, s['duration_s'] / 2):g} s windows with both servers up: ours (the batching config with the most "
        "req/s at c=32 in the grid) vs the inline app at c=32, and ours' v2 binary load vs the floor at batch 256. "
        "Rows are pooled over the rounds (latency: median of the rounds). On a machine whose load changes from "
        "minute to minute these are the goal ratios to trust; the grid's are listed for context.",
        "- Columns: req/s counts 2xx answers only; p50/p99 from wrk's latency histogram; errors are non-2xx "
        "answers plus socket errors; server CPU s is user+system time of the server's process tree during the "
        "measured window (/proc/PID/stat); CPU ms/req is that divided by the answered requests; CPU wait s is "
        "how long the server's threads were runnable but had no CPU (/proc/PID/task/*/schedstat; high values mean "
        "the busy machine, not the server, limited that row); RSS is VmRSS summed over that tree at the end of the "
        "window. Floor rows: req/s are runtime calls, latency is per call, CPU is the benchmark process's; the floor "
        "is measured at the start and at the end of the run.",
        "- Before every measured window the harness waits until the server is idle again: a closed-loop client "
        "that stops (wrk at its end) leaves requests in flight that the servers still execute.",
        "- Ratios use requests/s (images/s for the v2 one) as measured; *per CPU-second* divides out how much CPU "
        "each side got, the fairer comparison of efficiency on a shared machine (it cannot show the gain of using "
        "two cores at once). The v2 ratio uses the better of the two floor measurements.",
        "",
        "## Machine",
        "",
        *_machine_lines(results["machine"]),
        "",
        "## Results",
        "",
        markdown_table(rows),
        "",
        "## Ratios (same run)",
        "",
        *[r.line() for r in ratios],
        "",
    ]
    overload = results.get("overload")
    if overload:
        out += ["## Overload (open loop)", "", *overload_lines(overload), ""]
    if results.get("skipped"):
        out += ["## Not measured", "", *[f"- {k}: {v}" for k, v in results["skipped"].items()], ""]
    return "\n".join(out)


def overload_lines(o: dict[str, Any]) -> list[str]:
    """The open-loop run in a few lines: offered vs answered, refusals, and the latency of what was accepted."""
    if "error" in o:
        return [f"- not measured: {o['error']}"]
    lines = [
        f"- Target: {o['config']}, `CONVSERVE_MAX_QUEUE_SIZE={o['max_queue_size']}`; arrivals at "
        f"{o['rate']:.0f} req/s (2x the c=32 capacity of {o['capacity']:.0f} req/s) for {o['duration_s']:g} s, "
        f"at most {o['connections']} connections, generator: {o['generator']}.",
        f"- Offered {o['offered']}, sent {o['sent']} ({o['unsent']} never left the client), answered "
        f"{o['answered']} in {o['wall_s']:g} s: {o['ok']} x 200 ({o['ok'] / o['wall_s']:.0f}/s goodput), "
        f"{o['status_503']} x 503 ({o['status_503_retry_after']} with Retry-After), {o['other_status']} other "
        f"statuses, {o['socket_errors']} socket errors/timeouts. Most requests waiting client-side for a free "
        f"connection: {o['max_client_backlog']}.",
        f"- Accepted (200) latency from the scheduled arrival: p50 {o['ok_p50_ms']:.1f} ms, "
        f"p99 {o['ok_p99_ms']:.1f} ms = {o['ok_p99_vs_unloaded_p50']:.0f}x the unloaded p50 at c=1 "
        f"({o['unloaded_p50_ms']:.2f} ms); from the moment it was written: p99 {o['ok_service_p99_ms']:.1f} ms. "
        f"Refusals (503) p50 {o['rejected_p50_ms']:.1f} ms from arrival.",
        f"- Server CPU {o['server_cpu_s']:.1f} s over the run; generator CPU {o['client_cpu_s']:.1f} s "
        "(it shares the 2 cores).",
    ]
    return lines


def write_docs(path: Path, markdown: str) -> None:
    """Rewrite ``path`` with ``markdown``, keeping anything below :data:`KEEP_MARKER` in the old file."""
    kept = ""
    if path.is_file():
        old = path.read_text()
        if KEEP_MARKER in old:
            kept = old.split(KEEP_MARKER, 1)[1].lstrip("\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{markdown.rstrip()}\n\n{KEEP_MARKER}\n\n{kept}".rstrip() + "\n")


def print_run(rows: list[Row], lines: list[str], machine: str = "") -> None:
    """A bench module's output: the machine and revision, the table of ``rows``, then ``lines`` (its ratios).
    ``machine`` adds to the machine's description (e.g. the usable CPUs)."""
    info = machine_info()
    print(f"\n{info['date_utc']}, revision {info['revision']}: {info['cpu_model']}{machine}, "
          f"load average at the end {info['load_average_at_start']}")
    print(markdown_table(rows))
    print("\n".join(["", *lines]))
