"""The image endpoints: uploads in three body formats, versions, top-k, and every error class."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from tests.support.oracle import Oracle


def expected_probabilities(model_repo, name, version, images):
    """What the version's model.onnx says for the images, given as its metadata.json documents its input (the
    oracle of tests/support/oracle.py: no service code)."""
    return Oracle(model_repo / name / str(version)).probabilities(images)


def assert_top_k(prediction, probabilities, k):
    """The prediction's top-k entries are the k most probable classes, in order, with their probabilities."""
    order = np.argsort(-probabilities, kind="stable")[:k]
    assert [entry["class_id"] for entry in prediction["top_k"]] == order.tolist()
    assert [entry["label"] for entry in prediction["top_k"]] == [str(i) for i in order]
    np.testing.assert_allclose([entry["score"] for entry in prediction["top_k"]], probabilities[order], atol=1e-6)
    assert prediction["class_id"] == int(order[0]) and prediction["score"] == prediction["top_k"][0]["score"]


def test_predict_multipart_file_returns_prediction_of_newest_version(client, model_repo, mnist_pngs):
    image, _ = mnist_pngs[0]
    response = client.post("/models/digits/predict", files={"file": ("d.png", image, "image/png")})
    assert response.status_code == 200
    body = response.json()
    assert body["model"] == "digits" and body["version"] == 2
    [prediction] = body["predictions"]
    probabilities = expected_probabilities(model_repo, "digits", 2, [image])[0]
    assert prediction["class_id"] == int(probabilities.argmax())
    assert prediction["label"] == str(prediction["class_id"])
    assert abs(prediction["score"] - float(probabilities.max())) < 1e-6
    assert len(prediction["top_k"]) == 5
    assert prediction["top_k"][0]["class_id"] == prediction["class_id"]
    scores = [entry["score"] for entry in prediction["top_k"]]
    assert scores == sorted(scores, reverse=True)


def test_predict_many_files_answers_in_input_order_whatever_the_field_names(client, model_repo, mnist_pngs):
    images = [img for img, _ in mnist_pngs[:6]]
    files = [("files", (f"{i}.png", img, "image/png")) for i, img in enumerate(images[:4])]
    files += [("other", ("x.png", images[4], "image/png")), ("file", ("y.png", images[5], "image/png"))]
    response = client.post("/models/digits/predict", files=files)
    assert response.status_code == 200
    got = [p["class_id"] for p in response.json()["predictions"]]
    expected = expected_probabilities(model_repo, "digits", 2, images)
    assert got == expected.argmax(axis=1).tolist()


def test_predict_raw_image_body(client, model_repo, mnist_pngs):
    response = client.post("/models/digits/predict?top_k=2", content=mnist_pngs[1][0],
                           headers={"content-type": "image/png"})
    assert response.status_code == 200
    probabilities = expected_probabilities(model_repo, "digits", 2, [mnist_pngs[1][0]])[0]
    assert_top_k(response.json()["predictions"][0], probabilities, 2)


def test_predict_json_base64_images_with_top_k(client, model_repo, mnist_pngs):
    images = [img for img, _ in mnist_pngs[:3]]
    response = client.post("/models/digits/predict",
                           json={"images": [base64.b64encode(img).decode() for img in images], "top_k": 3})
    assert response.status_code == 200
    predictions = response.json()["predictions"]
    assert len(predictions) == 3
    for prediction, probabilities in zip(predictions, expected_probabilities(model_repo, "digits", 2, images)):
        assert_top_k(prediction, probabilities, 3)


def test_predict_versioned_route_uses_that_version(client, model_repo, mnist_pngs):
    image = mnist_pngs[0][0]
    response = client.post("/models/digits/versions/1/predict", content=image, headers={"content-type": "image/png"})
    assert response.status_code == 200
    assert response.json()["version"] == 1
    [v1], [v2] = (expected_probabilities(model_repo, "digits", v, [image]) for v in (1, 2))
    assert not np.allclose(v1, v2, atol=1e-3)  # the two versions disagree, so the answer tells which one ran
    assert_top_k(response.json()["predictions"][0], v1, 5)


def test_predict_rgb_model_accepts_jpegs(client, model_repo, cifar_jpegs):
    images = [image for image, _ in cifar_jpegs]
    files = [("files", (f"{i}.jpg", image, "image/jpeg")) for i, image in enumerate(images)]
    response = client.post("/models/colors/predict", files=files)
    assert response.status_code == 200
    predictions = response.json()["predictions"]
    labels = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    expected = expected_probabilities(model_repo, "colors", 1, images)
    assert [p["class_id"] for p in predictions] == expected.argmax(axis=1).tolist()
    assert [p["label"] for p in predictions] == [labels[i] for i in expected.argmax(axis=1)]
    np.testing.assert_allclose([p["score"] for p in predictions], expected.max(axis=1), atol=1e-6)


def test_list_models_shows_versions_state_and_input_spec(client):
    response = client.get("/models")
    assert response.status_code == 200
    models = {m["name"]: m for m in response.json()["models"]}
    assert set(models) == {"colors", "digits"}
    assert models["digits"]["default_version"] == 2
    assert [v["version"] for v in models["digits"]["versions"]] == [1, 2]
    assert all(v["state"] == "READY" for v in models["digits"]["versions"])
    assert models["digits"]["input"] == {"name": "image", "datatype": "FP32", "shape": [-1, 28, 28, 1]}
    assert models["digits"]["digit"] is True
    assert models["colors"]["input"]["shape"] == [-1, 32, 32, 3]


