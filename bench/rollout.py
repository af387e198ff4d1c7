"""``python -m bench.rollout``: what a running rollout costs the clients, p50/p99 and req/s, in one run.

Three servers on the shipped defaults (workers auto, a SQLite state store, the prediction log on), mnist:

- **no rollout**: version 1 only;
- **shadow**: version 1 stable and version 2 (the same network) in shadow, copies of 25% of the requests
  (``CONVSERVE_ROLLOUT_SHADOW_FRACTION``'s default);
- **canary**: version 2 answering 10% of the requests (``CONVSERVE_ROLLOUT_TRAFFIC``'s default), stable
  running on copies of 25% of those.

The candidates are held in their phase for the whole run (the minimum of answers set out of reach), single-PNG
multipart uploads at c=32, alternating rounds. Progress to stderr, results to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.load import warm
from bench.report import Row, print_run
from bench.servers import ServerSpec, running
from bench.targets import MODEL_DIR, ROOT
from bench.workers import loads, rounds

ADMIN_TOKEN = "bench-rollout"


def repository(tmp: Path, name: str, versions: int) -> Path:
    root = tmp / name
    (root / "mnist").mkdir(parents=True)
    for entry in ("config.pbtxt", "labels.txt"):
        if (MODEL_DIR / entry).exists():
            (root / "mnist" / entry).symlink_to(MODEL_DIR / entry)
    for version in range(1, versions + 1):
        (root / "mnist" / str(version)).symlink_to(MODEL_DIR / "1", target_is_directory=True)
    return root


def ours(name: str, models: Path, state: Path) -> ServerSpec:
    return ServerSpec(
        name=name,
        command=[sys.executable, "-m", "service", "--models-dir", str(models), "--host", "127.0.0.1",
                 "--port", "{port}"],
        ready_path="/v2/health/ready", predict_path="/models/mnist/predict",
        env={"CONVSERVE_STATE_URL": f"sqlite:///{state}", "CONVSERVE_GRPC_PORT": "0",
             "CONVSERVE_ADMIN_TOKEN": ADMIN_TOKEN, "CONVSERVE_ROLLOUT_MIN_REQUESTS": "1000000000"})


def hold_rollout(base_url: str, mode: str) -> None:
    """Put version 1 stable (a fresh server serves the newest, 2) and start version 2's rollout by hand."""
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    url = f"{base_url}/v2/repository/models/mnist/rollout"
    r = httpx.post(f"{url}/promote", json={"version": "1"}, headers=headers, timeout=30)
    r.raise_for_status()
    r = httpx.post(url, json={"candidate": "2", "mode": mode}, headers=headers, timeout=30)
    r.raise_for_status()
    time.sleep(2)  # every worker has synced
    state = httpx.get(f"{base_url}/v2/models/mnist/rollout", timeout=30).json()
    assert state["state"] == mode and state["candidate"] == "2", state


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.rollout", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measured window")
    parser.add_argument("--rounds", type=int, default=3, help="alternating windows per configuration")
    parser.add_argument("--image", type=Path, default=ROOT / "tests" / "data" / "mnist" / "0000.png")
    args = parser.parse_args(argv)
    rows: list[Row] = []
    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-rollout-") as tmp_name:
        tmp = Path(tmp_name)
        load = loads(args.image, tmp)["multipart"]["ours"]
        specs = {"none": ours("ours, no rollout", repository(tmp, "none", 1), tmp / "none.sqlite"),
                 "shadow": ours("ours, shadow running", repository(tmp, "shadow", 2), tmp / "shadow.sqlite"),
                 "canary": ours("ours, canary running", repository(tmp, "canary", 2), tmp / "canary.sqlite")}
        with contextlib.ExitStack() as stack:
            servers = {key: stack.enter_context(running(spec, ROOT, tmp)) for key, spec in specs.items()}
            for mode in ("shadow", "canary"):
                hold_rollout(servers[mode].base_url, mode)
            for server in servers.values():
                warm(server, load, 2.0)
            result = rounds(servers, dict.fromkeys(servers, load), "multipart c=32", args.rounds, args.duration)
            rows += result.values()
            none = result["none"]
            for mode in ("shadow", "canary"):
                row = result[mode]
                lines.append(f"- **{mode} / no rollout** = {row.requests_per_s / none.requests_per_s:.3f}x req/s "
                             f"({row.requests_per_s:,.0f} / {none.requests_per_s:,.0f}); p50 {row.p50_ms:.2f} vs "
                             f"{none.p50_ms:.2f} ms, p99 {row.p99_ms:.2f} vs {none.p99_ms:.2f} ms; errors "
                             f"{row.errors}")
                state = httpx.get(f"{servers[mode].base_url}/v2/models/mnist/rollout", timeout=30).json()
                guards = state["guards"]
                lines.append(f"  - {mode}: {guards['candidate_answers']:,} candidate answers, "
                             f"{guards['compared']:,} rows compared, {guards['skipped']:,} copies skipped, "
                             f"agreement {guards['agreement']['value']}")
    print_run(rows, lines)


if __name__ == "__main__":
    main()
