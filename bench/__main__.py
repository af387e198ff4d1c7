"""``python -m bench``: convserve on its defaults against like-for-like apps and serving frameworks, in one run.

Every server is a subprocess on a free loopback port, checked for a right answer before it is measured, and
stopped whatever happens; convserve runs on its defaults (workers auto, the bundled config.pbtxt files, access
log and prediction log on) with a state store in a temporary directory. The sections ``--only`` takes, in order:

1. scaling: ours with 1 worker and with ``auto`` (one per usable CPU), multipart uploads;
2. digits (mnist, tests/data/mnist/0000.png): ours against (a) the naive inline app (bench/peers/inline_onnx_app.py:
   resize to 28x28, one class) and (d) the like-for-like inline app (bench/peers/inline_topk_app.py: MNIST
   normalisation, top 5 with labels), each under uvicorn with 1 and with N workers, the better counting:
   raw PNG bodies and multipart uploads; v2 JSON (a tensor, so no image work) against (a); with it, the RSS per
   process of ours on its defaults and of the inline app;
3. cifar10 (tests/data/cifar10/cat_1.jpg): one colour JPEG per request, ours against (d) serving cifar10
   (decode to RGB 32x32, top 5 with labels), raw and multipart;
4. frameworks, each on the multipart upload: (b) Keras ``model.predict`` in FastAPI and (c) BentoML (its
   own venv, bench/.venv-bentoml, created on first use);
5. overload (bench/closedloop.py): one worker pinned to one core, the load generator on another; 32 and 512
   polite clients, 512 impatient ones, open-loop arrivals at twice the c=32 goodput.

After them, always: the cost, ours' server CPU per multipart request (the whole process tree) over the in-process
cost of the same work (decode, normalisation, its share of a batch-32 inference, top 5).

Closed-loop rows are wrk at c=32, in alternating rounds (requests and CPU summed, latency the rounds' median).
The table, every ratio with its goal, and the overload rows are printed; the results go to
bench/results/latest.json and, for a run of every section, into docs/benchmarks.md above its marker.
Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from bench import closedloop, targets
from bench.load import UPLOAD_SCRIPT, Load, multipart_body, post, warm
from bench.report import Row, machine_info, markdown_table, write_docs, write_json
from bench.servers import RunningServer, ServerSpec, running
from bench.targets import ROOT
from bench.workers import BODY_SCRIPT, in_process_ms, rounds, rss_by_process
from service.settings import available_cpus

SECTIONS = ("scaling", "digits", "cifar10", "frameworks", "overload")
MNIST_IMAGE = ROOT / "tests" / "data" / "mnist" / "0000.png"
CIFAR_IMAGE = ROOT / "tests" / "data" / "cifar10" / "cat_1.jpg"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measured window")
    parser.add_argument("--rounds", type=int, default=3, help="alternating windows per server and load")
    parser.add_argument("--only", nargs="*", choices=SECTIONS, help="a subset of the sections (no docs rewrite)")
    parser.add_argument("--overload-seconds", type=float, default=10.0, help="per overload window")
    parser.add_argument("--overload-rounds", type=int, default=2)
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md",
                        help="Markdown report to rewrite above its marker (a run of every section only)")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite the Markdown report")
    parser.add_argument("--bento-install-timeout", type=float, default=900.0)
    return parser.parse_args(argv)


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# --- Servers -------------------------------------------------------------------------------------

def ours(repository: Path, state: Path, workers: str = "auto") -> ServerSpec:
    """``python -m service`` on its defaults, but for the worker count where a row says so."""
    return targets.service_defaults(f"ours, workers={workers}", repository, state, {"CONVSERVE_WORKERS": workers})


def naive(workers: int) -> ServerSpec:
    """(a) the naive inline app: decode, resize to 28x28, one class."""
    return targets._uvicorn_app(f"(a) naive inline app, uvicorn workers={workers}",
                                "bench.peers.inline_onnx_app:app", 1, workers=workers)


def like_for_like(model: str, workers: int) -> ServerSpec:
    """(d) the inline app that does convserve's per-image work for ``model`` (its newest bundled version)."""
    directory = ROOT / "models" / model
    version = max(int(p.name) for p in directory.iterdir() if p.name.isdigit())
    digit = json.loads((directory / str(version) / "metadata.json").read_text()).get("digit", False)
    return targets._uvicorn_app(
        f"(d) like-for-like inline app ({model}), uvicorn workers={workers}", "bench.peers.inline_topk_app:app", 1,
        env={"MODEL": str(directory / str(version) / "model.onnx"), "LABELS": str(directory / "labels.txt"),
             "DIGIT": "1" if digit else "0", "SIZE": "28" if digit else "32"}, workers=workers)


