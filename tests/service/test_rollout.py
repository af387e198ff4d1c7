"""Rollouts on real server processes (two workers each, the shipped defaults otherwise, the rollout's thresholds
too): a retrained version published while traffic runs is shadowed, canaried and promoted; another network
published under the same name is rolled back on its own; no client request fails meanwhile. Decisions survive a
restart, labels and the admin calls work on every protocol, and two replicas sharing one PostgreSQL take each
decision once."""

from __future__ import annotations

import base64
import io
import re
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as tg
from PIL import Image

from tests.support.postgres import fresh_database
from tests.support.server import ServiceProcess, free_port
from tests.support.traffic import Traffic

ADMIN = {"Authorization": "Bearer rollout-token"}
IGNORE = shutil.ignore_patterns("variables", "saved_model.pb", "fingerprint.pb", "report")
# What the tests change: two workers (said out loud), faster ticks, and fewer answers before a decision (the
# default, 300 shadow answers at a quarter of the traffic, is a minute of this test's traffic per phase).
FAST = {"CONVSERVE_WORKERS": "2", "CONVSERVE_ROLLOUT_MIN_REQUESTS": "60", "CONVSERVE_ROLLOUT_SYNC_SECONDS": "0.25",
        "CONVSERVE_REPOSITORY_POLL_SECONDS": "0.5", "CONVSERVE_ROLLOUT_SHADOW_FRACTION": "0.5",
        "CONVSERVE_ROLLOUT_TRAFFIC": "0.5", "CONVSERVE_ADMIN_TOKEN": "rollout-token"}


