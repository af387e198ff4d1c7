"""Open-loop load: requests arrive at a fixed rate whether or not earlier ones have been answered.

wrk (closed loop) slows down with the server, so it can never overload it; this generator keeps
the arrival rate fixed, the way independent clients behave. wrk2 would do this, but Debian does
not package it. Requests are written by hand over raw keep-alive connections (at most
``connections`` of them); a request due while every connection is busy waits client-side, and its
latency still counts from the moment it was due (no coordinated omission). Every request's status
and latency is kept.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

try:
    import uvloop

    _run = uvloop.run
except ImportError:  # plain asyncio is slower but correct
    _run = asyncio.run


def http_request(method: str, path: str, host: str, body: bytes, content_type: str) -> bytes:
    """The raw bytes of one keep-alive HTTP/1.1 request."""
    head = (f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


@dataclass
class _Tally:
    statuses: list[int] = field(default_factory=list)
    """HTTP status per answered request; 0 for a socket error or timeout."""
    latencies: list[float] = field(default_factory=list)
    """Seconds from the scheduled arrival to the end of the answer."""
    service: list[float] = field(default_factory=list)
    """Seconds from writing the request to the end of the answer."""
    retry_after: list[bool] = field(default_factory=list)
    inflight: int = 0
    max_backlog: int = 0


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[bytes, bytes]]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        key, sep, value = line.partition(b":")
        if sep:
            headers[key.strip().lower()] = value.strip()
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    else:
        await reader.readexactly(int(headers.get(b"content-length", b"0")))
    return status, headers


async def _worker(host: str, port: int, request: bytes, queue: asyncio.Queue[float], tally: _Tally,
                  timeout_s: float, connected: list[bool] | None = None) -> None:
    """One connection: take the next due request, send it, wait for its answer, repeat."""
    loop = asyncio.get_running_loop()
    writer: asyncio.StreamWriter | None = None
    reader: asyncio.StreamReader | None = None
    if connected is not None:  # open the connection before the first arrival
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
        except (TimeoutError, OSError):
            pass
        connected.append(writer is not None)
    while True:
        scheduled = await queue.get()
        tally.inflight += 1
        try:
            if writer is None:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
            sent = loop.time()
            writer.write(request)
            status, headers = await asyncio.wait_for(_read_response(reader), timeout_s)  # type: ignore[arg-type]
            done = loop.time()
            tally.statuses.append(status)
            tally.latencies.append(done - scheduled)
            tally.service.append(done - sent)
            tally.retry_after.append(b"retry-after" in headers)
            if headers.get(b"connection", b"").lower() == b"close":
                writer.close()
                writer = None
        except (TimeoutError, OSError, ValueError, IndexError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            tally.statuses.append(0)
            tally.latencies.append(loop.time() - scheduled)
            tally.service.append(0.0)
            tally.retry_after.append(False)
            if writer is not None:
                writer.close()
            writer = None
        finally:
            tally.inflight -= 1


async def _open_loop(host: str, port: int, request: bytes, rate: float, duration_s: float, connections: int,
                     timeout_s: float, preconnect: bool) -> tuple[_Tally, int, int]:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[float] = asyncio.Queue()
    tally = _Tally()
    connected: list[bool] | None = [] if preconnect else None
    workers = [asyncio.create_task(_worker(host, port, request, queue, tally, timeout_s, connected))
               for _ in range(connections)]
    while connected is not None and len(connected) < connections:  # every connection open (or failed) first
        await asyncio.sleep(0.01)
    offered = int(rate * duration_s)
    start = loop.time() + 0.05
    i = 0
    while i < offered:  # enqueue every request that is due, then sleep until the next one is
        now = loop.time()
        while i < offered and start + i / rate <= now:
            queue.put_nowait(start + i / rate)
            i += 1
        tally.max_backlog = max(tally.max_backlog, queue.qsize())
        if i < offered:
            await asyncio.sleep(max(0.0, start + i / rate - loop.time()))
    deadline = loop.time() + timeout_s  # let what was sent finish; what never left stays unsent
    while (tally.inflight or not queue.empty()) and loop.time() < deadline:
        await asyncio.sleep(0.02)
    unsent, abandoned = queue.qsize(), tally.inflight
    for worker in workers:
        worker.cancel()
    await asyncio.gather(*workers, return_exceptions=True)
    return tally, unsent, abandoned


def _percentile_ms(values: list[float], q: float) -> float:
    return float(np.percentile(values, q) * 1000) if values else float("nan")


def run_open_loop(host: str, port: int, request: bytes, rate: float, duration_s: float, connections: int = 256,
                  timeout_s: float = 10.0, preconnect: bool = False) -> dict[str, Any]:
    """Fire ``request`` at ``rate`` per second for ``duration_s`` over at most ``connections`` connections.

    ``preconnect``: open every connection before the first arrival (a client's pool, already connected), so
    that the run measures requests, not a storm of new connections; otherwise each opens on its first request.

    Returns counts by outcome and latency percentiles (ms) of the accepted (200) and refused (503) requests.
    """
    cpu, wall = time.process_time(), time.perf_counter()
    tally, unsent, abandoned = _run(_open_loop(host, port, request, rate, duration_s, connections, timeout_s,
                                                 preconnect))
    statuses = np.array(tally.statuses, dtype=int)
    latencies = np.array(tally.latencies)
    service = np.array(tally.service)
    ok, refused = statuses == 200, statuses == 503
    return {
        "generator": f"bench/openloop.py (asyncio{'+uvloop' if _run is not asyncio.run else ''}, raw HTTP/1.1)",
        "rate": rate,
        "duration_s": duration_s,
        "connections": connections,
        "preconnect": preconnect,
        "offered": int(rate * duration_s),
        "sent": int(rate * duration_s) - unsent,
        "unsent": unsent,
        "abandoned_in_flight": abandoned,
        "answered": int((statuses > 0).sum()),
        "ok": int(ok.sum()),
        "status_503": int(refused.sum()),
        "status_503_retry_after": int((refused & np.array(tally.retry_after, dtype=bool)).sum()),
        "other_status": int(((statuses > 0) & ~ok & ~refused).sum()),
        "socket_errors": int((statuses == 0).sum()),
        "max_client_backlog": tally.max_backlog,
        "ok_p50_ms": _percentile_ms(list(latencies[ok]), 50),
        "ok_p99_ms": _percentile_ms(list(latencies[ok]), 99),
        "ok_service_p99_ms": _percentile_ms(list(service[ok]), 99),
        "rejected_p50_ms": _percentile_ms(list(latencies[refused]), 50),
        "client_cpu_s": round(time.process_time() - cpu, 2),
        "wall_s": round(time.perf_counter() - wall, 2),
    }