# --- Loads ---------------------------------------------------------------------------------------

def image_loads(image: Path, image_type: str, ours_path: str) -> dict[str, dict[str, Load]]:
    """Per body kind, the load for ours (``ours_path``) and for the inline apps (their routes)."""
    raw = {"BODY_FILE": str(image), "CONTENT_TYPE": image_type}
    multipart = {"IMAGE": str(image), "IMAGE_TYPE": image_type}
    return {
        "raw": {"ours": Load(ours_path, BODY_SCRIPT, raw), "peer": Load("/predict/raw", BODY_SCRIPT, raw)},
        "multipart": {"ours": Load(ours_path, UPLOAD_SCRIPT, multipart),
                      "peer": Load("/predict", UPLOAD_SCRIPT, multipart)},
    }


def v2_json_load(image: Path, tmp: Path) -> Load:
    from PIL import Image

    pixels = np.asarray(Image.open(image).convert("L"), dtype=np.float32)
    body = tmp / "v2.json"
    body.write_text(json.dumps({"inputs": [{"name": "image", "shape": [1, *pixels.shape, 1], "datatype": "FP32",
                                            "data": pixels.ravel().tolist()}]}))
    return Load("/v2/models/mnist/infer", BODY_SCRIPT, {"BODY_FILE": str(body), "CONTENT_TYPE": "application/json"})


def check(server: RunningServer, load: Load, expected: str) -> None:
    """One request of ``load`` must answer 200 with ``expected`` (a label or class id) as its top class."""
    env = load.env or {}
    if "IMAGE" in env:
        body, content_type = multipart_body(Path(env["IMAGE"]).read_bytes(), env["IMAGE_TYPE"])
    else:
        body, content_type = Path(env["BODY_FILE"]).read_bytes(), env["CONTENT_TYPE"]
    status, _, answer = post(server.base_url + (load.path or server.spec.predict_path), body,
                             {"Content-Type": content_type})
    if status != 200:
        raise RuntimeError(f"{server.spec.name}: answered {status}: {answer[:300]!r}")
    payload = json.loads(answer)
    if "outputs" in payload:  # v2: the probabilities
        got = str(int(np.argmax(payload["outputs"][0]["data"])))
    else:
        top = payload["predictions"][0] if "predictions" in payload else payload
        got = str(top.get("label", top["class_id"])) if not expected.isdigit() else str(top["class_id"])
    if got != expected:
        raise RuntimeError(f"{server.spec.name}: answered {got}, the image is {expected}")


# --- The run -------------------------------------------------------------------------------------

@dataclass
class Ratio:
    name: str
    top: Row | None
    bottom: Row | None
    goal: str = ""
    """">= 2", "<= 2.0", or "" (for information)."""
    per: str = "requests"
    value: float | None = None
    met: bool | None = None
    text: str = ""

    def __post_init__(self) -> None:
        if self.top is None or self.bottom is None or not self.bottom.requests_per_s:
            self.text = f"- {self.name}: not measured"
            return
        self.value = self.top.requests_per_s / self.bottom.requests_per_s
        if self.goal:
            bound = float(self.goal.split()[1])
            self.met = self.value >= bound if self.goal.startswith(">=") else self.value <= bound
        verdict = "" if self.met is None else f" (goal {self.goal}: {'met' if self.met else 'NOT met'})"
        self.text = (f"- **{self.name}** = {self.value:.2f}x{verdict}: {self.top.requests_per_s:,.0f} / "
                     f"{self.bottom.requests_per_s:,.0f} req/s, p99 {self.top.p99_ms:.1f} vs {self.bottom.p99_ms:.1f}"
                     f" ms, CPU-ms per request {_ms(self.top)} vs {_ms(self.bottom)}")


