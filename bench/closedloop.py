"""``python -m bench.closedloop``: overload with clients that back off, measured fairly, against a real server.

The server (one worker, the bundled models, every other setting at its default unless ``--env KEY=VALUE``) is
pinned to one core with ``taskset`` and the load generator to another, so that what the clients cost is not
taken from the server (with fewer than two usable CPUs both share them, and the output says so).

Each client keeps one keep-alive connection and sends one MNIST PNG upload after another. After a refusal (503)
a *polite* client behaves like a well-kept HTTP client's retry helper (urllib3's ``Retry``, Google's API
clients): it honours ``Retry-After``, and without one it backs off exponentially with full jitter (a uniform
wait in [0, 20 ms x 2^n], capped at 1 s; a success resets n). An *impatient* client waits a fixed 20 ms and
ignores ``Retry-After``. The run measures, on the same server: 32 polite clients (the load that saturates one
worker), 512 polite clients (16x), 512 impatient clients (for information), and open-loop arrivals at twice the
c=32 goodput (bench/openloop.py), each printed with goodput (2xx per second), the accepted requests' p50/p99,
the refusals' p99 and share; then the goals of the performance issue.

Clients are asyncio protocols on uvloop with a minimal HTTP/1.1 reader (Content-Length bodies only, which is
all the service sends); latency is measured with ``time.perf_counter`` on the client side.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvloop

from bench.load import multipart_body
from bench.openloop import http_request, run_open_loop
from bench.servers import RunningServer, ServerSpec, running
from bench.targets import service_defaults

ROOT = Path(__file__).resolve().parent.parent
BASE_BACKOFF_S = 0.020
MAX_BACKOFF_S = 1.0


@dataclass(frozen=True)
class Policy:
    """What a client does after a 503."""

    name: str
    honours_retry_after: bool
    exponential: bool
    """Full-jitter exponential backoff from 20 ms (capped at 1 s); otherwise a fixed 20 ms."""

    def wait(self, retry_after: float | None, refusals_in_a_row: int, rng: random.Random) -> float:
        if self.honours_retry_after and retry_after is not None:
            return retry_after
        if not self.exponential:
            return BASE_BACKOFF_S
        return rng.uniform(0, min(MAX_BACKOFF_S, BASE_BACKOFF_S * 2 ** (refusals_in_a_row - 1)))


POLITE = Policy("polite (Retry-After, else exponential full jitter)", honours_retry_after=True, exponential=True)
IMPATIENT = Policy("impatient (fixed 20 ms, ignores Retry-After)", honours_retry_after=False, exponential=False)


@dataclass
class Tally:
    accepted: list[float] = field(default_factory=list)
    refused: list[float] = field(default_factory=list)
    retry_after: list[float] = field(default_factory=list)
    """The Retry-After values the refusals carried (seconds)."""
    errors: int = 0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Client(asyncio.Protocol):
    """One keep-alive connection sending the same request after each answer, or after a back-off on a 503.

    A protocol, not streams: at 512 clients every microsecond the generator spends per answer counts.
    Answers are small and have a Content-Length (all the service sends), so the reader only finds the end of
    the headers and counts the body.
    """

    def __init__(self, request: bytes, policy: Policy, tally: Tally, done: asyncio.Future[None],
                 rng: random.Random) -> None:
        self.request, self.policy, self.tally, self.done, self.rng = request, policy, tally, done, rng
        self.until = math.inf
        self.buffer = b""
        self.started = 0.0
        self.refusals_in_a_row = 0
        self.transport: asyncio.Transport | None = None
        self.warm: asyncio.Future[None] = done.get_loop().create_future()
        """Set by the first answer, which is not counted: a connection is measured once a worker has taken it."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.send()

    def send(self) -> None:
        if time.perf_counter() >= self.until or self.transport is None or self.transport.is_closing():
            self.finish()
            return
        self.started = time.perf_counter()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buffer[:end].lower()
        at = head.find(b"content-length:")
        length = int(head[at + 15:].split(b"\r\n", 1)[0]) if at >= 0 else 0
        if len(self.buffer) < end + 4 + length:
            return
        elapsed = time.perf_counter() - self.started
        status = int(self.buffer[9:12])
        self.buffer = self.buffer[end + 4 + length:]
        if not self.warm.done():
            self.warm.set_result(None)
            return
        if 200 <= status < 300:
            self.tally.accepted.append(elapsed)
            self.refusals_in_a_row = 0
            self.send()
        elif status == 503:
            self.tally.refused.append(elapsed)
            self.refusals_in_a_row += 1
            at = head.find(b"retry-after:")
            retry_after = float(head[at + 12:].split(b"\r\n", 1)[0]) if at >= 0 else None
            if retry_after is not None:
                self.tally.retry_after.append(retry_after)
            wait = self.policy.wait(retry_after, self.refusals_in_a_row, self.rng)
            asyncio.get_running_loop().call_later(wait, self.send)
        else:
            self.tally.errors += 1
            self.send()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            if time.perf_counter() < self.until:
                self.tally.errors += 1
            self.done.set_result(None)

    def finish(self) -> None:
        if self.transport is not None:
            self.transport.close()
        if not self.done.done():
            self.done.set_result(None)


