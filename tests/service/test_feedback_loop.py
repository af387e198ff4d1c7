"""The feedback loop against real server processes on the default configuration (workers, batches on the loop,
admission on): predictions on every protocol are logged under their answer's id, clients give the true labels,
and the live quality agrees with the accuracy this test computes from the answers it got and the labels it knows.
A restart keeps all of it; two servers sharing one PostgreSQL see each other's predictions and feedback."""

from __future__ import annotations

import base64
import io
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as tg
from PIL import Image

from tests.support.postgres import fresh_database
from tests.support.server import ServiceProcess, free_port

# The shipped defaults, said out loud: several workers (one per CPU), batches where the defaults put them,
# admission by queueing time on. Only the store and the refresh tick of the gauges are the test's own.
DEFAULTS = {"CONVSERVE_WORKERS": "auto", "CONVSERVE_QUEUE_TARGET_MS": "auto", "CONVSERVE_INFERENCE_THREADS": "0"}


def rotated(png: bytes) -> bytes:
    """The digit turned a quarter: traffic the model gets wrong often enough for a confusion matrix."""
    out = io.BytesIO()
    Image.open(io.BytesIO(png)).rotate(90).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def mnist_repo(tmp_path_factory, bundled_mnist: Path) -> Path:
    root = tmp_path_factory.mktemp("feedback-models")
    shutil.copytree(bundled_mnist / "mnist", root / "mnist",
                    ignore=shutil.ignore_patterns("variables", "saved_model.pb", "fingerprint.pb", "report"))
    return root


def start(repo: Path, state_url: str, **env: str) -> ServiceProcess:
    return ServiceProcess(repo, env={**DEFAULTS, "CONVSERVE_STATE_URL": state_url, "CONVSERVE_KEEP_INPUTS": "1",
                                     "CONVSERVE_QUALITY_REFRESH_SECONDS": "0.5", **env}, timeout=120)


@pytest.fixture(scope="module")
def state_file(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('state')}/state.sqlite"


@pytest.fixture(scope="module")
def server(mnist_repo: Path, state_file: str) -> Iterator[ServiceProcess]:
    grpc_port = free_port()
    running = start(mnist_repo, state_file, CONVSERVE_GRPC_PORT=str(grpc_port))
    running.grpc_url = f"127.0.0.1:{grpc_port}"
    yield running
    running.stop()