def _ms(row: Row) -> str:
    return f"{row.cpu_ms_per_request:.3f}" if row.cpu_ms_per_request is not None else "-"


@dataclass
class Run:
    args: argparse.Namespace
    tmp: Path
    repository: Path
    rows: list[Row] = field(default_factory=list)
    ratios: list[Ratio] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    states: int = 0

    def state(self) -> Path:
        self.states += 1
        return self.tmp / f"state-{self.states}.sqlite"

    def alternate(self, servers: dict[str, RunningServer], load_for: dict[str, Load], label: str) -> dict[str, Row]:
        for key, server in servers.items():
            warm(server, load_for[key], 1.0, concurrency=32)
        result = rounds(servers, load_for, label, self.args.rounds, self.args.duration)
        for key, row in result.items():
            result[key] = replace(row, name=f"{label}: {servers[key].spec.name}", group=label)
        self.rows += result.values()
        return result

    def checked(self, servers: dict[str, RunningServer], loads: dict[str, Load], expected: str,
                label: str) -> dict[str, Row]:
        """``loads["ours"]`` for ours, ``loads["peer"]`` for the others: each server answers one request right
        (``expected`` is the top class), then the alternating rounds."""
        load_for = {key: loads["ours" if key == "ours" else "peer"] for key in servers}
        for key, server in servers.items():
            check(server, load_for[key], expected)
        return self.alternate(servers, load_for, label)

    def best(self, result: dict[str, Row], prefix: str) -> Row | None:
        """The better worker count of one peer: its row with the most req/s."""
        rows = [row for key, row in result.items() if key.startswith(prefix)]
        return max(rows, key=lambda r: r.requests_per_s) if rows else None


def section_scaling(run: Run) -> None:
    cpus = available_cpus()
    load = image_loads(MNIST_IMAGE, "image/png", "/models/mnist/predict")["multipart"]["ours"]
    with contextlib.ExitStack() as stack:
        servers = {n: stack.enter_context(running(ours(run.repository, run.state(), n), ROOT, run.tmp))
                   for n in ("1", "auto")}
        result = run.checked(servers, {"ours": load, "peer": load}, "7", "scaling, mnist multipart c=32")
    run.ratios.append(Ratio(f"workers=auto ({cpus} usable CPUs) / 1 worker, multipart", result["auto"],
                            result["1"], ">= 1.8"))


def section_digits(run: Run) -> None:
    cpus = available_cpus()
    counts = [1, cpus] if cpus > 1 else [1]
    loads = image_loads(MNIST_IMAGE, "image/png", "/models/mnist/predict")
    with contextlib.ExitStack() as stack:
        servers = {"ours": stack.enter_context(running(ours(run.repository, run.state()), ROOT, run.tmp))}
        for n in counts:
            servers[f"a{n}"] = stack.enter_context(running(naive(n), ROOT, run.tmp))
            servers[f"d{n}"] = stack.enter_context(running(like_for_like("mnist", n), ROOT, run.tmp))
        for kind in ("raw", "multipart"):
            result = run.checked(servers, loads[kind], "7", f"mnist {kind} PNG c=32")
            run.ratios.append(Ratio(f"ours / (a) naive inline app at its best, {kind} PNG", result["ours"],
                                    run.best(result, "a"), ">= 2"))
            run.ratios.append(Ratio(f"ours / (d) like-for-like inline app at its best, {kind} PNG", result["ours"],
                                    run.best(result, "d")))
            if kind == "multipart":
                run.results["ours_multipart_cpu_ms"] = result["ours"].cpu_ms_per_request
        v2 = v2_json_load(MNIST_IMAGE, run.tmp)
        json_servers = {key: server for key, server in servers.items() if not key.startswith("d")}
        result = run.checked(json_servers, {"ours": v2, "peer": v2}, "7", "mnist v2 JSON c=32")
        run.ratios.append(Ratio("ours / (a) naive inline app at its best, v2 JSON", result["ours"],
                                run.best(result, "a"), ">= 2"))
        run.results["rss"] = {name: rss_by_process(servers[key]) for key, name in
                              (("ours", "ours on its defaults"), ("a1", "(a) naive inline app, 1 worker"))}


