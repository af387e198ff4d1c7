"""``python -m bench.closedloop``: overload with clients that back off, against a real server.

Each client keeps one keep-alive connection and sends one MNIST PNG upload after another; after a
refusal (503) it waits ``--backoff-ms`` before trying again, as a polite client would. The run
measures 32 clients (the load that saturates the service) and then 512, on the same server, and
prints for each: goodput (2xx per second), the accepted requests' p50/p99, the refusals' p99, and
the share refused; then the goal ratios of the overload issue (accepted p99 at 512 within 2x of
32's, goodput at least 90% of 32's, refusals under 10 ms at p99); then the open-loop 2x row:
arrivals at twice the c=32 goodput (bench/openloop.py), whatever the server answers.

The server is started here (the bundled models, defaults unless ``--env KEY=VALUE``), measured
with ``time.perf_counter`` on the client side. Clients are asyncio protocols on uvloop with a minimal
HTTP/1.1 reader (Content-Length bodies only, which is all the service sends).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import uvloop

from bench.load import multipart_body
from bench.openloop import http_request, run_open_loop
from tests.support.server import ServiceProcess

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Tally:
    accepted: list[float] = field(default_factory=list)
    refused: list[float] = field(default_factory=list)
    errors: int = 0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Client(asyncio.Protocol):
    """One keep-alive connection sending the same request after each answer, or ``backoff`` after a 503.

    A protocol, not streams: at 512 clients the load generator shares the machine's cores with the
    server, and every microsecond it spends per answer is taken from the server being measured.
    Answers are small and have a Content-Length (all the service sends), so the reader only finds
    the end of the headers and counts the body.
    """

    def __init__(self, request: bytes, backoff: float, tally: Tally, done: asyncio.Future[None]) -> None:
        self.request, self.backoff, self.tally, self.done = request, backoff, tally, done
        self.until = math.inf
        self.buffer = b""
        self.started = 0.0
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
            self.send()
        elif status == 503:
            self.tally.refused.append(elapsed)
            asyncio.get_running_loop().call_later(self.backoff, self.send)
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


async def measure(port: int, clients: int, seconds: float, backoff: float, image: bytes) -> dict[str, float]:
    body, content_type = multipart_body(image)
    request = (f"POST /models/mnist/predict HTTP/1.1\r\nHost: bench\r\nContent-Type: {content_type}\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    tally = Tally()
    loop = asyncio.get_running_loop()
    connections: list[Client] = []
    for _ in range(clients):
        done: asyncio.Future[None] = loop.create_future()
        _, connection = await loop.create_connection(lambda d=done: Client(request, backoff, tally, d),
                                                     "127.0.0.1", port)
        connections.append(connection)
    await asyncio.wait_for(asyncio.gather(*(c.warm for c in connections)), 60)  # every connection answered once
    until = time.perf_counter() + seconds
    for connection in connections:
        connection.until = until
        loop.call_soon(connection.send)
    await asyncio.gather(*(c.done for c in connections))
    answered = len(tally.accepted) + len(tally.refused)
    return {"clients": clients, "goodput": len(tally.accepted) / seconds,
            "accepted_p50_ms": percentile(tally.accepted, 0.5) * 1000,
            "accepted_p99_ms": percentile(tally.accepted, 0.99) * 1000,
            "refused_p99_ms": percentile(tally.refused, 0.99) * 1000,
            "refused_share": len(tally.refused) / answered if answered else float("nan"), "errors": tally.errors}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.closedloop", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per measured window")
    parser.add_argument("--rounds", type=int, default=2, help="alternating 32 / 512 windows")
    parser.add_argument("--backoff-ms", type=float, default=20.0)
    parser.add_argument("--env", action="append", default=[], help="server environment, KEY=VALUE")
    parser.add_argument("--open-loop-seconds", type=float, default=6.0,
                        help="then open-loop arrivals at twice the c=32 goodput for this long (0: skip)")
    parser.add_argument("--open-loop-connections", type=int, default=1024,
                        help="most connections of the open-loop run (a request due while all are busy waits "
                             "client-side, its latency counted from when it was due)")
    args = parser.parse_args(argv)
    env = {"CONVSERVE_ACCESS_LOG": "false", "CONVSERVE_REPOSITORY_POLL_SECONDS": "0", "CONVSERVE_WORKERS": "auto",
           "CONVSERVE_INFERENCE_THREADS": "0",
           **dict(item.split("=", 1) for item in args.env)}
    if "CONVSERVE_QUEUE_TARGET_MS" not in env:  # the server's default, not the test harness's 0
        env["CONVSERVE_QUEUE_TARGET_MS"] = os.environ.get("CONVSERVE_QUEUE_TARGET_MS", "auto")
    image = (ROOT / "tests" / "data" / "mnist" / "0000.png").read_bytes()
    server = ServiceProcess(ROOT / "models", env=env)
    try:
        uvloop.run(measure(server.port, 32, 2.0, args.backoff_ms / 1000, image))  # warm-up
        rows: dict[int, list[dict[str, float]]] = {32: [], 512: []}
        for _ in range(args.rounds):
            for clients in (32, 512):
                rows[clients].append(uvloop.run(measure(server.port, clients, args.seconds,
                                                         args.backoff_ms / 1000, image)))
        overload = None
        if args.open_loop_seconds > 0:  # the 2x overload row: arrivals that do not slow down with the server
            rate = 2 * statistics.median(r["goodput"] for r in rows[32])
            body, content_type = multipart_body(image)
            request = http_request("POST", "/models/mnist/predict", f"127.0.0.1:{server.port}", body, content_type)
            overload = run_open_loop("127.0.0.1", server.port, request, rate, args.open_loop_seconds,
                                     args.open_loop_connections)
    finally:
        server.stop()
    print(f"server env: {env}; load average at the end: {os.getloadavg()[0]:.1f}")
    summary = {}
    for clients, runs in rows.items():
        summary[clients] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        s = summary[clients]
        print(f"c={clients:4d}: goodput {s['goodput']:7.1f}/s  accepted p50 {s['accepted_p50_ms']:6.1f} ms  "
              f"p99 {s['accepted_p99_ms']:6.1f} ms  refused {s['refused_share']:5.1%} "
              f"(p99 {s['refused_p99_ms']:.1f} ms)  errors {s['errors']:.0f}")
    low, high = summary[32], summary[512]
    print(f"accepted p99, 512 / 32: {high['accepted_p99_ms'] / low['accepted_p99_ms']:.2f}x (goal <= 2)")
    print(f"goodput, 512 / 32: {high['goodput'] / low['goodput']:.0%} (goal >= 90%)")
    print(f"refusals p99 at 512: {high['refused_p99_ms']:.1f} ms (goal < 10 ms)")
    if overload is not None:
        o = overload
        print(f"open loop at 2x the c=32 goodput ({o['rate']:.0f} req/s for {o['duration_s']:g} s, at most "
              f"{o['connections']} connections): {o['ok']} x 200 ({o['ok'] / o['wall_s']:.0f}/s), {o['status_503']} "
              f"x 503 ({o['status_503_retry_after']} with Retry-After), {o['other_status']} other, "
              f"{o['socket_errors']} socket errors; accepted p50 {o['ok_p50_ms']:.1f} ms, p99 {o['ok_p99_ms']:.1f} ms "
              f"from arrival; refusals p50 {o['rejected_p50_ms']:.1f} ms")


if __name__ == "__main__":
    main()
