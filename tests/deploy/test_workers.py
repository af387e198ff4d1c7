"""Two worker processes behind one port behave as one service: real supervisor and workers, the image's CMD.
(SIGTERM with requests in flight, for one and for two workers: test_graceful_shutdown.py.)

Which worker answered a request is read from the access log (every line carries the worker's ``pid``); the
tests send requests until both workers have answered some, so they hold whatever the kernel's spread.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import pytest
import tritonclient.grpc as tg
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from service.cluster import TICK_SECONDS
from tests.deploy.test_graceful_shutdown import probe
from tests.support.models import write_digit_version
from tests.support.server import ServiceProcess
from tests.support.waiting import wait_for
from tests.support.workers import answered_by, clients_on_each_worker, close_all, wait_for_log, worker_pids

TOKEN = "workers-test-token"
ADMIN = {"authorization": f"Bearer {TOKEN}"}
PREDICT_ROUTE = "/models/{name}/predict"


def start_two_workers(start_service: Callable[..., ServiceProcess], models_dir: Path, **env: str) -> ServiceProcess:
    return start_service(models_dir, CONVSERVE_WORKERS="2", CONVSERVE_ACCESS_LOG="true",
                         CONVSERVE_REPOSITORY_POLL_SECONDS="0", CONVSERVE_ADMIN_TOKEN=TOKEN, **env)


def ready_workers(service: ServiceProcess) -> set[int]:
    """The pids of the workers that logged "models loaded" (a worker accepts connections from then on)."""
    return {json.loads(line)["pid"] for line in service.output().splitlines()
            if line.startswith("{") and '"msg":"models loaded"' in line}


def predict_until_both_workers_answered(service: ServiceProcess, png: bytes, prefix: str,
                                        minimum: int = 40, limit: int = 2000) -> list[httpx.Response]:
    """Concurrent single-image predictions, each on a new connection, until both workers have answered
    at least one and ``minimum`` were sent; every response is returned (an exception fails the call)."""
    responses: list[httpx.Response] = []

    def one(i: int) -> httpx.Response:
        return httpx.post(f"{service.url}/models/digits/predict", timeout=30,
                          files={"file": ("d.png", png, "image/png")}, headers={"x-request-id": f"{prefix}{i}"})

    sent = 0
    with ThreadPoolExecutor(8) as pool:
        while sent < limit:
            responses += pool.map(one, range(sent, sent + 8))
            sent += 8
            if sent >= minimum and wait_for_log(service, prefix, sent):
                if len(set(answered_by(service, prefix).values())) == 2:
                    return responses
    raise AssertionError(f"{limit} requests did not reach both workers: {answered_by(service, prefix)}")


def grpc_until_both_workers_answered(service: ServiceProcess, port: int, png: bytes, prefix: str,
                                     limit: int = 200) -> dict[int, set[grpc.StatusCode]]:
    """A one-digit ModelInfer of ``digits`` on a new channel each time (a channel is one connection, so one
    worker), until both workers have answered one; the status codes each worker's answers had, by pid."""
    message = pb.ModelInferRequest(model_name="digits")
    message.inputs.add(name="image", datatype="BYTES", shape=[1]).contents.bytes_contents.append(png)
    codes: dict[str, grpc.StatusCode] = {}
    for i in range(limit):
        request_id = f"{prefix}{i}"
        # A channel of its own, not one sharing a connection that grpcio keeps for the same address.
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            try:
                service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                    message, timeout=30, metadata=(("x-request-id", request_id),))
                codes[request_id] = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                codes[request_id] = exc.code()
        assert wait_for_log(service, prefix, i + 1), f"no access-log line for {request_id}"
        pids = answered_by(service, prefix)
        if len(set(pids.values())) == 2:
            by_worker: dict[int, set[grpc.StatusCode]] = {}
            for answered, pid in pids.items():
                by_worker.setdefault(pid, set()).add(codes[answered])
            return by_worker
    raise AssertionError(f"{limit} gRPC channels did not reach both workers: {answered_by(service, prefix)}")


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(scraped: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float:
    return scraped.get((name, frozenset(labels.items())), 0.0)


def test_both_workers_are_loaded_when_ready(start_service, tiny_repo):
    service = start_two_workers(start_service, tiny_repo)
    loaded = {json.loads(line)["pid"] for line in service.output().splitlines()
              if line.startswith("{") and '"msg":"models loaded"' in line}
    assert loaded == worker_pids(service) and len(loaded) == 2, service.output()


def test_metrics_are_the_sum_over_workers(start_service, tiny_repo, mnist_pngs):
    service = start_two_workers(start_service, tiny_repo)
    responses = predict_until_both_workers_answered(service, mnist_pngs[0], "sum-")
    assert all(r.status_code == 200 for r in responses)
    n = len(responses)
    # The queue gauge is a function gauge, which multiprocess mode cannot call at scrape time: each worker
    # writes it on its sync tick (docs/workers.md), so a worker's last write may predate its last request.
    time.sleep(3 * TICK_SECONDS)
    for _ in range(6):  # each scrape is answered by either worker: every one shows the same sums
        scraped = samples(httpx.get(f"{service.url}/metrics", timeout=10).text)
        labels = {"model": "digits", "version": "1"}
        assert value(scraped, "convserve_inference_requests_total", **labels, outcome="success") == n
        assert value(scraped, "convserve_http_requests_total", method="POST", route=PREDICT_ROUTE, status="200") == n
        assert value(scraped, "convserve_request_rows_count", **labels) == n
        assert sum(v for (name, _), v in scraped.items() if name == "convserve_predicted_class_total") == n
        assert value(scraped, "convserve_inflight_requests", **labels) == 0
        assert value(scraped, "convserve_queue_rows", **labels) == 0
        assert value(scraped, "convserve_model_versions_loaded", model="digits") == 1  # not once per worker


def test_refusal_and_load_failure_counters_read_zero_across_workers_before_any_event(start_service, tmp_path):
    """A dashboard or an absent() alert sees 0, not "no data": the zero series every worker writes at load are
    in the aggregated /metrics, whichever worker answers the scrape."""
    write_digit_version(tmp_path, "digits", 1)
    (write_digit_version(tmp_path, "broken", 1) / "model.onnx").write_bytes(b"\x08\x01not an onnx model")
    service = start_two_workers(start_service, tmp_path, wait_for="live")  # not ready: broken has no version
    assert wait_for(lambda: service.output().count('"msg":"models loaded"') == 2), service.output()
    for _ in range(4):
        scraped = samples(httpx.get(f"{service.url}/metrics", timeout=10).text)
        for reason in ("queue_full", "queue_delay", "deadline"):
            labels = {"model": "digits", "version": "1", "reason": reason}
            assert scraped[("convserve_rejected_requests_total", frozenset(labels.items()))] == 0
        for model, version in (("digits", "1"), ("digits", "config"), ("broken", "config")):
            labels = {"model": model, "version": version}
            assert scraped[("convserve_model_load_failures_total", frozenset(labels.items()))] == 0
        broken = {"model": "broken", "version": "1"}
        assert scraped[("convserve_model_load_failures_total", frozenset(broken.items()))] == 2  # one per worker


def test_unload_then_load_through_the_api_applies_in_every_worker(start_service, tiny_repo, mnist_pngs):
    service = start_two_workers(start_service, tiny_repo)
    png = mnist_pngs[0]

    unloaded = httpx.post(f"{service.url}/v2/repository/models/digits/unload", headers=ADMIN, timeout=60)
    assert unloaded.status_code == 200, unloaded.text
    responses = predict_until_both_workers_answered(service, png, "unloaded-")
    assert {r.status_code for r in responses} == {404}, [r.text for r in responses if r.status_code != 404]
    assert httpx.get(f"{service.url}/v2/models/digits/ready").status_code == 404

    loaded = httpx.post(f"{service.url}/v2/repository/models/digits/load", headers=ADMIN, timeout=60)
    assert loaded.status_code == 200, loaded.text
    responses = predict_until_both_workers_answered(service, png, "loaded-")
    assert {r.status_code for r in responses} == {200}, [r.text for r in responses if r.status_code != 200]
    assert all(r.json()["version"] == 1 for r in responses)
    index = httpx.post(f"{service.url}/v2/repository/index", headers=ADMIN, json={}, timeout=60).json()
    assert [e["state"] for e in index if e["name"] == "digits"] == ["READY"]


def test_repository_api_refusals_are_the_same_as_one_process(start_service, tiny_repo):
    service = start_two_workers(start_service, tiny_repo)
    missing = httpx.post(f"{service.url}/v2/repository/models/nowhere/load", headers=ADMIN, timeout=60)
    assert missing.status_code == 404 and "nowhere" in missing.json()["error"]
    not_loaded = httpx.post(f"{service.url}/v2/repository/models/nowhere/unload", headers=ADMIN, timeout=60)
    assert not_loaded.status_code == 404 and "error" in not_loaded.json()


def test_killed_worker_is_replaced_and_only_its_requests_fail(start_service, tiny_repo, mnist_pngs):
    service = start_two_workers(start_service, tiny_repo)
    png = mnist_pngs[0]
    before = worker_pids(service)
    assert len(before) == 2
    clients = 6
    stop = threading.Event()
    statuses: list[int] = []
    failures: list[Exception] = []

    errors: list[BaseException] = []  # anything else a client met

    def load() -> None:
        while not stop.is_set():
            try:
                response = httpx.post(f"{service.url}/models/digits/predict", timeout=30,
                                      files={"file": ("d.png", png, "image/png")})
                statuses.append(response.status_code)
            except httpx.TransportError as exc:  # a connection to the killed worker
                failures.append(exc)
            except BaseException as exc:  # noqa: BLE001 - recorded and asserted below
                errors.append(exc)
                return

    threads = [threading.Thread(target=load) for _ in range(clients)]
    for thread in threads:
        thread.start()
    try:
        while len(statuses) < 20:
            time.sleep(0.02)
        victim = min(before)
        os.kill(victim, 9)
        killed_at = time.monotonic()
        probes, replaced_after = [], None
        deadline = killed_at + 60
        while time.monotonic() < deadline:  # until the replacement serves too
            probes.append(probe(service.url))
            after = worker_pids(service)
            if replaced_after is None and len(after) == 2 and victim not in after:
                replaced_after = time.monotonic() - killed_at
            if replaced_after is not None and after <= ready_workers(service):
                break
            time.sleep(0.02)
        answered = len(statuses)
        while len(statuses) < answered + 20:  # and both keep answering
            time.sleep(0.02)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    after = worker_pids(service)
    assert victim not in after and len(after) == 2 and before & after, (before, after)
    # The pod never left readiness: the survivor served throughout. The death was seen at the supervisor's next
    # tick, not after its 30 s ping timeout.
    assert set(probes) == {200}, probes
    assert replaced_after is not None and replaced_after < 5, replaced_after
    assert errors == []
    assert not any(thread.is_alive() for thread in threads)
    assert set(statuses) == {200}
    assert len(failures) <= clients, failures  # at most one in flight per client when the worker died
    # The dead worker's in-flight gauge is gone with it, not stuck in the sum.
    scraped = samples(httpx.get(f"{service.url}/metrics", timeout=10).text)
    assert value(scraped, "convserve_inflight_requests", model="digits", version="1") == 0
    assert value(scraped, "convserve_inference_requests_total", model="digits", version="1",
                 outcome="success") >= len(statuses)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_shutdown_delay_keeps_accepting_with_readiness_failing(start_service, tiny_repo, mnist_pngs, workers):
    """CONVSERVE_SHUTDOWN_DELAY_SECONDS: on SIGTERM readiness fails at once, requests are still answered for
    that long (a second SIGTERM ends the wait here), then the listener closes and the process exits 0."""
    service = start_service(tiny_repo, CONVSERVE_WORKERS=workers, CONVSERVE_SHUTDOWN_DELAY_SECONDS="600")
    service.terminate()
    probes = [probe(service.url)]
    while probes[-1] == 200 and len(probes) < 500:
        time.sleep(0.02)
        probes.append(probe(service.url))
    assert probes[-1] == 503, probes  # answered (not refused): the listener is still open
    for png in mnist_pngs[:4]:
        response = httpx.post(f"{service.url}/models/digits/predict", files={"file": ("d.png", png, "image/png")},
                              timeout=30)
        assert response.status_code == 200, response.text
    assert service.alive()
    service.terminate()
    assert service.process.wait(timeout=30) == 0, service.output()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{service.url}/v2/health/ready", timeout=2)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_shutdown_delay_ends_by_itself(start_service, tiny_repo, workers):
    service = start_service(tiny_repo, CONVSERVE_WORKERS=workers, CONVSERVE_SHUTDOWN_DELAY_SECONDS="1")
    service.terminate()
    terminated = time.monotonic()
    assert service.process.wait(timeout=30) == 0, service.output()
    assert time.monotonic() - terminated >= 1.0


def test_grpc_repository_calls_apply_in_every_worker(start_service, tiny_repo, mnist_pngs, get_free_port):
    """Every worker serves gRPC on the one gRPC port too; its repository API goes through the same commands:
    after an unload over gRPC both workers refuse the model over gRPC and HTTP, after a load both serve it."""
    port = get_free_port()
    service = start_two_workers(start_service, tiny_repo, CONVSERVE_GRPC_PORT=str(port))
    png = mnist_pngs[0]
    client = tg.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        assert client.is_server_ready() and client.is_model_ready("digits")
        assert list(grpc_until_both_workers_answered(service, port, png, "grpc-before-").values()) == [
            {grpc.StatusCode.OK}] * 2
        client.unload_model("digits", headers=ADMIN)
        assert list(grpc_until_both_workers_answered(service, port, png, "grpc-unloaded-").values()) == [
            {grpc.StatusCode.NOT_FOUND}] * 2
        responses = predict_until_both_workers_answered(service, png, "http-after-grpc-unload-")
        assert {r.status_code for r in responses} == {404}
        assert not client.is_model_ready("digits")
        client.load_model("digits", headers=ADMIN)
        assert list(grpc_until_both_workers_answered(service, port, png, "grpc-loaded-").values()) == [
            {grpc.StatusCode.OK}] * 2
        responses = predict_until_both_workers_answered(service, png, "http-after-grpc-load-")
        assert {r.status_code for r in responses} == {200}
        assert client.is_model_ready("digits")
    finally:
        client.close()


def test_a_repository_call_a_worker_does_not_follow_in_time_is_503_naming_it(start_service, tiny_repo, mnist_pngs):
    """CONVSERVE_WORKER_SYNC_SECONDS: the answering worker waits that long for the others to apply a call, then
    answers 503 naming the ones that did not. A stopped worker applies it once it runs again."""
    service = start_two_workers(start_service, tiny_repo, CONVSERVE_WORKER_SYNC_SECONDS="1")
    clients = clients_on_each_worker(service, 2, 1, "sync-")
    try:
        (answering, [client]), (stopped, _) = clients.items()
        os.kill(stopped, signal.SIGSTOP)
        try:
            started = time.monotonic()
            response = client.post("/v2/repository/models/digits/unload", headers=ADMIN)
            took = time.monotonic() - started
        finally:
            os.kill(stopped, signal.SIGCONT)
    finally:
        close_all(clients)
    assert response.status_code == 503, response.text
    assert response.json()["error"] == (
        f"repository unload of model 'digits' was applied in worker {answering} but workers {stopped} did not "
        "apply it within 1 s; until they do, answers may differ between workers")
    assert 1 <= took < 10, took
    # Running again, the stopped worker catches up: both refuse the model, and the next call is followed at once.
    assert wait_for(lambda: all(r.status_code == 404 for r in predict_until_both_workers_answered(
        service, mnist_pngs[0], f"caught-up-{time.monotonic_ns()}-", minimum=8)), timeout=30)
    loaded = httpx.post(f"{service.url}/v2/repository/models/digits/load", headers=ADMIN, timeout=60)
    assert loaded.status_code == 200, loaded.text
    responses = predict_until_both_workers_answered(service, mnist_pngs[0], "reloaded-")
    assert {r.status_code for r in responses} == {200}
