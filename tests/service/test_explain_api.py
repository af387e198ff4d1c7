"""``POST /models/{name}[/versions/{v}]/explain``: the model's input, an occlusion saliency map that is faithful
to the model, and every conv and pool layer's feature maps, on the bundled trained models and tiny ones."""

from __future__ import annotations

import base64
import io
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.explain import cached_feature_sessions
from tests.service.conftest import BUNDLED_MODELS, png_bytes
from tests.support.missing import local_datasets, missing
from tests.support.models import DIGIT_LABELS

MNIST_TEST_DIGITS = 50
BLANKED = 0.10  # the share of the input's pixels set to background in the faithfulness test
MARGIN = 0.05


def published(name: str) -> bool:
    model = BUNDLED_MODELS / name
    return model.is_dir() and any((v / "model.onnx").is_file() for v in model.iterdir() if v.name.isdigit())


@pytest.fixture()
def bundled(app_client_factory, bundled_mnist):
    """An app on the bundled, trained models."""
    return app_client_factory(bundled_mnist)


@pytest.fixture(scope="module")
def mnist_test_digits() -> tuple[np.ndarray, np.ndarray]:
    """The first MNIST test images and labels, from the local dataset copy (never downloaded)."""
    path = local_datasets() / "mnist.npz"
    if not path.is_file():
        missing(f"no local MNIST: {path} (set CONVSERVE_DATA_DIR)")
    with np.load(path) as data:
        return data["x_test"][:MNIST_TEST_DIGITS], data["y_test"][:MNIST_TEST_DIGITS]


def explain(client, model: str, image: bytes, query: str = "", content_type: str = "image/png"):
    return client.post(f"/models/{model}/explain{query}", content=image, headers={"content-type": content_type})


def v2_probabilities(client, model: str, rows: np.ndarray) -> np.ndarray:
    body = {"inputs": [{"name": "image", "datatype": "FP32", "shape": list(rows.shape), "data": rows.ravel().tolist()}]}
    response = client.post(f"/v2/models/{model}/infer", json=body)
    assert response.status_code == 200, response.text
    return np.array(response.json()["outputs"][0]["data"], dtype=np.float64).reshape(len(rows), -1)


def feature_shapes(client, model: str, image: bytes) -> list[tuple[str, list[int]]]:
    response = explain(client, model, image, content_type="application/octet-stream")
    assert response.status_code == 200, response.text
    return [(m["op"], m["shape"]) for m in response.json()["feature_maps"]]


def decoded_png(data: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    image.load()
    return image


# --- feature maps --------------------------------------------------------------------------------

def test_lenet_feature_maps_have_the_architecture_shapes(bundled, mnist_pngs) -> None:
    response = explain(bundled, "mnist", mnist_pngs[0][0])
    assert response.status_code == 200, response.text
    maps = response.json()["feature_maps"]
    assert [(m["op"], m["shape"]) for m in maps] == [
        ("Conv", [24, 24, 20]), ("MaxPool", [12, 12, 20]), ("Conv", [8, 8, 50]), ("MaxPool", [4, 4, 50])]
    assert [m["layer"].split("/")[1] for m in maps] == ["conv1_1", "pool1_1", "conv2_1", "pool2_1"]  # node names
    assert maps[0]["tensor"].endswith("Relu:0")  # a convolution is shown after its activation
    for m in maps:
        grid = decoded_png(m["png"])
        h, w, channels = m["shape"]
        assert grid.format == "PNG" and grid.mode == "L"
        assert grid.width * grid.height >= channels * h * w  # every channel is in the grid


def test_fashion_mnist_and_cifar10_feature_maps_have_their_architectures_shapes(bundled, mnist_pngs,
                                                                               cifar_jpegs) -> None:
    if not published("fashion-mnist") or not published("cifar10"):
        missing("fashion-mnist or cifar10 is not published in this checkout")
    assert feature_shapes(bundled, "fashion-mnist", mnist_pngs[0][0]) == [
        ("Conv", [28, 28, 32]), ("MaxPool", [14, 14, 32]), ("Conv", [14, 14, 64]), ("MaxPool", [7, 7, 64])]
    block = [("Conv", [32, 32, 32]), ("Conv", [32, 32, 32]), ("MaxPool", [16, 16, 32]),
             ("Conv", [16, 16, 64]), ("Conv", [16, 16, 64]), ("MaxPool", [8, 8, 64]),
             ("Conv", [8, 8, 128]), ("Conv", [8, 8, 128]), ("MaxPool", [4, 4, 128])]
    assert feature_shapes(bundled, "cifar10", cifar_jpegs[0][0]) == block


def test_any_exported_cnn_is_explained_not_only_ours(app_client_factory, make_version, tmp_path: Path) -> None:
    make_version(tmp_path, "tinycnn", 1, (16, 12, 3), DIGIT_LABELS, digit=False, seed=5, conv=True)
    client = app_client_factory(tmp_path)
    image = png_bytes(np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8))
    body = explain(client, "tinycnn", image).json()
    assert [(m["layer"], m["op"], m["tensor"], m["shape"]) for m in body["feature_maps"]] == [
        ("conv1", "Conv", "conv1_relu", [16, 12, 4]), ("pool1", "MaxPool", "pool1_out", [8, 6, 4])]
    assert body["input"]["shape"] == [16, 12, 3] and decoded_png(body["input"]["png"]).mode == "RGB"
    assert body["saliency"]["shape"] == [16, 12] and np.array(body["saliency"]["data"]).shape == (16, 12)


