"""Model lifecycle: live reload, removal, broken versions, and the repository API."""

from __future__ import annotations

import gc
import os
import shutil
import signal
import threading

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from tests.service.conftest import make_settings
from tests.support.server import free_port
from tests.support.waiting import wait_for

LABELS = [str(i) for i in range(10)]
SHAPE = (28, 28, 1)


def publish(root, make_version, name, version, seed=0, broken=False):
    """Stage a version in a hidden directory and rename it into place, like training does."""
    staging = make_version(root / name / ".staging", "x", version, SHAPE, LABELS, digit=True, seed=seed)
    if broken:
        (staging / "model.onnx").write_bytes(b"\x08\x01garbage")
    os.rename(staging, root / name / str(version))
    shutil.rmtree(root / name / ".staging")


def served_version(client, name="m"):
    response = client.get(f"/v2/models/{name}")
    return response.json()["versions"] if response.status_code == 200 else None


def test_new_version_is_picked_up_and_served(tmp_path, make_version, app_client_factory):
    make_version(tmp_path, "m", 1, SHAPE, LABELS, digit=True)
    client = app_client_factory(tmp_path, repository_poll_seconds=0.1)
    assert served_version(client) == ["1"]
    publish(tmp_path, make_version, "m", 2, seed=5)
    assert wait_for(lambda: served_version(client) == ["2"])
    image = {"inputs": [{"name": "image", "shape": [1, 28, 28, 1], "datatype": "FP32", "data": [0.0] * 784}]}
    assert client.post("/v2/models/m/infer", json=image).json()["model_version"] == "2"
    assert client.get("/v2/models/m/versions/1").status_code == 404  # latest:1 unloaded the old one


def test_new_model_appears_and_removed_model_disappears(tmp_path, make_version, app_client_factory):
    make_version(tmp_path, "m", 1, SHAPE, LABELS, digit=True)
    client = app_client_factory(tmp_path, repository_poll_seconds=0.1)
    make_version(tmp_path, "other", 1, SHAPE, LABELS, digit=True)
    assert wait_for(lambda: served_version(client, "other") == ["1"])
    shutil.rmtree(tmp_path / "other")
    assert wait_for(lambda: client.get("/v2/models/other").status_code == 404)
    assert client.get("/v2/health/ready").status_code == 200


def test_removed_version_falls_back_to_the_remaining_one(tmp_path, make_version, app_client_factory):
    make_version(tmp_path, "m", 1, SHAPE, LABELS, digit=True)
    make_version(tmp_path, "m", 2, SHAPE, LABELS, digit=True)
    client = app_client_factory(tmp_path, repository_poll_seconds=0.1)
    assert served_version(client) == ["2"]
    shutil.rmtree(tmp_path / "m" / "2")
    assert wait_for(lambda: served_version(client) == ["1"])


def test_broken_new_version_never_replaces_the_working_one(tmp_path, make_version, app_client_factory):
    make_version(tmp_path, "m", 1, SHAPE, LABELS, digit=True)  # no config.pbtxt: the default policy, latest:1
    client = app_client_factory(tmp_path, repository_poll_seconds=0.1)
    assert served_version(client) == ["1"]
    publish(tmp_path, make_version, "m", 2, broken=True)  # the policy now wants 2 alone: a swap that must not happen

    def failed():
        versions = client.get("/models").json()["models"][0]["versions"]
        return any(v["version"] == 2 and v["state"] == "FAILED" for v in versions)

    assert wait_for(failed)
    assert served_version(client) == ["1"]
    image = {"inputs": [{"name": "image", "shape": [1, 28, 28, 1], "datatype": "FP32", "data": [0.0] * 784}]}
    assert client.post("/v2/models/m/infer", json=image).json()["model_version"] == "1"
    assert client.get("/v2/models/m/versions/2/ready").status_code == 503
    assert client.get("/v2/health/ready").status_code == 200
    failures = 'convserve_model_load_failures_total{model="m",version="2"} 1.0'
    assert failures in client.get("/metrics").text
    # Unchanged broken files are not retried on every scan: let the poller scan at least twice more (each scan
    # is seen to happen when it picks up a new model), then the failure is still counted once.
    for scan in range(2):
        make_version(tmp_path, f"probe{scan}", 1, SHAPE, LABELS, digit=True)
        assert wait_for(lambda n=scan: served_version(client, f"probe{n}") == ["1"])
    assert failures in client.get("/metrics").text
    assert served_version(client) == ["1"]


