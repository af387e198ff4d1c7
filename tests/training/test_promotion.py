"""The promotion gate: a worse or incomparable candidate is refused (status 3) unless forced, the first
version needs no gate, every published version records the comparison, and an operator rolls back
without restarting the service."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import httpx
import pytest

from tests.service.test_lifecycle import wait_for
from tests.support.server import ServiceProcess
from tests.training.conftest import LIMIT
from tests.training.test_train_export import MAX_STEPS, run_cli
from training.data import Dataset
from training.evaluate import evaluate_onnx
from training.export import export_version
from training.promotion import Gate, PromotionRefused, judge
from training.recipes import MNIST_LABELS, get_recipe
from training.train import TrainResult, train

REPO_ROOT = Path(__file__).resolve().parents[2]
BUNDLED = REPO_ROOT / "models"
REFUSAL = re.compile(r"^mnist was not published: candidate accuracy (\d+\.\d\d)% is (\d+\.\d\d) pp below "
                     r"version 1's (\d+\.\d\d)% on the same 600 test images \(tolerance 0\.1 pp\); "
                     r"its export is kept in (\S+) \(--force publishes it anyway\)$")


def versions(model_root: Path) -> list[str]:
    return sorted(p.name for p in model_root.iterdir() if p.is_dir())  # hidden staging dirs included


def good_repository(tmp_path: Path, name: str = "mnist", source: str = "mnist") -> Path:
    """A model repository holding the bundled, fully trained version 1 of ``source`` as ``name``."""
    bundled = BUNDLED / source
    if not (bundled / "1" / "model.onnx").is_file():
        pytest.skip(f"the bundled models/{source} is not in this checkout")
    models = tmp_path / "models"
    (models / name).mkdir(parents=True)
    shutil.copytree(bundled / "1", models / name / "1")
    for file in ("labels.txt", "config.pbtxt"):
        shutil.copy(bundled / file, models / name / file)
    return models


@pytest.fixture(scope="module")
def weak(mnist_small: Dataset, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    """A few steps of training: far below the bundled mnist's 99%."""
    return train(get_recipe("mnist"), mnist_small, tmp_path_factory.mktemp("runs"), epochs=1, max_steps=MAX_STEPS,
                 verbose=0)


# --- Through the CLI: refused with status 3, then forced ----------------------------------------

@pytest.fixture(scope="module")
def refused_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("refused")
    models = good_repository(tmp)
    config_before = (models / "mnist" / "config.pbtxt").read_text()
    result = run_cli("train", "--recipe", "mnist", "--epochs", "1", "--max-steps", str(MAX_STEPS), "--limit",
                     str(LIMIT), "--data-dir", data_dir, "--models-dir", models, "--runs-dir", tmp / "runs")
    return {"result": result, "models": models, "runs": tmp / "runs", "config_before": config_before}


def test_short_training_into_a_repository_with_a_good_model_is_refused_with_status_3(refused_run):
    result = refused_run["result"]
    assert result.returncode == 3, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    match = REFUSAL.match(result.stderr.strip().splitlines()[-1])
    assert match, result.stderr[-1000:]
    candidate, worse, incumbent = (float(match.group(i)) for i in (1, 2, 3))
    assert incumbent > 95 and candidate < incumbent - 0.1
    assert worse == pytest.approx(incumbent - candidate, abs=0.011)


def test_a_refused_candidate_leaves_the_repository_untouched(refused_run):
    model_root = refused_run["models"] / "mnist"
    assert versions(model_root) == ["1"]
    assert (model_root / "config.pbtxt").read_text() == refused_run["config_before"]
    assert (model_root / "labels.txt").read_text().splitlines() == list(MNIST_LABELS)


def test_a_refused_candidate_is_kept_in_its_run_directory_with_the_comparison(refused_run):
    (run,) = (refused_run["runs"] / "mnist").iterdir()
    kept = run / "candidate"
    assert REFUSAL.match(refused_run["result"].stderr.strip().splitlines()[-1]).group(4) == str(kept)
    assert (kept / "model.onnx").is_file() and (kept / "saved_model.pb").is_file()
    metadata = json.loads((kept / "metadata.json").read_text())
    assert metadata["version"] is None
    promotion = metadata["promotion"]
    assert promotion["decision"] == "refused" and promotion["incumbent_version"] == 1
    assert promotion["incumbent_accuracy"] > promotion["candidate_accuracy"]
    assert (kept / "report" / "report.md").read_text().startswith("# mnist candidate (not published)\n")


@pytest.fixture(scope="module")
def forced_export(refused_run: dict, data_dir: Path) -> dict:
    """The lead's path: ``export --checkpoint`` of the refused run, first plain, then ``--force``."""
    (run,) = (refused_run["runs"] / "mnist").iterdir()
    args = ("export", "--checkpoint", run / "last.keras", "--recipe", "mnist", "--data-dir", data_dir,
            "--limit", str(LIMIT), "--models-dir", refused_run["models"])
    plain = run_cli(*args)
    forced = run_cli(*args, "--force")
    return {"plain": plain, "forced": forced, **refused_run}


def test_export_of_a_checkpoint_goes_through_the_gate_too(forced_export):
    plain = forced_export["plain"]
    assert plain.returncode == 3, plain.stderr[-3000:]
    assert REFUSAL.match(plain.stderr.strip().splitlines()[-1]), plain.stderr[-1000:]