def test_the_graph_reader_agrees_with_the_onnx_package(bundled_mnist) -> None:
    import onnx

    from service.explain import graph_nodes, with_graph_outputs

    for path in sorted(bundled_mnist.glob("*/[0-9]*/model.onnx")):
        data = path.read_bytes()
        model = onnx.load_from_string(data)
        assert [(n.name, n.op_type, n.domain, n.inputs, n.outputs) for n in graph_nodes(data)] == [
            (n.name, n.op_type, n.domain, tuple(n.input), tuple(n.output)) for n in model.graph.node], path
        extended = onnx.load_from_string(with_graph_outputs(data, ["a:0", "b"]))
        assert [o.name for o in extended.graph.output] == [o.name for o in model.graph.output] + ["a:0", "b"]
        assert len(extended.graph.node) == len(model.graph.node)


# --- the input, the predictions and the saliency ---------------------------------------------------

def test_explain_answers_the_predictions_predict_gives(bundled, mnist_pngs) -> None:
    image, label = mnist_pngs[3]
    predicted = bundled.post("/models/mnist/predict?top_k=3", content=image,
                             headers={"content-type": "image/png"}).json()
    body = explain(bundled, "mnist", image, "?top_k=3").json()
    assert (body["model"], body["version"]) == (predicted["model"], predicted["version"])
    [mine], [theirs] = body["predictions"], predicted["predictions"]
    assert mine["class_id"] == theirs["class_id"] == label
    assert [c["class_id"] for c in mine["top_k"]] == [c["class_id"] for c in theirs["top_k"]]
    np.testing.assert_allclose([c["score"] for c in mine["top_k"]], [c["score"] for c in theirs["top_k"]], atol=1e-6)
    assert body["saliency"]["class_id"] == label and body["saliency"]["label"] == str(label)
    assert body["saliency"]["method"] == "occlusion"


def test_the_returned_input_through_v2_infer_gives_the_reported_probabilities(bundled, mnist_pngs,
                                                                               cifar_jpegs) -> None:
    cases = [("mnist", image) for image, _ in mnist_pngs[:5]]
    if published("cifar10"):
        cases += [("cifar10", image) for image, _ in cifar_jpegs[:3]]
    for model, image in cases:
        body = explain(bundled, model, image, "?top_k=10", content_type="application/octet-stream").json()
        rows = np.array(body["input"]["data"], dtype=np.float32)[None]
        assert list(rows.shape[1:]) == body["input"]["shape"]
        probabilities = v2_probabilities(bundled, model, rows)[0]
        reported = {c["class_id"]: c["score"] for c in body["predictions"][0]["top_k"]}
        assert len(reported) == 10
        np.testing.assert_allclose(probabilities, [reported[c] for c in range(10)], atol=1e-5, err_msg=model)
        shown = np.asarray(decoded_png(body["input"]["png"]), dtype=np.float32).reshape(rows.shape[1:])
        np.testing.assert_allclose(shown, np.clip(np.rint(rows[0]), 0, 255))  # the picture is the same input