def test_fixed_version_is_retried_when_its_files_change(tmp_path, make_version, app_client_factory):
    make_version(tmp_path, "m", 1, SHAPE, LABELS, digit=True)
    broken = make_version(tmp_path, "m", 2, SHAPE, LABELS, digit=True)
    good = (broken / "model.onnx").read_bytes()
    (broken / "model.onnx").write_bytes(b"half-written")
    client = app_client_factory(tmp_path, repository_poll_seconds=0.1, version_policy="all")
    assert served_version(client) == ["1"]
    (broken / "model.onnx").write_bytes(good)
    assert wait_for(lambda: served_version(client) == ["1", "2"])


# --- Repository API ----------------------------------------------------------------------------

def test_repository_api_is_off_without_a_token(client):
    response = client.post("/v2/repository/index")
    assert response.status_code == 403
    assert "CONVSERVE_ADMIN_TOKEN" in response.json()["error"]


@pytest.fixture()
def admin(tmp_path, make_version, app_client_factory):
    make_version(tmp_path, "m", 1, SHAPE, LABELS, digit=True)
    make_version(tmp_path, "n", 1, SHAPE, LABELS, digit=True)
    return app_client_factory(tmp_path, admin_token="t0ken", repository_poll_seconds=0), tmp_path


AUTH = {"authorization": "Bearer t0ken"}


def test_repository_api_needs_the_bearer_token(admin):
    client, _ = admin
    missing = client.post("/v2/repository/index")
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    wrong = client.post("/v2/repository/index", headers={"authorization": "Bearer nope"})
    assert wrong.status_code == 403 and wrong.json() == {"error": "wrong admin token"}
    assert client.post("/v2/repository/index", headers={"authorization": "Basic t0ken"}).status_code == 401
    assert client.post("/v2/repository/index", headers=AUTH).status_code == 200


def test_repository_index_lists_models_and_states(admin):
    client, _ = admin
    entries = client.post("/v2/repository/index", headers=AUTH).json()
    assert {(e["name"], e["version"], e["state"]) for e in entries} == {("m", "1", "READY"), ("n", "1", "READY")}


def test_repository_unload_and_load(admin):
    client, _ = admin
    assert client.post("/v2/repository/models/n/unload", headers=AUTH).status_code == 200
    assert client.get("/v2/models/n").status_code == 404
    index = {e["name"]: e for e in client.post("/v2/repository/index", headers=AUTH).json()}
    assert index["n"]["state"] == "UNAVAILABLE" and index["n"]["reason"] == "unloaded"
    assert client.get("/v2/health/ready").status_code == 200
    assert client.post("/v2/repository/models/n/load", headers=AUTH).status_code == 200
    assert client.get("/v2/models/n/ready").status_code == 200


def test_repository_load_picks_up_a_new_version_without_polling(admin, make_version):
    client, root = admin
    publish(root, make_version, "m", 2)
    assert served_version(client) == ["1"]  # polling is off
    assert client.post("/v2/repository/models/m/load", headers=AUTH).status_code == 200
    assert served_version(client) == ["2"]


def test_repository_index_rescans_the_disk(admin, make_version):
    client, root = admin
    publish(root, make_version, "m", 2)
    entries = client.post("/v2/repository/index", headers=AUTH).json()
    assert ("m", "2", "READY") in {(e["name"], e["version"], e["state"]) for e in entries}
    assert served_version(client) == ["2"]


def test_repository_load_refuses_paths_and_unknown_names(admin):
    client, _ = admin
    for name in ("..", "..%2F..%2Fetc", "%2Fetc%2Fpasswd", ".hidden", "a%20b"):
        response = client.post(f"/v2/repository/models/{name}/load", headers=AUTH)
        assert response.status_code in (400, 404), name
        assert "error" in response.json()
    response = client.post("/v2/repository/models/missing/load", headers=AUTH)
    assert response.status_code == 404


def test_repository_load_refuses_request_supplied_files_or_config(admin):
    client, _ = admin
    response = client.post("/v2/repository/models/m/load", headers=AUTH,
                           json={"parameters": {"config": "{}", "file:1/model.onnx": "AAAA"}})
    assert response.status_code == 400
    assert "only read from the model repository" in response.json()["error"]


# --- A swap under load, on a real server -------------------------------------------------------