def test_force_publishes_and_records_that_it_was_forced(forced_export):
    forced = forced_export["forced"]
    assert forced.returncode == 0, forced.stderr[-3000:]
    version = forced_export["models"] / "mnist" / "2"
    assert f"exported {version} " in forced.stdout
    assert "promotion gate: forced: candidate accuracy" in forced.stdout
    promotion = json.loads((version / "metadata.json").read_text())["promotion"]
    assert promotion["decision"] == "forced" and promotion["forced"] is True
    assert promotion["incumbent_version"] == 1 and promotion["tolerance_pp"] == 0.1
    assert promotion["incumbent_accuracy"] > promotion["candidate_accuracy"] + 0.001
    assert "| promotion gate | forced: candidate accuracy" in (version / "report" / "report.md").read_text()


def served_version(url: str) -> list[str]:
    return httpx.get(f"{url}/v2/models/mnist", timeout=5).json().get("versions", [])


def test_rollback_without_a_restart_by_pinning_then_by_moving_the_bad_version_aside(forced_export, tmp_path):
    """docs/training.md's two rollbacks, against a real server polling the repository."""
    models = tmp_path / "models"
    shutil.copytree(forced_export["models"], models)
    model_root = models / "mnist"
    server = ServiceProcess(models, env={"CONVSERVE_REPOSITORY_POLL_SECONDS": "0.2"})
    try:
        assert served_version(server.url) == ["2"]  # the forced, worse version took over
        config = (model_root / "config.pbtxt").read_text()
        pinned = re.sub(r"version_policy\s*:?\s*\{[^{}]*\{[^{}]*\}\s*\}\s*", "", config)
        (model_root / "config.pbtxt").write_text(pinned + "version_policy: { specific: { versions: [1] } }\n")
        assert wait_for(lambda: served_version(server.url) == ["1"])

        (model_root / "config.pbtxt").write_text(config)  # unpin: version 2 comes back...
        assert wait_for(lambda: served_version(server.url) == ["2"])
        (model_root / "2").rename(model_root / ".rejected-2")  # ...until it is moved aside
        assert wait_for(lambda: served_version(server.url) == ["1"])
        assert server.alive()
    finally:
        server.stop()


# --- The gate as a library ----------------------------------------------------------------------

def test_the_first_version_needs_no_gate(weak, mnist_small, tmp_path):
    target = export_version(weak.model, weak.recipe, mnist_small, tmp_path / "models")
    promotion = json.loads((target / "metadata.json").read_text())["promotion"]
    assert target.name == "1"
    assert promotion["decision"] == "first version" and promotion["incumbent_version"] is None


def test_a_version_as_good_as_the_incumbent_passes_and_records_the_comparison(weak, mnist_small, tmp_path):
    first = export_version(weak.model, weak.recipe, mnist_small, tmp_path / "models")
    second = export_version(weak.model, weak.recipe, mnist_small, tmp_path / "models")
    promotion = json.loads((second / "metadata.json").read_text())["promotion"]
    accuracy = json.loads((first / "metadata.json").read_text())["test_metrics"]["accuracy"]
    assert promotion == {"decision": "passed", "incumbent_version": 1, "incumbent_accuracy": accuracy,
                         "candidate_accuracy": accuracy, "tolerance_pp": 0.1, "test_images": LIMIT,
                         "forced": False, "reason": None}


def test_the_tolerance_is_in_percentage_points(mnist_small, tmp_path):
    model_root = good_repository(tmp_path) / "mnist"
    interface = json.loads((model_root / "1" / "metadata.json").read_text())
    incumbent = evaluate_onnx(model_root / "1" / "model.onnx", mnist_small.x_test, mnist_small.y_test,
                              list(MNIST_LABELS))["accuracy"]
    assert judge(model_root, incumbent - 0.0009, interface, mnist_small, Gate())["decision"] == "passed"
    assert judge(model_root, incumbent - 0.0011, interface, mnist_small, Gate())["decision"] == "refused"
    assert judge(model_root, incumbent - 0.02, interface, mnist_small, Gate(tolerance_pp=2.5))["decision"] == "passed"


def test_a_candidate_with_other_labels_is_refused_unless_forced(weak, mnist_small, tmp_path):
    models = good_repository(tmp_path, name="mnist", source="fashion-mnist")  # same input, other labels
    with pytest.raises(PromotionRefused, match=r"mnist was not published: the candidate is not comparable "
                                               r"with version 1: its labels \['0', '1', .*\] differ from "
                                               r"version 1's \['T-shirt/top'") as refused:
        export_version(weak.model, weak.recipe, mnist_small, models, gate=Gate(keep_dir=tmp_path / "run"))
    assert refused.value.kept == tmp_path / "run" / "candidate" and (refused.value.kept / "model.onnx").is_file()
    assert versions(models / "mnist") == ["1"]

    target = export_version(weak.model, weak.recipe, mnist_small, models, gate=Gate(force=True))
    promotion = json.loads((target / "metadata.json").read_text())["promotion"]
    assert promotion["decision"] == "forced" and "not comparable" in promotion["reason"]
    assert promotion["incumbent_accuracy"] is None


def test_a_candidate_with_another_input_is_refused(mnist_small, tmp_path):
    model_root = good_repository(tmp_path) / "mnist"
    interface = json.loads((model_root / "1" / "metadata.json").read_text())
    interface["input"] = {**interface["input"], "shape": [-1, 32, 32, 1]}
    record = judge(model_root, 1.0, interface, mnist_small, Gate())
    assert record["decision"] == "refused"
    assert record["reason"] == ("the candidate is not comparable with version 1: its input image [-1, 32, 32, 1] "
                                "differs from version 1's image [-1, 28, 28, 1]")