async def _closed_loop(port: int, clients: int, seconds: float, policy: Policy, request: bytes,
                       seed: int) -> dict[str, Any]:
    tally = Tally()
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    connections: list[Client] = []
    for _ in range(clients):
        done: asyncio.Future[None] = loop.create_future()
        _, connection = await loop.create_connection(lambda d=done: Client(request, policy, tally, d, rng),
                                                     "127.0.0.1", port)
        connections.append(connection)
    await asyncio.wait_for(asyncio.gather(*(c.warm for c in connections)), 120)  # each answered once
    cpu = time.process_time()
    until = time.perf_counter() + seconds
    for connection in connections:
        connection.until = until
        loop.call_soon(connection.send)
    await asyncio.gather(*(c.done for c in connections))
    answered = len(tally.accepted) + len(tally.refused)
    return {"clients": clients, "policy": policy.name, "seconds": seconds,
            "goodput": len(tally.accepted) / seconds, "refused_per_s": len(tally.refused) / seconds,
            "accepted_p50_ms": percentile(tally.accepted, 0.5) * 1000,
            "accepted_p99_ms": percentile(tally.accepted, 0.99) * 1000,
            "refused_p99_ms": percentile(tally.refused, 0.99) * 1000,
            "refused_share": len(tally.refused) / answered if answered else float("nan"),
            "retry_after_s": statistics.median(tally.retry_after) if tally.retry_after else None,
            "errors": tally.errors, "client_cpu_s": round(time.process_time() - cpu, 2)}


def closed_loop(port: int, clients: int, seconds: float, policy: Policy, image: bytes,
                seed: int = 0) -> dict[str, Any]:
    """``clients`` connections of ``policy`` uploading ``image`` for ``seconds``: goodput and latencies."""
    body, content_type = multipart_body(image)
    request = http_request("POST", "/models/mnist/predict", "bench", body, content_type)
    return uvloop.run(_closed_loop(port, clients, seconds, policy, request, seed))


# --- Pinning -------------------------------------------------------------------------------------

def cores() -> tuple[str, set[int]] | None:
    """(the server's core for taskset, the generator's cores), or None when there is only one usable CPU."""
    usable = sorted(os.sched_getaffinity(0))
    if len(usable) < 2:
        return None
    return str(usable[0]), set(usable[1:])


@contextmanager
def generator_pinned(to: set[int] | None) -> Iterator[None]:
    """Run the block with this process (the load generator) on ``to``; restore its affinity after."""
    before = os.sched_getaffinity(0)
    if to:
        os.sched_setaffinity(0, to)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def server_spec(repository: Path, state: Path, env: dict[str, str], core: str | None) -> ServerSpec:
    """One worker on ``core`` (``taskset``), every other setting its default unless ``env`` says otherwise."""
    return service_defaults("ours, 1 worker" + (f" on core {core}" if core else ""), repository, state,
                            {"CONVSERVE_WORKERS": "1", **env}, core)


# --- The overload run ----------------------------------------------------------------------------

def overload(server: RunningServer, image: bytes, seconds: float, rounds: int, generator: set[int] | None,
             open_loop_seconds: float, open_loop_connections: int) -> dict[str, Any]:
    """The rows of the overload goals on ``server``; medians over ``rounds`` alternating windows."""
    runs: dict[str, list[dict[str, Any]]] = {"32 polite": [], "512 polite": [], "512 impatient": []}
    with generator_pinned(generator):
        closed_loop(server.port, 32, 2.0, POLITE, image)  # warm-up
        for i in range(rounds):
            for key in runs:
                clients, kind = key.split()
                print(f"  overload: {key}, round {i + 1}", file=sys.stderr)
                cpu = server.cpu_seconds()
                row = closed_loop(server.port, int(clients), seconds, POLITE if kind == "polite" else IMPATIENT,
                                  image, seed=i)
                row["server_cpu_s"] = round(server.cpu_seconds() - cpu, 2)
                runs[key].append(row)
        summary = {key: _median(rows) for key, rows in runs.items()}
        result: dict[str, Any] = {"rows": summary}
        if open_loop_seconds > 0:  # arrivals that do not slow down with the server
            rate = 2 * summary["32 polite"]["goodput"]
            body, content_type = multipart_body(image)
            request = http_request("POST", "/models/mnist/predict", f"127.0.0.1:{server.port}", body, content_type)
            cpu = server.cpu_seconds()
            result["open_loop"] = run_open_loop("127.0.0.1", server.port, request, rate, open_loop_seconds,
                                                open_loop_connections, preconnect=True)
            result["open_loop"]["server_cpu_s"] = round(server.cpu_seconds() - cpu, 2)
    return result


