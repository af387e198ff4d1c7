"""The bundled CIFAR-10 and Fashion-MNIST classifiers on real labelled test images, through a real server: each
answer is what the served version's model.onnx says for that image (tests/support/oracle.py, no service code),
and together the answers clear an accuracy floor derived from the version's own measured test accuracy."""

from __future__ import annotations

import json
from math import comb
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.support.missing import missing
from tests.support.oracle import Oracle
from tests.support.server import ServiceProcess

REPO_ROOT = Path(__file__).resolve().parents[2]
BUNDLED_MODELS = REPO_ROOT / "models"
TEST_DATA = REPO_ROOT / "tests" / "data"
FLOOR_RISK = 0.05
"""The chance that a model as accurate as its metadata.json says still scores under the floor on a random sample
of as many test images: the floor is the most correct answers it reaches but for that chance."""


def accuracy_floor(accuracy: float, images: int, risk: float = FLOOR_RISK) -> int:
    """The largest k with P(Binomial(images, accuracy) < k) < risk."""
    below = 0.0
    for k in range(images + 1):
        below += comb(images, k) * accuracy**k * (1 - accuracy) ** (images - k)  # now P(X <= k) = P(X < k + 1)
        if below >= risk:
            return k
    return images


def newest_version(name: str) -> Path:
    model = BUNDLED_MODELS / name
    versions = sorted((p for p in model.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)) \
        if model.is_dir() else []
    if not versions or not (versions[-1] / "model.onnx").is_file():
        missing(f"the bundled models/{name} is not in this checkout")
    return versions[-1]


@pytest.fixture(scope="module")
def fashion_pngs() -> list[tuple[bytes, str]]:
    """The first 20 Fashion-MNIST test images (t10k), committed as PNG files, with their label names."""
    names = (BUNDLED_MODELS / "fashion-mnist" / "labels.txt").read_text().splitlines()
    labels = json.loads((TEST_DATA / "fashion-mnist" / "labels.json").read_text())
    return [((TEST_DATA / "fashion-mnist" / file).read_bytes(), names[label]) for file, label in sorted(labels.items())]


def check_answers_like_its_model_above_the_floor(server: ServiceProcess, name: str, media_type: str,
                                                 labelled: list[tuple[bytes, str]]) -> None:
    """Upload the labelled images together; the newest version answers each like its model.onnx, and well enough."""
    version = newest_version(name)
    images = [data for data, _ in labelled]
    suffix = media_type.removeprefix("image/")
    files = [("files", (f"{i}.{suffix}", data, media_type)) for i, data in enumerate(images)]
    response = httpx.post(f"{server.url}/models/{name}/predict", files=files, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["model"], body["version"]) == (name, int(version.name))

    oracle = Oracle(version)
    expected = oracle.probabilities(images)
    predictions = body["predictions"]
    assert [p["class_id"] for p in predictions] == expected.argmax(axis=1).tolist()
    assert [p["label"] for p in predictions] == [oracle.metadata["labels"][i] for i in expected.argmax(axis=1)]
    np.testing.assert_allclose([p["score"] for p in predictions], expected.max(axis=1), atol=1e-5)

    correct = sum(p["label"] == label for p, (_, label) in zip(predictions, labelled))
    floor = accuracy_floor(oracle.metadata["test_metrics"]["accuracy"], len(labelled))
    assert correct >= floor, f"{correct}/{len(labelled)} correct, under the floor of {floor}"


def test_accuracy_floor_is_what_a_model_of_that_accuracy_reaches_but_for_the_risk():
    assert accuracy_floor(0.8774, 20) == 15  # P(X < 15) = 2.9%, P(X < 16) = 8.9%
    assert accuracy_floor(0.9308, 20) == 17  # P(X < 17) = 4.5%, P(X < 18) = 16%
    assert accuracy_floor(1.0, 20) == 20


def test_cifar10_answers_its_labelled_test_jpegs_like_its_model_and_above_the_floor(bundled_server, cifar_jpegs):
    check_answers_like_its_model_above_the_floor(bundled_server, "cifar10", "image/jpeg", cifar_jpegs)


def test_fashion_mnist_answers_its_labelled_test_images_like_its_model_and_above_the_floor(
        bundled_server, fashion_pngs):
    check_answers_like_its_model_above_the_floor(bundled_server, "fashion-mnist", "image/png", fashion_pngs)
