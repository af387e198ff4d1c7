"""The committed models: every version in models/ is intact and scores what its metadata says.

This is `python -m training evaluate` as a test: each committed ``model.onnx`` is scored on its
dataset's untouched test set and must reproduce the accuracy in ``metadata.json`` and
``report/metrics.json``. Every version also records its promotion (the gate's record, or one written
afterwards for the versions published before the gate existed: docs/training.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.data import Dataset, load_dataset, sha256_file
from training.evaluate import evaluate_onnx
from training.promotion import describe

REPO_ROOT = Path(__file__).resolve().parents[2]
MODELS = REPO_ROOT / "models"
VERSIONS = sorted(p for p in MODELS.glob("*/*") if p.is_dir() and p.name.isdigit())
REPORT_FILES = ("report.md", "metrics.json", "confusion_matrix.png", "learning_curves.png")

pytestmark = pytest.mark.skipif(not VERSIONS, reason="no committed model versions in models/")


@pytest.fixture(scope="module")
def test_sets(data_dir: Path) -> dict[str, Dataset]:
    """Datasets by name, loaded once for all versions that share them."""
    return {}


def metadata_of(version: Path) -> dict:
    return json.loads((version / "metadata.json").read_text())


@pytest.mark.parametrize("version", VERSIONS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_committed_version_is_complete_and_its_checksums_match(version):
    metadata = metadata_of(version)
    assert metadata["name"] == version.parent.name
    assert str(metadata["version"]) == version.name
    assert (version / "saved_model.pb").is_file() and (version / "model.onnx").is_file()
    for name in REPORT_FILES:
        assert (version / "report" / name).is_file(), name
    assert metadata["sha256"], "metadata lists no artifacts"
    for relative, digest in metadata["sha256"].items():
        assert sha256_file(version / relative) == digest, relative


@pytest.mark.parametrize("version", VERSIONS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_committed_version_records_its_promotion_and_its_report_says_the_same(version):
    metadata = metadata_of(version)
    promotion = metadata["promotion"]
    first = int(version.name) == min(int(p.name) for p in VERSIONS if p.parent == version.parent)
    assert promotion["decision"] in ("first version", "passed", "forced", "published before the gate")
    assert (promotion["decision"] == "first version") == first
    assert (promotion["incumbent_version"] is None) == first
    assert promotion["candidate_accuracy"] == metadata["test_metrics"]["accuracy"]
    assert promotion["test_images"] == metadata["test_metrics"]["examples"]
    if promotion["decision"] == "published before the gate":
        assert promotion["reason"] and promotion["backfilled"]
    assert f"| promotion gate | {describe(promotion)}" in (version / "report" / "report.md").read_text()


@pytest.mark.parametrize("version", VERSIONS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_committed_onnx_reproduces_the_reported_test_accuracy(version, test_sets, data_dir):
    metadata = metadata_of(version)
    recipe = metadata["recipe"]
    if recipe["dataset"] not in test_sets:
        shape = tuple(metadata["input"]["shape"][1:])
        test_sets[recipe["dataset"]] = load_dataset(recipe["dataset"], shape, metadata["labels"], data_dir)
    ds = test_sets[recipe["dataset"]]

    metrics = evaluate_onnx(version / "model.onnx", ds.x_test, ds.y_test, metadata["labels"])

    reported = metadata["test_metrics"]
    assert metrics["examples"] == reported["examples"] == len(ds.y_test)
    # one image either way allows for a floating-point tie broken differently by another CPU
    assert abs(metrics["accuracy"] - reported["accuracy"]) <= 1 / len(ds.y_test) + 1e-12
    assert json.loads((version / "report" / "metrics.json").read_text())["accuracy"] == reported["accuracy"]