# --- errors ------------------------------------------------------------------------------------

def test_predict_unknown_model_is_404_json(client, mnist_pngs):
    response = client.post("/models/nope/predict", content=mnist_pngs[0][0], headers={"content-type": "image/png"})
    assert response.status_code == 404
    assert response.json() == {"error": "model 'nope' not found"}


def test_predict_unknown_version_is_404(client, mnist_pngs):
    response = client.post("/models/digits/versions/9/predict", content=mnist_pngs[0][0],
                           headers={"content-type": "image/png"})
    assert response.status_code == 404
    assert "no version 9" in response.json()["error"]


def test_predict_path_traversal_names_are_not_found(client, mnist_pngs):
    for path in ("/models/..%2F..%2Fetc/predict", "/models/digits/versions/..%2F1/predict",
                 "/models/%2E%2E/predict", "/models/digits/versions/-1/predict"):
        response = client.post(path, content=mnist_pngs[0][0], headers={"content-type": "image/png"})
        assert response.status_code in (400, 404), path
        assert "error" in response.json()


def test_predict_rejects_truncated_png(client, mnist_pngs):
    image = mnist_pngs[0][0]
    response = client.post("/models/digits/predict", content=image[: len(image) // 2],
                           headers={"content-type": "image/png"})
    assert response.status_code == 400
    assert "truncated" in response.json()["error"] or "corrupt" in response.json()["error"]


def test_predict_rejects_bytes_that_are_not_an_image(client):
    response = client.post("/models/digits/predict", files={"file": ("x.png", b"hello world", "image/png")})
    assert response.status_code == 400
    assert "not a decodable image" in response.json()["error"]


def test_predict_rejects_unsupported_media_type(client):
    response = client.post("/models/digits/predict", content=b"hi", headers={"content-type": "text/plain"})
    assert response.status_code == 415
    assert "unsupported content type" in response.json()["error"]


def test_predict_rejects_too_many_images(app_client_factory, model_repo, mnist_pngs):
    client = app_client_factory(model_repo, max_images_per_request=2)
    files = [("files", (f"{i}.png", mnist_pngs[0][0], "image/png")) for i in range(3)]
    response = client.post("/models/digits/predict", files=files)
    assert response.status_code == 400
    assert "exceed the limit of 2" in response.json()["error"]


def test_predict_rejects_body_over_limit_with_413(app_client_factory, model_repo):
    client = app_client_factory(model_repo, max_body_bytes=4096)
    response = client.post("/models/digits/predict", content=b"\0" * 5000, headers={"content-type": "image/png"})
    assert response.status_code == 413
    assert "exceeds the limit of 4096 bytes" in response.json()["error"]


def test_predict_rejects_decompression_bomb_with_413(app_client_factory, model_repo):
    client = app_client_factory(model_repo, max_image_pixels=1_000_000)
    buffer = io.BytesIO()
    Image.new("L", (2000, 2000)).save(buffer, format="PNG")  # 4 MP in a few kB
    assert len(buffer.getvalue()) < 20_000
    response = client.post("/models/digits/predict", content=buffer.getvalue(), headers={"content-type": "image/png"})
    assert response.status_code == 413
    assert "exceeds the limit of 1000000 pixels" in response.json()["error"]


def test_predict_rejects_invalid_base64(client):
    response = client.post("/models/digits/predict", json={"images": ["%%%not base64"]})
    assert response.status_code == 400
    assert "images[0] is not valid base64" == response.json()["error"]


def test_predict_rejects_malformed_json(client):
    response = client.post("/models/digits/predict", content=b"{nope", headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]


def test_predict_rejects_bad_top_k(client, mnist_pngs):
    response = client.post("/models/digits/predict?top_k=zero", content=mnist_pngs[0][0],
                           headers={"content-type": "image/png"})
    assert response.status_code == 400
    assert response.json()["error"] == "top_k must be a positive integer"


def test_predict_with_no_image_parts_is_400(client):
    response = client.post("/models/digits/predict", data={"top_k": "3"},
                           files={"unused": ("", b"", "application/octet-stream")})
    assert response.status_code == 400


def test_unknown_route_is_json_404(client):
    response = client.get("/nothing/here")
    assert response.status_code == 404
    assert response.json() == {"error": "Not Found"}


def test_wrong_method_is_json_405(client):
    response = client.get("/models/digits/predict")
    assert response.status_code == 405
    assert "error" in response.json()


def test_every_response_carries_a_request_id(client):
    response = client.get("/models", headers={"x-request-id": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"
    generated = client.get("/models").headers["x-request-id"]
    assert generated and generated != "abc-123"


@pytest.mark.parametrize("sent", ["a" * 64, "A.b_c-9", "x"])
def test_request_id_of_1_to_64_safe_characters_is_kept(client, sent):
    assert client.get("/models", headers={"x-request-id": sent}).headers["x-request-id"] == sent


@pytest.mark.parametrize("sent", ["", "a" * 65, "has space", "semi;colon", "slash/es", "quote\""])
def test_any_other_request_id_is_replaced_by_a_generated_one(client, sent):
    answered = client.get("/models", headers={"x-request-id": sent}).headers["x-request-id"]
    assert answered != sent
    assert len(answered) == 16 and int(answered, 16) >= 0