def rollout(url: str) -> dict:
    r = httpx.get(f"{url}/v2/models/mnist/rollout", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def wait_for(url: str, done, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    states = []
    while time.monotonic() < deadline:
        state = rollout(url)
        if not states or states[-1] != (state["state"], state["candidate"]):
            states.append((state["state"], state["candidate"]))
        if done(state):
            state["seen"] = states
            return state
        time.sleep(0.25)
    pytest.fail(f"the rollout never got there; states seen {states}, last {state}")


@pytest.fixture(scope="module")
def repo(tmp_path_factory, bundled_mnist: Path) -> Path:
    root = tmp_path_factory.mktemp("rollout-models")
    shutil.copytree(bundled_mnist / "mnist", root / "mnist", ignore=IGNORE)
    return root


@pytest.fixture(scope="module")
def state_url(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('rollout-state')}/state.sqlite"


def start(repo: Path, state_url: str, **env: str) -> ServiceProcess:
    return ServiceProcess(repo, env={**FAST, "CONVSERVE_STATE_URL": state_url, **env}, timeout=120)


@pytest.fixture(scope="module")
def server(repo: Path, state_url: str) -> Iterator[ServiceProcess]:
    grpc_port = free_port()
    running = start(repo, state_url, CONVSERVE_GRPC_PORT=str(grpc_port))
    running.grpc_url = f"127.0.0.1:{grpc_port}"
    yield running
    running.stop()


@pytest.fixture(scope="module")
def pngs(mnist_pngs) -> list[bytes]:
    return [png for png, _ in mnist_pngs]


def test_the_bundled_first_version_serves_without_a_rollout(server):
    state = rollout(server.url)
    assert (state["stable"], state["candidate"], state["state"], state["mode"]) == ("1", None, "stable", "shadow")
    assert state["history"] == []
    assert server.metric('convserve_rollout_state{model="mnist"}') == 0


def test_a_retrained_version_is_shadowed_then_canaried_then_promoted_with_no_failed_request(server, repo, pngs):
    with Traffic([server.url], pngs) as traffic:
        time.sleep(1)
        shutil.copytree(repo / "mnist" / "1", repo / "mnist" / "2")  # the same network: a retrain that agrees
        state = wait_for(server.url, lambda s: s["stable"] == "2" and s["candidate"] is None)
    assert traffic.failures == [] and set(traffic.statuses) == {200}
    # Each phase started once, by one of the two workers, in this order (the log says so; polling the state could
    # miss a shadow phase that passes between two polls).
    phases = re.findall(r'"msg":"rollout started".*?"candidate":2,"mode":"(\w+)"', server.output())
    assert phases == ["shadow", "canary"]
    assert traffic.versions["2"] > 0 and traffic.versions["1"] > 0
    (decision,) = state["history"]
    assert (decision["version"], decision["decision"]) == ("2", "promoted")
    guards = decision["evidence"]["guards"]
    assert guards["agreement"]["value"] == 1.0 and guards["agreement"]["status"] == "holds"
    assert decision["evidence"]["candidate_answers"] >= 60
    assert server.metric('convserve_rollout_decisions_total{decision="promoted",model="mnist",reason="guards_held"}') \
        == 1
    # The old stable is unloaded by the version policy (latest:1) once the candidate is promoted.
    deadline = time.monotonic() + 30
    while httpx.get(f"{server.url}/v2/models/mnist/versions/1/ready", timeout=10).status_code != 404:
        assert time.monotonic() < deadline, "version 1 still loaded"
        time.sleep(0.25)


def test_another_network_under_the_same_name_is_rolled_back_on_its_own(server, repo, pngs, bundled_mnist):
    with Traffic([server.url], pngs) as traffic:
        time.sleep(1)
        # Fashion-MNIST's network published as mnist version 3: same input, same ten classes, other answers.
        shutil.copytree(bundled_mnist / "fashion-mnist" / "2", repo / "mnist" / "3", ignore=IGNORE)
        state = wait_for(server.url, lambda s: s["history"] and s["history"][0]["version"] == "3")
        time.sleep(1)
    assert traffic.failures == [] and set(traffic.statuses) == {200}
    assert "3" not in traffic.versions  # shadow first: no client ever got the bad network's answer
    decision = state["history"][0]
    assert decision["decision"] == "rolled_back" and decision["reason"].startswith("agreement fails")
    evidence = decision["evidence"]
    assert evidence["agreed"] / evidence["compared"] < 0.5
    assert evidence["guards"]["agreement"]["status"] == "fails"
    assert evidence["guards"]["latency"]["status"] != "fails"  # the agreement alone decided it
    assert state["stable"] == "2" and state["candidate"] is None
    r = httpx.get(f"{server.url}/v2/models/mnist/versions/3/ready", timeout=10)
    assert r.status_code in (404, 503)  # not served again: unloaded, not merely unused


def test_a_canary_by_hand_keeps_each_key_on_one_arm_and_answers_to_its_labels(server, pngs):
    """Version 1 (the old stable, unloaded since) canaried by hand; fewer candidate answers here than a decision
    needs, so it is still running at the end (the next test aborts it)."""
    png = pngs[0]
    r = httpx.post(f"{server.url}/v2/repository/models/mnist/rollout", headers=ADMIN, timeout=30,
                   json={"candidate": "1", "mode": "canary", "traffic": 0.5})
    assert r.status_code == 200, r.text
    assert (r.json()["candidate"], r.json()["state"], r.json()["traffic"]) == ("1", "canary", 0.5)
    # The answering worker applied it; the other one follows within a sync.
    deadline = time.monotonic() + 30
    while True:
        status = httpx.get(f"{server.url}/v1/models/mnist", timeout=10).json()
        r2 = httpx.get(f"{server.url}/v1/models/mnist", timeout=10).json()
        if status.get("version_labels") == r2.get("version_labels") == {"stable": "2", "canary": "1"}:
            break
        assert time.monotonic() < deadline, status
        time.sleep(0.25)
    time.sleep(1)  # every worker has synced
    arms: dict[str, set[str]] = {}
    for _ in range(3):
        for key in range(20):
            r = httpx.post(f"{server.url}/models/mnist/predict", content=png, timeout=30,
                           headers={"Content-Type": "image/png", "X-Rollout-Key": f"user-{key}"})
            assert r.status_code == 200
            arms.setdefault(f"user-{key}", set()).add(r.headers["x-model-version"])
    assert all(len(v) == 1 for v in arms.values()), arms  # a key never changes arm
    assert {next(iter(v)) for v in arms.values()} == {"2", "1"}

    b64 = {"instances": [{"b64": base64.b64encode(png).decode()}]}
    for label, version in (("stable", "2"), ("canary", "1")):
        r = httpx.post(f"{server.url}/v1/models/mnist/labels/{label}:predict", json=b64, timeout=30)
        assert r.status_code == 200 and r.headers["x-model-version"] == version, r.text
    rows = np.asarray(Image.open(io.BytesIO(png)).convert("L"), np.float32)[None, :, :, None]
    r = httpx.post(f"{server.url}/v2/models/mnist/versions/canary/infer", timeout=30, json={"inputs": [
        {"name": "image", "datatype": "FP32", "shape": list(rows.shape), "data": rows.ravel().tolist()}]})
    assert r.status_code == 200 and r.json()["model_version"] == "1" and r.headers["x-model-version"] == "1"
    with tg.InferenceServerClient(server.grpc_url) as client:
        tensor = tg.InferInput("image", list(rows.shape), "FP32")
        tensor.set_data_from_numpy(rows)
        assert client.infer("mnist", [tensor], model_version="stable").get_response().model_version == "2"
        tensor = tg.InferInput("image", list(rows.shape), "FP32")
        tensor.set_data_from_numpy(rows)
        assert client.infer("mnist", [tensor], model_version="canary").get_response().model_version == "1"
    assert httpx.post(f"{server.url}/v1/models/mnist/labels/beta:predict", json=b64, timeout=30).status_code == 404
    for label in ("stable", "canary"):  # readiness of a label, on both workers' state
        r = httpx.get(f"{server.url}/v2/models/mnist/versions/{label}/ready", timeout=10)
        assert r.status_code == 200, r.text
        with tg.InferenceServerClient(server.grpc_url) as client:
            assert client.is_model_ready("mnist", label)
    assert server.metric('convserve_rollout_state{model="mnist"}') == 2


def test_the_admin_calls_need_the_token_and_refuse_what_they_cannot_do(server):
    url = f"{server.url}/v2/repository/models/mnist/rollout"
    assert httpx.post(url, json={"candidate": "3"}, timeout=30).status_code == 401
    assert httpx.post(url, json={"candidate": "3"}, timeout=30,
                      headers={"Authorization": "Bearer wrong"}).status_code == 403
    for body, status, message in [({"candidate": "9"}, 404, "no version '9'"),
                                  ({"candidate": "2"}, 409, "already stable"),
                                  ({"candidate": "3", "mode": "off"}, 422, "shadow or canary"),
                                  ({"candidate": "3", "traffic": 2}, 422, "between 0 and 1"),
                                  ({"candidate": "x"}, 422, "version number"),
                                  ({"mode": "canary"}, 422, "candidate"),
                                  ({"candidate": "3", "color": 1}, 422, "unknown field")]:
        r = httpx.post(url, json=body, headers=ADMIN, timeout=30)
        assert r.status_code == status and message in r.json()["error"], (body, r.text)
    r = httpx.post(f"{url}/abort", headers=ADMIN, timeout=30)  # the canary by hand of the test above
    assert r.status_code == 200 and r.json()["candidate"] is None, r.text
    assert r.json()["history"][0]["decision"] == "aborted"
    assert httpx.post(f"{url}/abort", headers=ADMIN, timeout=30).status_code == 409
    assert httpx.post(f"{url}/promote", headers=ADMIN, timeout=30).status_code == 409  # nothing running


def test_a_restart_keeps_the_decisions_and_resumes_a_running_rollout(server, repo, state_url):
    r = httpx.post(f"{server.url}/v2/repository/models/mnist/rollout", headers=ADMIN, timeout=30,
                   json={"candidate": "1", "mode": "canary", "traffic": 0.1})  # back to 1, carefully
    assert r.status_code == 200, r.text
    before = rollout(server.url)
    server.stop()
    again = start(repo, state_url)
    try:
        after = rollout(again.url)
        assert (after["stable"], after["candidate"], after["state"]) == ("2", "1", "canary")
        assert after["history"] == before["history"]
        # 3 was rolled back and then aborted: not loaded, not served, though it is the newest on disk.
        assert httpx.get(f"{again.url}/v2/models/mnist/versions/3/ready", timeout=10).status_code == 404
        r = httpx.post(f"{again.url}/v2/repository/models/mnist/rollout/promote", headers=ADMIN, timeout=30,
                       json={"version": "2"})
        assert r.status_code == 200 and (r.json()["stable"], r.json()["candidate"]) == ("2", None), r.text
        assert [h["decision"] for h in r.json()["history"][:2]] == ["promoted", "aborted"]
    finally:
        again.stop()


def test_two_replicas_on_one_postgresql_take_one_decision(tmp_path, bundled_mnist, pngs):
    root = tmp_path / "models"
    shutil.copytree(bundled_mnist / "mnist", root / "mnist", ignore=IGNORE)
    with fresh_database() as database:
        replicas = [start(root, database, CONVSERVE_GRPC_PORT="0") for _ in range(2)]
        try:
            with Traffic([r.url for r in replicas], pngs, clients=4) as traffic:
                time.sleep(1)
                shutil.copytree(root / "mnist" / "1", root / "mnist" / "2")
                states = [wait_for(r.url, lambda s: s["stable"] == "2" and s["candidate"] is None)
                          for r in replicas]
            assert traffic.failures == []
            assert states[0]["history"] == states[1]["history"]
            assert [h["decision"] for h in states[0]["history"]] == ["promoted"]
            decisions = sum(r.metric('convserve_rollout_decisions_total{decision="promoted",model="mnist",'
                                     'reason="guards_held"}') for r in replicas)
            assert decisions == 1  # taken by one worker of one replica
            starts = sum(len(re.findall(r'"msg":"rollout started"', r.output())) for r in replicas)
            assert starts == 2  # shadow, then canary: each started once across four workers
        finally:
            for r in replicas:
                r.stop()


def test_a_candidate_less_accurate_on_feedback_labels_is_rolled_back_on_accuracy(tmp_path, bundled_mnist,
                                                                                    mnist_pngs):
    """Agreement set aside for this model (its config.pbtxt: rollout_min_agreement 0), so the labels decide:
    Fashion-MNIST's network canaried as mnist, clients label their digits, and the accuracy guard rolls it back."""
    root = tmp_path / "models"
    shutil.copytree(bundled_mnist / "mnist", root / "mnist", ignore=IGNORE)
    with open(root / "mnist" / "config.pbtxt", "a") as config:
        config.write('\nparameters { key: "rollout_min_agreement" value { string_value: "0" } }\n')
    shutil.copytree(bundled_mnist / "fashion-mnist" / "2", root / "mnist" / "2", ignore=IGNORE)
    server = start(root, f"sqlite:///{tmp_path}/state.sqlite", CONVSERVE_ROLLOUT_MIN_REQUESTS="100000",
                   CONVSERVE_GRPC_PORT="0")
    try:
        r = httpx.post(f"{server.url}/v2/repository/models/mnist/rollout/promote", headers=ADMIN, timeout=30,
                       json={"version": "1"})  # a fresh server serves the newest: put 1 back, then canary 2
        assert r.status_code == 200, r.text
        r = httpx.post(f"{server.url}/v2/repository/models/mnist/rollout", headers=ADMIN, timeout=30,
                       json={"candidate": "2", "mode": "canary", "traffic": 0.5})
        assert r.status_code == 200, r.text
        time.sleep(1)  # both workers route the canary
        labels, answered = [], Counter()
        for i in range(160):
            png, label = mnist_pngs[i % len(mnist_pngs)]
            r = httpx.post(f"{server.url}/models/mnist/predict", content=png, timeout=30,
                           headers={"Content-Type": "image/png", "X-Rollout-Key": f"user-{i}",
                                    "X-Request-Id": f"acc-{i}"})
            assert r.status_code == 200
            answered[r.headers["x-model-version"]] += 1
            labels.append({"id": f"acc-{i}", "label": label})
        assert min(answered["1"], answered["2"]) >= 30, answered
        r = httpx.post(f"{server.url}/v2/models/mnist/feedback", json={"feedback": labels}, timeout=30)
        assert r.status_code == 200, r.text
        state = wait_for(server.url, lambda s: s["candidate"] is None, timeout=60)
        decision = state["history"][0]
        assert (decision["version"], decision["decision"]) == ("2", "rolled_back")
        assert decision["reason"].startswith("accuracy fails")
        accuracy = decision["evidence"]["guards"]["accuracy"]
        assert accuracy["status"] == "fails" and accuracy["ci99"][1] < -0.02
        assert decision["evidence"]["guards"]["agreement"]["status"] == "holds"  # it was the labels
    finally:
        server.stop()