def test_swap_under_load_has_zero_failed_requests(tmp_path, make_version, server_factory, mnist_pngs):
    make_version(tmp_path, "m", 1, SHAPE, LABELS, digit=True, seed=1)
    server = server_factory(tmp_path, CONVSERVE_REPOSITORY_POLL_SECONDS="0.2")
    image = mnist_pngs[0][0]
    results: list[tuple[int, int | None]] = []
    failures: list[str] = []  # every request that did not end in a 200 with a version, exceptions included
    sent = 0
    lock = threading.Lock()
    stop = threading.Event()

    def hammer():
        nonlocal sent
        with httpx.Client(base_url=server.url, timeout=10) as http:
            while not stop.is_set():
                with lock:
                    sent += 1
                try:
                    response = http.post("/models/m/predict", content=image, headers={"content-type": "image/png"})
                    version = response.json()["version"] if response.status_code == 200 else None
                except Exception as exc:  # a lost connection or a non-JSON body is a failed request too
                    with lock:
                        failures.append(repr(exc))
                    continue
                with lock:
                    results.append((response.status_code, version))
                    if response.status_code != 200:
                        failures.append(f"{response.status_code} {response.text[:200]}")

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        for version in (2, 3):
            count = len(results)
            assert wait_for(lambda c=count: len(results) > c + 20 or bool(failures), timeout=30), failures[:5]
            publish(tmp_path, make_version, "m", version, seed=version)
            assert wait_for(lambda v=version: any(r[1] == v for r in results[-20:]), timeout=20), failures[:5]
        count = len(results)
        assert wait_for(lambda: len(results) > count + 20 or bool(failures), timeout=30)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    print(f"{sent} requests sent during two swaps, {len(results)} answered, {len(failures)} failed")
    assert failures == [], failures[:5]
    assert len(results) == sent  # every request sent was answered
    assert len(results) > 50
    assert {status for status, _ in results} == {200}
    assert {v for _, v in results} >= {1, 2, 3}


def test_an_app_built_to_freeze_startup_freezes_what_startup_made_and_an_embedded_app_does_not(model_repo):
    """gc.freeze() after the models load (the server's own processes only): full collections then skip the
    long-lived startup objects, which were a pause of tens of milliseconds under load."""
    before = gc.get_freeze_count()
    with TestClient(create_app(make_settings(model_repo))) as client:
        assert client.get("/v2/health/ready").status_code == 200
        assert gc.get_freeze_count() == before
    try:
        with TestClient(create_app(make_settings(model_repo), freeze_startup=True)) as client:
            assert client.get("/v2/health/ready").status_code == 200
            assert gc.get_freeze_count() > before
    finally:
        gc.unfreeze()


class AppSpy:
    """Stands in for ``create_app``: records how the entry point asked for its app."""

    def __init__(self) -> None:
        self.calls: list[dict[str, object]] = []

    def __call__(self, settings: Settings, **options: object) -> FastAPI:
        self.calls.append(options)
        return FastAPI()


def test_the_single_process_server_builds_its_app_frozen(model_repo, monkeypatch):
    import service.__main__ as entry

    spy = AppSpy()
    monkeypatch.setattr(entry, "create_app", spy)
    monkeypatch.setattr(entry.Server, "run", lambda self, sockets=None: None)  # serve nothing
    monkeypatch.setattr(signal, "signal", lambda signum, handler: None)  # leave the test process's handlers alone
    monkeypatch.setattr(uvicorn.Config, "configure_logging", lambda self: None)  # and its logging
    entry.serve(make_settings(model_repo, workers=1))
    assert spy.calls == [{"freeze_startup": True}]


def test_every_worker_builds_its_app_frozen(model_repo, monkeypatch, tmp_path):
    """With several workers the supervisor only holds the factory that each worker calls to build its app."""
    import service.workers as workers

    spy = AppSpy()
    supervised: list[uvicorn.Config] = []

    class IdleSupervisor:
        startup_failed = False

        def __init__(self, config, sockets, *args) -> None:
            supervised.append(config)
            for sock in sockets:
                sock.close()

        def run(self) -> None:
            pass

    monkeypatch.setattr(workers, "create_app", spy)
    monkeypatch.setattr(workers, "Supervisor", IdleSupervisor)
    monkeypatch.setattr(uvicorn.Config, "configure_logging", lambda self: None)  # leave the test process's logging
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))  # serve() sets it for the workers: restored after
    workers.serve(make_settings(model_repo, workers=2, port=free_port()), log_config={})
    (config,) = supervised
    assert config.factory and spy.calls == []  # nothing built in the supervisor
    config.app()  # what each worker does
    assert len(spy.calls) == 1 and spy.calls[0]["freeze_startup"] is True