def section_cifar10(run: Run) -> None:
    cpus = available_cpus()
    loads = image_loads(CIFAR_IMAGE, "image/jpeg", "/models/cifar10/predict")
    with contextlib.ExitStack() as stack:
        servers = {"ours": stack.enter_context(running(ours(run.repository, run.state()), ROOT, run.tmp))}
        for n in [1, cpus] if cpus > 1 else [1]:
            servers[f"d{n}"] = stack.enter_context(running(like_for_like("cifar10", n), ROOT, run.tmp))
        for kind in ("raw", "multipart"):
            result = run.checked(servers, loads[kind], "cat", f"cifar10 {kind} JPEG c=32")
            run.ratios.append(Ratio(f"ours / (d) inline app at its best, cifar10 {kind} JPEG", result["ours"],
                                    run.best(result, "d"), ">= 4"))


def section_frameworks(run: Run) -> None:
    load = image_loads(MNIST_IMAGE, "image/png", "/models/mnist/predict")["multipart"]
    log("BentoML: checking bench/.venv-bentoml")
    usable, bento_status = targets.ensure_bento_venv(run.args.bento_install_timeout)
    log(f"BentoML: {bento_status}")
    run.results["bentoml"] = bento_status
    frameworks: dict[str, Callable[[], ServerSpec]] = {"(b) keras": lambda: targets.keras_app(1)}
    if usable:
        (run.tmp / "bentoml-home").mkdir(exist_ok=True)
        frameworks["(c) bentoml"] = lambda: targets.bento_service(1, run.tmp / "bentoml-home")
    else:
        run.skipped["(c) bentoml"] = bento_status
    with contextlib.ExitStack() as stack:
        servers = {"ours": stack.enter_context(running(ours(run.repository, run.state()), ROOT, run.tmp))}
        for key, make in frameworks.items():
            try:
                servers[key] = stack.enter_context(running(make(), ROOT, run.tmp))
            except Exception as exc:  # one framework failing must not lose the others
                run.skipped[key] = str(exc).replace("\n", " | ")[:800]
        result = run.checked(servers, load, "7", "mnist multipart PNG c=32, frameworks")
    for key in frameworks:
        if key in result:
            run.ratios.append(Ratio(f"ours / {result[key].name.split(': ', 1)[1]}, multipart PNG", result["ours"],
                                    result[key], ">= 4"))


def section_cost(run: Run) -> None:
    ours_ms = run.results.get("ours_multipart_cpu_ms")
    if ours_ms is None:
        return
    cost = in_process_ms(MNIST_IMAGE)
    from service.dataplane import ranked_classes

    labels = (ROOT / "models" / "mnist" / "labels.txt").read_text().split()
    probabilities = np.random.default_rng(0).dirichlet(np.ones(10), 32).astype(np.float32)
    started = time.process_time()
    for _ in range(200):
        for row, classes in zip(probabilities.tolist(), ranked_classes(probabilities, 5)):
            [{"class_id": c, "label": labels[c], "score": row[c]} for c in classes]
    top5 = (time.process_time() - started) / (200 * 32) * 1000
    total = cost["total_ms"] + top5
    value = ours_ms / total
    run.results["cost"] = {**cost, "top5_ms": top5, "in_process_ms": total, "ours_ms": ours_ms, "ratio": value}
    run.lines.append(f"- **server CPU-ms per multipart request / in-process cost of the same work** = {ours_ms:.3f} "
                     f"/ {total:.3f} ms = {value:.2f} (goal <= 2.0: {'met' if value <= 2.0 else 'NOT met'}; "
                     f"in-process: decode + normalise {cost['preprocess_ms']:.3f} ms, inference "
                     f"{cost['inference_ms_per_image']:.3f} ms per image at batch 32, top 5 {top5:.3f} ms)")


