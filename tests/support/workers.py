"""The worker processes of a service with several workers, and which of them answered what, read from its access
log (every line carries the worker's ``pid``; the service needs ``CONVSERVE_ACCESS_LOG=true``)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx

from tests.support.server import ServiceProcess


def children_of(pid: int) -> list[int]:
    """The processes ``pid`` started (its main thread's children)."""
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def worker_pids(service: ServiceProcess) -> set[int]:
    """The supervisor's worker processes (multiprocessing's spawned children, not its resource tracker)."""
    pids = set()
    for pid in children_of(service.pid):
        try:
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.add(pid)
        except OSError:
            pass
    return pids


def answered_by(service: ServiceProcess, prefix: str) -> dict[str, int]:
    """request id -> the pid of the worker that answered it, for the request ids starting with ``prefix``."""
    out = {}
    for line in service.output().splitlines():
        if line.startswith("{") and f'"request_id":"{prefix}' in line:
            entry = json.loads(line)
            if entry.get("logger") == "service.access":
                out[entry["request_id"]] = entry["pid"]
    return out


def wait_for_log(service: ServiceProcess, prefix: str, count: int, timeout: float = 10) -> bool:
    """Until the access log has a line for each of ``count`` requests (workers write their logs themselves)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(answered_by(service, prefix)) >= count:
            return True
        time.sleep(0.05)
    return False


def clients_on_each_worker(service: ServiceProcess, workers: int, per_worker: int, prefix: str,
                           limit: int = 200) -> dict[int, list[httpx.Client]]:
    """``per_worker`` keep-alive clients connected to each of the ``workers`` workers, by pid: a connection stays
    with the worker that accepted it, and its first request's access-log line says which one that is. New clients
    are opened until each worker has its share (the kernel spreads connections as it likes); the others close."""
    kept: dict[int, list[httpx.Client]] = {}
    for i in range(limit):
        client = httpx.Client(base_url=service.url, timeout=60)
        request_id = f"{prefix}{i}"
        try:
            assert client.get("/v2/health/live", headers={"x-request-id": request_id}).status_code == 200
            assert wait_for_log(service, request_id, 1), f"no access-log line for {request_id}"
        except BaseException:
            client.close()
            close_all(kept)
            raise
        on_worker = kept.setdefault(answered_by(service, request_id)[request_id], [])
        if len(on_worker) < per_worker:
            on_worker.append(client)
        else:
            client.close()
        if len(kept) == workers and all(len(clients) == per_worker for clients in kept.values()):
            return kept
    close_all(kept)
    raise AssertionError(f"{limit} connections did not reach {workers} workers {per_worker} times each: "
                         f"{ {pid: len(clients) for pid, clients in kept.items()} }")


def close_all(clients: dict[int, list[httpx.Client]]) -> None:
    for on_worker in clients.values():
        for client in on_worker:
            client.close()