def test_saliency_is_faithful_on_fifty_mnist_test_digits(bundled, mnist_test_digits) -> None:
    """Blanking the 10% most salient pixels lowers the explained class's probability more than blanking
    as many randomly chosen ink pixels (or every ink pixel, when a digit has fewer)."""
    images, labels = mnist_test_digits
    rng = np.random.default_rng(16)
    salient_drops, random_drops, correct = [], [], 0
    for image, label in zip(images, labels):
        body = explain(bundled, "mnist", png_bytes(image)).json()
        target = body["saliency"]["class_id"]
        correct += target == label
        x = np.array(body["input"]["data"], dtype=np.float32).reshape(-1)  # [28 * 28], one channel
        saliency = np.array(body["saliency"]["data"], dtype=np.float64).reshape(-1)
        n = round(BLANKED * x.size)
        most_salient = np.argsort(-saliency, kind="stable")[:n]
        ink = np.flatnonzero(x > 0)
        chosen = rng.choice(ink, size=min(n, ink.size), replace=False)
        variants = np.stack([x, x, x])
        variants[1, most_salient] = 0.0  # MNIST's background
        variants[2, chosen] = 0.0
        p = v2_probabilities(bundled, "mnist", variants.reshape(3, 28, 28, 1))[:, target]
        salient_drops.append(p[0] - p[1])
        random_drops.append(p[0] - p[2])
    salient, random = float(np.mean(salient_drops)), float(np.mean(random_drops))
    print(f"\nfaithfulness on {len(images)} MNIST test digits ({correct} classified right): blanking the 10% most "
          f"salient pixels lowers the class's probability by {salient:.3f} on average, 10% random ink pixels "
          f"by {random:.3f}")
    assert salient - random >= MARGIN, (salient, random)


def test_target_picks_the_class_explained(bundled, mnist_pngs) -> None:
    image, label = mnist_pngs[0]
    other = (label + 1) % 10
    top = explain(bundled, "mnist", image).json()
    asked = explain(bundled, "mnist", image, f"?target={other}").json()
    assert asked["saliency"]["class_id"] == other and asked["saliency"]["label"] == str(other)
    assert asked["predictions"] == top["predictions"]  # the prediction does not change, only what is explained
    assert asked["saliency"]["data"] != top["saliency"]["data"]
    for bad in ("10", "-1", "seven"):
        response = explain(bundled, "mnist", image, f"?target={bad}")
        assert response.status_code == 400 and "target must be a class id" in response.json()["error"]


# --- errors ------------------------------------------------------------------------------------

def test_bad_image_unknown_model_and_two_images_are_clear_errors_and_the_server_stays_up(client, mnist_pngs,
                                                                                         make_version,
                                                                                         app_client_factory,
                                                                                         tmp_path: Path) -> None:
    make_version(tmp_path, "cnn", 1, (28, 28, 1), DIGIT_LABELS, digit=True, conv=True)
    cnn = app_client_factory(tmp_path)
    bad = explain(cnn, "cnn", b"\x89PNG\r\n\x1a\n not really")
    assert bad.status_code == 400 and "not a decodable image" in bad.json()["error"]
    unknown = explain(cnn, "no-such-model", mnist_pngs[0][0])
    assert unknown.status_code == 404 and "not found" in unknown.json()["error"]
    files = [("file", ("a.png", mnist_pngs[0][0], "image/png")), ("file", ("b.png", mnist_pngs[1][0], "image/png"))]
    two = cnn.post("/models/cnn/explain", files=files)
    assert two.status_code == 400 and two.json() == {"error": "explain takes exactly one image, got 2"}
    assert explain(cnn, "cnn", mnist_pngs[0][0]).status_code == 200  # still serving


def test_a_model_without_convolutions_is_refused_clearly(client, mnist_pngs) -> None:
    response = explain(client, "digits", mnist_pngs[0][0])  # the tiny dense digit model
    assert response.status_code == 422
    assert response.json() == {"error": "model digits version 2 has no convolution or pooling layers, "
                                        "so it has no feature maps to explain"}
    assert client.post("/models/digits/predict", content=mnist_pngs[0][0],
                       headers={"content-type": "image/png"}).status_code == 200
    text = client.get("/metrics").text
    assert 'convserve_explanations_total{model="digits",outcome="invalid",version="2"} 1.0' in text