def section_overload(run: Run) -> None:
    pinned = closedloop.cores()
    spec = closedloop.server_spec(run.repository, run.state(), {}, pinned[0] if pinned else None)
    with running(spec, ROOT, run.tmp) as server:
        result = closedloop.overload(server, MNIST_IMAGE.read_bytes(), run.args.overload_seconds,
                                     run.args.overload_rounds, pinned[1] if pinned else None, 6.0, 1024)
    result["where"] = (f"server ({spec.name}) on core {pinned[0]} with `taskset`, load generator on "
                       f"{sorted(pinned[1])}" if pinned else "one usable CPU: server and load generator share it")
    run.results["overload"] = result


def rss_lines(rss: dict[str, list[tuple[int, str, float]]]) -> list[str]:
    out = []
    for name, processes in rss.items():
        described = ", ".join(f"{role} {mb:.0f} MB" for _, role, mb in processes)
        out.append(f"- RSS, {name} (idle after its rows): {described}; total "
                   f"{sum(mb for *_, mb in processes):.0f} MB")
    return out


def render(run: Run, machine: dict[str, Any], command: str) -> str:
    """docs/benchmarks.md above its marker."""
    o = run.results.get("overload")
    software = ", ".join(f"{k} {machine[k]}" for k in ("python", "onnxruntime", "fastapi", "starlette", "uvicorn",
                                                          "uvloop", "numpy", "pillow", "tensorflow", "keras"))
    out = [
        "# Benchmarks",
        "",
        "convserve on its defaults next to the apps a team would otherwise write and the serving frameworks it "
        "is compared with, on the bundled models, and under overload. Generated by `python -m bench` (one run, "
        "every figure below from it); do not edit above the marker.",
        "",
        "## How to run",
        "",
        "```sh",
        command,
        "```",
        "",
        "Options: `--duration S` and `--rounds N` (closed-loop windows), `--only SECTION ...` (a subset; does not "
        "rewrite this file), `--overload-seconds`, `--overload-rounds`, `--no-docs`, `--output FILE` (JSON). "
        "`python -m bench --help` lists them; the module's docstring says what each section does.",
        "",
        "## What is measured",
        "",
        "- **ours**: `python -m service` on its defaults: workers `auto` (one per usable CPU), the bundled "
        "config.pbtxt files, batches where `auto` puts them, the admission gate, access log and prediction log "
        "on; only its state store (a temporary SQLite file) is set, and gRPC is off (`CONVSERVE_GRPC_PORT=0`: "
        "several servers run at once, and the figures compare HTTP).",
        "- **(a) naive inline app** (bench/peers/inline_onnx_app.py): FastAPI, Pillow `convert('L').resize((28, "
        "28))`, `session.run` inline, one class. It does less work than ours per image.",
        "- **(d) like-for-like inline app** (bench/peers/inline_topk_app.py): the same, doing what ours does per "
        "image in a straightforward implementation of its own: for a digit, invert a light background, crop to "
        "the ink, fit into 20x20, centre the mass in 28x28; for CIFAR-10, decode to RGB 32x32; then the top 5 "
        "classes with labels.",
        "- (a) and (d) run under uvicorn (uvloop, httptools, no access log, 1 intra-op thread) with 1 and with N "
        "workers; the better one counts.",
        "- **Serving frameworks**, each on the multipart upload of the same model: (b) Keras `model.predict` on "
        "the SavedModel in FastAPI (bench/peers/keras_predict_app.py), (c) BentoML with onnxruntime "
        "(bench/peers/bento_service.py, its own venv).",
        f"- Loads: wrk, keep-alive, c=32, {run.args.rounds} alternating rounds of {run.args.duration:g} s per "
        "server (requests and CPU summed, latency the rounds' median); mnist: tests/data/mnist/0000.png as a raw "
        "body (`image/png`), as a multipart upload, and as v2 JSON (the 784 pixels as FP32 `data`); cifar10: "
        "tests/data/cifar10/cat_1.jpg raw and multipart. Every server answers one request of each load "
        "correctly before it is measured.",
        "- Columns: req/s counts 2xx answers; p50/p99 from wrk; server CPU s is user+system time of the server's "
        "process tree in the windows; CPU wait s is how long its threads were runnable without a CPU; RSS at the "
        "end. wrk shares the cores with the server in these rows (not in the overload rows).",
        "",
        "## Machine",
        "",
        f"- Date: {machine['date_utc']}; convserve revision {machine['revision']}",
        f"- CPU: {machine['cpu_model']}, {machine['logical_cpus']} logical CPUs ({machine['usable_cpus']} usable); "
        f"RAM {machine['ram_gib']} GiB",
        f"- Load average (1/5/15 min) at start: {machine['load_average_at_start']}, at end: "
        f"{machine.get('load_average_at_end', '-')}",
        f"- Software: {software}; load generator {machine['wrk']}; BentoML: {run.results.get('bentoml', '-')}",
        "- The machine is shared with other work; the ratios compare servers measured in alternating windows "
        "seconds apart.",
        "",
        "## Results",
        "",
        markdown_table(run.rows),
        "",
        "## Ratios and goals (this run)",
        "",
        *[r.text for r in run.ratios],
        *run.lines,
        "",
    ]
    if o:
        out += ["## Overload, measured fairly", "",
                f"{o['where']}. Polite clients honour `Retry-After` and otherwise back off exponentially with full "
                "jitter (20 ms doubling, capped at 1 s); impatient ones retry after a fixed 20 ms and ignore "
                "`Retry-After`. Medians of the rounds; open loop from bench/openloop.py.", "",
                *closedloop.lines(o), ""]
    if "rss" in run.results:
        out += ["## Memory", "", *rss_lines(run.results["rss"]), ""]
    if run.skipped:
        out += ["## Not measured", "", *[f"- {k}: {v}" for k, v in run.skipped.items()], ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.chdir(ROOT)
    sections = args.only or list(SECTIONS)
    command = " ".join([".venv/bin/python -m bench", *(argv if argv is not None else sys.argv[1:])])
    machine = machine_info()
    log(f"sections {sections}; {args.rounds} x {args.duration:g} s windows; load average "
        f"{machine['load_average_at_start']}")
    with tempfile.TemporaryDirectory(prefix="convserve-bench-") as tmp_name:
        tmp = Path(tmp_name)
        repository = tmp / "models"
        repository.mkdir()
        for model in ("mnist", "cifar10"):
            (repository / model).symlink_to(ROOT / "models" / model, target_is_directory=True)
        run = Run(args, tmp, repository)
        steps: dict[str, Callable[[Run], None]] = {
            "scaling": section_scaling, "digits": section_digits, "cifar10": section_cifar10,
            "frameworks": section_frameworks, "overload": section_overload}
        for name in sections:
            log(f"section {name}")
            try:
                steps[name](run)
            except Exception as exc:  # reported; the other sections still run
                run.skipped[name] = f"{exc.__class__.__name__}: {exc}".replace("\n", " | ")[:1500]
                log(f"{name} not measured: {exc}")
        section_cost(run)
    machine["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    machine["bentoml"] = run.results.get("bentoml", "-")
    print(f"\n{machine['date_utc']}, revision {machine['revision']}: {machine['cpu_model']}, "
          f"{available_cpus()} usable CPUs; load average at the end {machine['load_average_at_end']}")
    print(markdown_table(run.rows))
    print("\n".join(["", *[r.text for r in run.ratios], *run.lines]))
    if "overload" in run.results:
        print("\n".join(["", run.results["overload"]["where"], *closedloop.lines(run.results["overload"])]))
    if "rss" in run.results:
        print("\n".join(["", *rss_lines(run.results["rss"])]))
    for name, reason in run.skipped.items():
        print(f"not measured: {name}: {reason}")
    write_json(args.output, {
        "command": command, "machine": machine, "sections": sections, "rows": [r.to_dict() for r in run.rows],
        "ratios": [{"name": r.name, "value": r.value, "goal": r.goal, "met": r.met} for r in run.ratios],
        "results": run.results, "skipped": run.skipped})
    log(f"wrote {args.output}")
    if not args.no_docs and not args.only:
        write_docs(args.docs, render(run, machine, command))
        log(f"wrote {args.docs}")
    return 1 if run.skipped else 0


if __name__ == "__main__":
    sys.exit(main())