def predict(url: str, images: list[bytes], request_id: str) -> list[int]:
    files = [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    r = httpx.post(f"{url}/models/mnist/predict", files=files, headers={"X-Request-Id": request_id}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == request_id
    return [p["class_id"] for p in r.json()["predictions"]]


def feedback(url: str, body: object, model: str = "mnist") -> httpx.Response:
    return httpx.post(f"{url}/v2/models/{model}/feedback", json=body, timeout=30)


def quality(url: str, since: float | None = None) -> dict:
    r = httpx.get(f"{url}/v2/models/mnist/quality", params={"since": since} if since else None, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_live_accuracy_and_confusion_match_the_answers_and_the_true_labels(server, mnist_pngs):
    since = time.time()
    traffic = [(png, label) for png, label in mnist_pngs] + [(rotated(png), label) for png, label in mnist_pngs]
    answers: list[tuple[str, int, int, int]] = []  # request id, index, predicted, true
    for start_at in range(0, len(traffic), 4):  # requests of 1 to 4 images: the index is the image's place
        chunk = traffic[start_at:start_at + 1 + start_at % 4]
        if not chunk:
            continue
        request_id = f"acc-{start_at}"
        for index, (predicted, (_, label)) in enumerate(zip(predict(server.url, [c[0] for c in chunk], request_id),
                                                            chunk)):
            answers.append((request_id, index, predicted, label))
    items = [{"id": r, "index": i, "label": str(t) if i % 2 else t} for r, i, _, t in answers]  # ids and names
    r = feedback(server.url, {"feedback": items})
    assert r.status_code == 200, r.text
    assert r.json() == {"accepted": len(items), "new": len(items)}

    (version,) = quality(server.url, since)["versions"]
    correct = sum(p == t for _, _, p, t in answers)
    confusion = np.zeros((10, 10), int)
    for _, _, p, t in answers:
        confusion[t, p] += 1
    assert version["version"] == "1"
    assert version["predictions"] == version["labelled"] == len(answers)
    assert version["accuracy"] == pytest.approx(correct / len(answers))
    assert 0 < correct < len(answers)  # the rotated digits make the matrix more than a diagonal
    assert version["confusion"] == confusion.tolist()
    lo, hi = version["accuracy_ci95"]
    assert lo < version["accuracy"] < hi
    predicted = np.bincount([p for _, _, p, _ in answers], minlength=10) / len(answers)
    np.testing.assert_allclose(version["predicted_distribution"], predicted)
    assert version["drift"]["method"] == "psi" and version["drift"]["psi"] > 0


def test_the_live_accuracy_gauge_and_the_feedback_counters(server):
    deadline = time.monotonic() + 30
    whole = quality(server.url)["versions"][0]
    while time.monotonic() < deadline:
        text = server.metrics()
        match = re.search(r'^convserve_live_accuracy\{model="mnist",version="1"\} (\S+)$', text, re.M)
        if match and float(match.group(1)) == pytest.approx(whole["accuracy"]):
            break
        time.sleep(0.25)
    else:
        pytest.fail(f"convserve_live_accuracy never showed {whole['accuracy']}")
    correct = re.search(r'^convserve_feedback_total\{model="mnist",outcome="correct",version="1"\} (\S+)$', text,
                        re.M)
    incorrect = re.search(r'^convserve_feedback_total\{model="mnist",outcome="incorrect",version="1"\} (\S+)$',
                          text, re.M)
    assert float(correct.group(1)) == whole["correct"]
    assert float(incorrect.group(1)) == whole["labelled"] - whole["correct"]
    assert re.search(r'^convserve_prediction_drift_psi\{model="mnist",version="1"\} \S+$', text, re.M)


def test_every_protocol_logs_its_predictions_under_the_answers_id(server, mnist_pngs):
    png, label = mnist_pngs[0]
    rows = np.asarray(Image.open(io.BytesIO(png)).convert("L"), np.float32)[None, :, :, None]
    ids = []
    r = httpx.post(f"{server.url}/v2/models/mnist/infer", timeout=30, json={"inputs": [
        {"name": "image", "datatype": "FP32", "shape": list(rows.shape), "data": rows.ravel().tolist()}]})
    assert r.status_code == 200
    ids.append(r.headers["x-request-id"])  # the server's own id when the client sets none
    r = httpx.post(f"{server.url}/v1/models/mnist:predict", timeout=30,
                   json={"instances": [{"b64": base64.b64encode(png).decode()}]}, headers={"X-Request-Id": "tfs-1"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "tfs-1"
    ids.append("tfs-1")
    r = httpx.post(f"{server.url}/models/mnist/predict", content=png, headers={"Content-Type": "image/png"},
                   timeout=30)
    ids.append(r.headers["x-request-id"])
    with tg.InferenceServerClient(server.grpc_url) as client:
        tensor = tg.InferInput("image", list(rows.shape), "FP32")
        tensor.set_data_from_numpy(rows)
        ids.append(client.infer("mnist", [tensor], request_id="grpc-1").get_response().id)
        tensor = tg.InferInput("image", list(rows.shape), "FP32")
        tensor.set_data_from_numpy(rows)
        generated = client.infer("mnist", [tensor]).get_response().id  # no id sent: the answer carries one
        assert re.fullmatch(r"[0-9a-f]{16}", generated)
        ids.append(generated)
    assert ids[3] == "grpc-1"
    for request_id in ids:
        r = feedback(server.url, {"id": request_id, "index": 0, "label": label})
        assert (r.status_code, r.json()) == (200, {"accepted": 1, "new": 1}), request_id


@pytest.fixture(scope="module")
def labelled(server, mnist_pngs) -> str:
    """A prediction labelled 7 (whatever it predicted), for the refusals below."""
    predict(server.url, [mnist_pngs[1][0], mnist_pngs[2][0]], "bad-base")
    assert feedback(server.url, {"id": "bad-base", "label": 7}).status_code == 200
    return "bad-base"


@pytest.mark.parametrize(("body", "status", "message"), [
    ({"id": "bad-base", "label": 3}, 409, "already has label 7"),
    ({"id": "bad-base", "label": 10}, 422, "out of range"),
    ({"id": "bad-base", "index": 1, "label": -1}, 422, "out of range"),
    ({"id": "bad-base", "index": 1, "label": 7.0}, 422, "class id"),
    ({"id": "bad-base", "index": 1, "label": True}, 422, "class id"),
    ({"id": "bad-base", "index": 1, "label": "seven"}, 422, "unknown label"),
    ({"id": "bad-base", "index": 1}, 422, "label is missing"),
    ({"id": "bad-base", "index": -1, "label": 1}, 422, "index"),
    ({"id": "bad-base", "index": "1", "label": 1}, 422, "index"),
    ({"id": 12, "label": 1}, 422, "request id"),
    ({"id": "bad base!", "label": 1}, 422, "request id"),
    ({"id": "bad-base", "label": 7, "extra": 1}, 422, "unknown field"),
    ({"feedback": []}, 422, "non-empty"),
    ({"feedback": {"id": "bad-base"}}, 422, "non-empty list"),
    ([1, 2], 422, "must be an object"),
    ({"id": "never-answered", "label": 1}, 404, "no logged prediction"),
    ({"id": "bad-base", "index": 5, "label": 1}, 404, "index 5"),
])
def test_bad_feedback_is_refused_with_its_status(server, labelled, body, status, message):
    r = feedback(server.url, body)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]


def test_the_same_label_again_is_accepted_and_not_stored_twice(server, labelled):
    r = feedback(server.url, {"id": labelled, "label": 7})
    assert (r.status_code, r.json()) == (200, {"accepted": 1, "new": 0})


def test_malformed_json_unknown_models_and_too_many_items(server, labelled):
    r = httpx.post(f"{server.url}/v2/models/mnist/feedback", content=b'{"id": ', timeout=30)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    assert feedback(server.url, {"id": labelled, "label": 1}, model="nope").status_code == 404
    r = feedback(server.url, {"feedback": [{"id": labelled, "index": 1, "label": 1}] * 1001})
    assert r.status_code == 413 and "limit of 1000" in r.json()["error"]


def test_a_batch_with_one_bad_item_stores_none_of_it(server, labelled):
    r = feedback(server.url, {"feedback": [{"id": labelled, "index": 1, "label": 2},
                                           {"id": "never-answered", "label": 1}]})
    assert r.status_code == 404
    r = feedback(server.url, {"feedback": [{"id": labelled, "index": 1, "label": 2},
                                           {"id": labelled, "index": 0, "label": 1}]})
    assert r.status_code == 409
    r = feedback(server.url, {"id": labelled, "index": 1, "label": 2})  # still unlabelled: taken now
    assert (r.status_code, r.json()) == (200, {"accepted": 1, "new": 1})


def test_a_restart_keeps_predictions_and_feedback(server, mnist_repo, state_file):
    before = quality(server.url)
    server.stop()  # SIGTERM: the writer's queue is written before the process exits
    again = start(mnist_repo, state_file)
    try:
        assert quality(again.url) == before
        assert feedback(again.url, {"id": "bad-base", "label": 7}).json() == {"accepted": 1, "new": 0}
    finally:
        again.stop()


def test_two_servers_on_one_postgresql_share_predictions_and_feedback(mnist_repo, mnist_pngs):
    with fresh_database() as url:
        a = start(mnist_repo, url)
        b = start(mnist_repo, url)
        try:
            (predicted,) = predict(a.url, [mnist_pngs[3][0]], "shared-1")
            r = feedback(b.url, {"id": "shared-1", "label": mnist_pngs[3][1]})  # labelled through the other one
            assert (r.status_code, r.json()) == (200, {"accepted": 1, "new": 1})
            assert feedback(a.url, {"id": "shared-1", "label": (mnist_pngs[3][1] + 1) % 10}).status_code == 409
            qa, qb = quality(a.url), quality(b.url)
            assert qa == qb
            (version,) = qa["versions"]
            assert version["predictions"] == version["labelled"] == 1
            assert version["accuracy"] == float(predicted == mnist_pngs[3][1])
        finally:
            a.stop()
            b.stop()