# --- cost, limits, metrics and the session cache ---------------------------------------------------

def test_an_explanation_counts_its_occlusion_rows_in_the_queue(app_client_factory, make_version,
                                                               tmp_path: Path) -> None:
    """With one request running and one queued, a one-row prediction still fits in a 100-row queue; an
    explanation of 1 + 169 rows does not, and is refused 503 with Retry-After."""
    make_version(tmp_path, "cnn", 1, (28, 28, 1), DIGIT_LABELS, digit=True, conv=True)
    client = app_client_factory(tmp_path, max_queue_size=100, max_batch_size=1)
    batcher = client.app.state.dataplane.repository.get("cnn", 1).batcher
    release = threading.Event()
    predict = batcher._predict
    batcher._predict = lambda rows: (release.wait(30), predict(rows))[1]  # hold the first batch
    row = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 28, 28, 1], "data": [0.0] * 784}]}
    statuses: list[int] = []

    def infer() -> None:
        statuses.append(client.post("/v2/models/cnn/infer", json=row).status_code)

    running = threading.Thread(target=infer)
    running.start()
    while not batcher._running:
        threading.Event().wait(0.01)
    queued = threading.Thread(target=infer)
    queued.start()
    while batcher.queued_rows < 1:
        threading.Event().wait(0.01)
    image = png_bytes(np.pad(np.full((12, 4), 255, np.uint8), 8))
    refused = explain(client, "cnn", image)
    release.set()
    for thread in (running, queued):
        thread.join(30)
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert "overloaded" in refused.json()["error"]
    assert statuses == [200, 200]
    assert explain(client, "cnn", image).status_code == 200  # an idle queue takes it
    text = client.get("/metrics").text
    series = '{model="cnn",outcome="%s",version="1"}'
    assert f"convserve_explanations_total{series % 'rejected'} 1.0" in text
    assert f"convserve_explanations_total{series % 'success'} 1.0" in text
    assert 'convserve_batch_rows_sum{model="cnn",version="1"} 172.0' in text  # 1 + 1 + (1 + 13 x 13 patches)


def test_explanations_have_their_own_metrics_and_leave_the_prediction_metrics_alone(bundled, mnist_pngs) -> None:
    explain(bundled, "mnist", mnist_pngs[0][0])
    text = bundled.get("/metrics").text
    assert 'convserve_explanations_total{model="mnist",outcome="success",version="1"} 1.0' in text
    assert 'convserve_explain_duration_seconds_count{model="mnist",version="1"} 1.0' in text
    assert 'convserve_http_requests_total{method="POST",route="/models/{name}/explain",status="200"} 1.0' in text
    assert 'convserve_inference_requests_total{model="mnist",outcome="success",version="1"} 0.0' in text
    assert "convserve_predicted_class_total{" not in text  # 170 occluded rows are not 170 predictions


def test_the_feature_map_session_is_built_once_per_version_and_released_with_it(app_client_factory, make_version,
                                                                                 tmp_path: Path) -> None:
    make_version(tmp_path, "cnn", 1, (28, 28, 1), DIGIT_LABELS, digit=True, conv=True)
    client = app_client_factory(tmp_path)
    image = png_bytes(np.pad(np.full((12, 4), 255, np.uint8), 8))
    before = cached_feature_sessions()
    assert explain(client, "cnn", image).status_code == 200
    assert explain(client, "cnn", image, "?target=3").status_code == 200
    assert cached_feature_sessions() == before + 1
    (tmp_path / "cnn" / "1" / "model.onnx").unlink()
    (tmp_path / "cnn" / "1" / "metadata.json").unlink()
    (tmp_path / "cnn" / "1").rmdir()
    repository = client.app.state.dataplane.repository
    client.portal.call(repository.refresh)
    assert explain(client, "cnn", image).status_code == 503  # the model has no version left
    assert cached_feature_sessions() == before  # released when the version was unloaded