def _median(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in rows[0].items():
        values = [r[key] for r in rows if r[key] is not None]
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        out[key] = statistics.median(values) if is_number and values else value
    out["rounds"] = len(rows)
    return out


def goals(result: dict[str, Any]) -> list[tuple[str, float, str, bool]]:
    """(name, value, goal, met) for each overload goal of the performance issue."""
    low, high = result["rows"]["32 polite"], result["rows"]["512 polite"]
    out = [
        ("goodput, 512 polite / 32 polite", high["goodput"] / low["goodput"], ">= 0.90",
         high["goodput"] / low["goodput"] >= 0.9),
        ("accepted p99, 512 polite / 32 polite", high["accepted_p99_ms"] / low["accepted_p99_ms"], "<= 2.0",
         high["accepted_p99_ms"] / low["accepted_p99_ms"] <= 2.0),
        ("refusals p99 at 512 polite (ms)", high["refused_p99_ms"], "<= 10",
         not high["refused_p99_ms"] > 10),  # no refusal at all meets it
        ("errors at 512 polite", high["errors"], "= 0", high["errors"] == 0),
    ]
    o = result.get("open_loop")
    if o:
        goodput = o["ok"] / o["wall_s"]
        out += [("open loop 2x: goodput / capacity (c=32 goodput)", goodput / low["goodput"], ">= 0.90",
                 goodput / low["goodput"] >= 0.9),
                ("open loop 2x: accepted p99 / c=32 p99", o["ok_p99_ms"] / low["accepted_p99_ms"], "<= 2.0",
                 o["ok_p99_ms"] / low["accepted_p99_ms"] <= 2.0)]
    return out


def lines(result: dict[str, Any]) -> list[str]:
    """The overload rows and goals, as Markdown list items."""
    out = []
    for key, r in result["rows"].items():
        retry = f", Retry-After {r['retry_after_s']:g} s" if r.get("retry_after_s") is not None else ""
        out.append(f"- **{key}** ({r['policy']}): goodput {r['goodput']:,.0f}/s, accepted p50 "
                   f"{r['accepted_p50_ms']:.1f} ms, p99 {r['accepted_p99_ms']:.1f} ms; refusals "
                   f"{r['refused_per_s']:,.0f}/s ({r['refused_share']:.1%}, p99 {r['refused_p99_ms']:.1f} ms"
                   f"{retry}); errors {r['errors']:.0f}; server CPU {r['server_cpu_s']:.1f} s, generator CPU "
                   f"{r['client_cpu_s']:.1f} s per {r['seconds']:g} s window")
    o = result.get("open_loop")
    if o:
        out.append(f"- **open loop at 2x** the c=32 goodput ({o['rate']:,.0f} req/s for {o['duration_s']:g} s, at "
                   f"most {o['connections']} connections, opened before the first arrival): {o['ok']:,} x 200 "
                   f"({o['ok'] / o['wall_s']:,.0f}/s), {o['status_503']:,} x 503 ({o['status_503_retry_after']:,} "
                   f"with Retry-After), {o['other_status']} other, {o['socket_errors']} socket errors; accepted p50 "
                   f"{o['ok_p50_ms']:.1f} ms, p99 {o['ok_p99_ms']:.1f} ms from arrival ({o['ok_service_p99_ms']:.1f} "
                   f"ms from the write; most requests waiting client-side for a free connection "
                   f"{o['max_client_backlog']:,}); refusals p50 {o['rejected_p50_ms']:.1f} ms")
    for name, value, goal, met in goals(result):
        out.append(f"- goal: {name} = {value:.2f} (goal {goal}): {'met' if met else 'NOT met'}")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.closedloop", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per measured window")
    parser.add_argument("--rounds", type=int, default=2, help="alternating windows of each row")
    parser.add_argument("--env", action="append", default=[], help="server environment, KEY=VALUE")
    parser.add_argument("--open-loop-seconds", type=float, default=6.0,
                        help="then open-loop arrivals at twice the c=32 goodput for this long (0: skip)")
    parser.add_argument("--open-loop-connections", type=int, default=1024,
                        help="most connections of the open-loop run (a request due while all are busy waits "
                             "client-side, its latency counted from when it was due)")
    args = parser.parse_args(argv)
    env = dict(item.split("=", 1) for item in args.env)
    image = (ROOT / "tests" / "data" / "mnist" / "0000.png").read_bytes()
    pinned = cores()
    with tempfile.TemporaryDirectory(prefix="bench-overload-") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "repo").mkdir()
        (tmp / "repo" / "mnist").symlink_to(ROOT / "models" / "mnist", target_is_directory=True)
        spec = server_spec(tmp / "repo", tmp / "state.sqlite", env, pinned[0] if pinned else None)
        with running(spec, ROOT, tmp) as server:
            result = overload(server, image, args.seconds, args.rounds, pinned[1] if pinned else None,
                              args.open_loop_seconds, args.open_loop_connections)
    where = (f"server on core {pinned[0]}, generator on {sorted(pinned[1])}" if pinned
             else "one usable CPU: server and generator share it")
    print(f"{spec.name}, env {env or 'defaults'}; {where}; load average at the end {os.getloadavg()[0]:.1f}")
    print("\n".join(lines(result)))


if __name__ == "__main__":
    main()
