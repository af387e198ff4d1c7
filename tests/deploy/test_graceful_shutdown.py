"""SIGTERM (docker stop, Kubernetes pod termination) on a real service process: readiness fails, new
connections are refused, in-flight requests finish with 200, and the process exits 0 within the drain bound."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from service.__main__ import Server
from service.app import create_app
from service.settings import Settings
from tests.support.workers import answered_by, clients_on_each_worker, close_all

BOUNDARY = "convserve-test-boundary"


def slow_multipart(png: bytes, started: threading.Event, chunks: int = 20, pause: float = 0.15):
    """A one-image multipart body that takes chunks * pause seconds to upload (chunked encoding)."""
    yield (f"--{BOUNDARY}\r\ncontent-disposition: form-data; name=\"file\"; filename=\"digit.png\"\r\n"
           "content-type: image/png\r\n\r\n").encode()
    started.set()
    step = -(-len(png) // chunks)
    for i in range(0, len(png), step):
        time.sleep(pause)
        yield png[i:i + step]
    yield f"\r\n--{BOUNDARY}--\r\n".encode()


def probe(url: str) -> int | str:
    try:
        return httpx.get(f"{url}/v2/health/ready", timeout=2).status_code
    except httpx.TransportError as exc:
        return type(exc).__name__


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_drains_in_flight_requests_then_exits_0(start_service, tiny_repo, mnist_pngs, workers):
    """One process, or a supervisor and two workers: every worker drains. The uploads go over keep-alive
    connections opened beforehand, the same number to each worker (by pid), so every worker holds some."""
    drain = 10.0
    service = start_service(tiny_repo, CONVSERVE_DRAIN_SECONDS=str(drain), CONVSERVE_WORKERS=str(workers),
                            CONVSERVE_ACCESS_LOG="true")
    clients = clients_on_each_worker(service, workers, 6 // workers, "connection-")
    uploads = [(pid, client, f"upload-{pid}-{i}") for pid, on_worker in clients.items()
               for i, client in enumerate(on_worker)]
    results: list[object] = []
    started = [threading.Event() for _ in uploads]

    def upload(client: httpx.Client, request_id: str, event: threading.Event, png: bytes) -> None:
        try:
            response = client.post("/models/digits/predict", content=slow_multipart(png, event),
                                   headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}",
                                            "x-request-id": request_id}, timeout=30)
            results.append((response.status_code, response.json()))
        except Exception as exc:  # noqa: BLE001 - recorded and asserted below
            results.append(exc)

    threads = [threading.Thread(target=upload, args=(client, request_id, event, png))
               for (_, client, request_id), event, png in zip(uploads, started, mnist_pngs)]
    for thread in threads:
        thread.start()
    assert all(event.wait(10) for event in started), "uploads did not start"
    time.sleep(0.3)  # every request's headers are in: each one is in flight, its body still arriving

    service.terminate()
    terminated = time.monotonic()

    # Readiness fails from the signal on (503, then refused once the listening socket is closed)...
    probes = [probe(service.url)]
    while probes[-1] != "ConnectError" and time.monotonic() - terminated < 3:
        time.sleep(0.02)
        probes.append(probe(service.url))
    assert 200 not in probes, probes
    assert probes[-1] == "ConnectError", probes
    # ... and no new work is accepted while the in-flight requests finish.
    with pytest.raises(httpx.ConnectError):
        httpx.post(f"{service.url}/models/digits/predict", files={"file": ("d.png", mnist_pngs[0], "image/png")},
                   timeout=2)
    running = {pid for (pid, _, _), thread in zip(uploads, threads) if thread.is_alive()}
    assert running == set(clients), f"every worker should still be receiving uploads during the drain: {running}"

    for thread in threads:
        thread.join(timeout=30)
    close_all(clients)
    assert len(results) == len(threads)
    for result in results:
        assert not isinstance(result, Exception), result
        status, body = result
        assert status == 200, body
        assert body["model"] == "digits" and len(body["predictions"]) == 1

    assert service.process.wait(timeout=drain + 5) == 0, service.output()
    assert time.monotonic() - terminated < drain
    assert "Application shutdown complete" in service.output()
    # Each upload was answered by the worker its connection was on, the one that was told to stop.
    assert answered_by(service, "upload-") == {request_id: pid for pid, _, request_id in uploads}


@pytest.mark.parametrize("workers", ["1", "2"])
def test_drain_is_bounded_by_drain_seconds(start_service, tiny_repo, workers):
    """A client that never finishes its request cannot hold the process past CONVSERVE_DRAIN_SECONDS; its
    request is answered with a JSON 503, like every error, not the server's plain-text 500."""
    service = start_service(tiny_repo, CONVSERVE_DRAIN_SECONDS="1", CONVSERVE_WORKERS=workers)
    with socket.create_connection(("127.0.0.1", service.port), timeout=5) as stalled:
        stalled.sendall(b"POST /models/digits/predict HTTP/1.1\r\nhost: test\r\ncontent-type: image/png\r\n"
                        b"content-length: 100000\r\n\r\n" + b"\x89PNG" + b"\0" * 100)
        time.sleep(0.3)
        service.terminate()
        terminated = time.monotonic()
        assert service.process.wait(timeout=15) == 0, service.output()
        elapsed = time.monotonic() - terminated
        stalled.settimeout(5)
        answer = b""
        while chunk := stalled.recv(65536):
            answer += chunk
    assert 0.9 <= elapsed < 8, elapsed
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503"), answer
    assert b"content-type: application/json" in head.lower()
    assert "drain" in json.loads(body)["error"]
    assert "timeout graceful shutdown exceeded" in service.output()


def test_signal_handler_fails_readiness_at_once(tiny_repo):
    """The first thing SIGTERM does, before uvicorn closes anything: /v2/health/ready answers 503."""
    settings = Settings(models_dir=tiny_repo, access_log=False, inference_threads=1, repository_poll_seconds=0)
    app = create_app(settings)
    import uvicorn

    server = Server(uvicorn.Config(app, timeout_graceful_shutdown=settings.drain_seconds), app)
    with TestClient(app) as client:
        assert client.get("/v2/health/ready").status_code == 200
        server.handle_exit(signal.SIGTERM, None)
        assert server.should_exit
        assert client.get("/v2/health/ready").status_code == 503
        assert client.get("/v2/health/live").status_code == 200


def test_drain_seconds_setting(monkeypatch):
    assert Settings().drain_seconds == 20
    monkeypatch.setenv("CONVSERVE_DRAIN_SECONDS", "7.5")
    assert Settings().drain_seconds == 7.5
