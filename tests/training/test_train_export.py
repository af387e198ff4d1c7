"""Smoke training and export: the model repository layout, ONNX parity, the CLI, and resuming."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import keras
import numpy as np
import pytest

from tests.training.conftest import LIMIT
from training import export
from training.cli import main
from training.data import Dataset
from training.evaluate import onnx_session, predict_onnx
from training.export import ExportError, export_version
from training.recipes import MNIST_LABELS, build_model, get_recipe
from training.train import TrainResult, get_strategy, split_validation, train

REPO_ROOT = Path(__file__).resolve().parents[2]
MAX_STEPS = 3  # batches per epoch

REQUIRED_METADATA_KEYS = {"name", "version", "labels", "digit", "input", "output", "test_metrics", "recipe",
                          "data", "sha256", "frameworks", "created_at"}


@pytest.fixture(autouse=True)
def restore_tf_log_level(monkeypatch: pytest.MonkeyPatch) -> None:
    """training.cli.main() sets TF_CPP_MIN_LOG_LEVEL when missing; undo that after in-process calls."""
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-m", "training", *map(str, args)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def trained(mnist_small: Dataset, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    runs = tmp_path_factory.mktemp("runs")
    return train(get_recipe("mnist"), mnist_small, runs, epochs=1, max_steps=MAX_STEPS, verbose=0)


@pytest.fixture(scope="module")
def exported(trained: TrainResult, mnist_small: Dataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """models/mnist/1 exported once through the library, shared by the read-only tests below."""
    models = tmp_path_factory.mktemp("models")
    return export_version(trained.model, trained.recipe, mnist_small, models, history=trained.history,
                          training={"epochs_run": trained.epochs_run, "wall_seconds": trained.wall_seconds,
                                    "strategy": trained.strategy})


@pytest.fixture(scope="module")
def metadata(exported: Path) -> dict:
    return json.loads((exported / "metadata.json").read_text())


# --- Training ------------------------------------------------------------------------------------

def test_smoke_training_writes_its_run_directory(trained):
    assert trained.run_dir.parent.name == "mnist"
    for name in ("last.keras", "best.keras", "history.json", "state.json", "tensorboard"):
        assert (trained.run_dir / name).exists(), name
    assert json.loads((trained.run_dir / "state.json").read_text())["epochs_done"] == 1


def test_smoke_training_records_one_epoch_of_history(trained):
    assert trained.epochs_run == 1
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"):
        assert len(trained.history[key]) == 1, key
    assert json.loads((trained.run_dir / "history.json").read_text()) == trained.history


def test_split_validation_carves_a_disjoint_seeded_split(mnist_small):
    (x_train, _), val = split_validation(mnist_small, 100, seed=7)
    assert val is not None and len(val[0]) == 100
    assert len(x_train) + 100 == len(mnist_small.x_train)
    (_, _), again = split_validation(mnist_small, 100, seed=7)
    assert np.array_equal(val[0], again[0])


def test_validation_size_0_trains_on_everything_and_keeps_the_last_epoch(mnist_small, tmp_path):
    (x_train, _), val = split_validation(mnist_small, 0, seed=7)
    assert val is None and len(x_train) == len(mnist_small.x_train)

    recipe = replace(get_recipe("mnist"), validation_size=0)
    result = train(recipe, mnist_small, tmp_path / "runs", epochs=1, max_steps=2, verbose=0)
    assert not (result.run_dir / "best.keras").exists()
    assert set(result.history) == {"loss", "accuracy", "learning_rate"}
    last = keras.saving.load_model(result.run_dir / "last.keras")
    for kept, saved in zip(result.model.get_weights(), last.get_weights()):
        assert np.array_equal(kept, saved)

    models = export_version(result.model, result.recipe, mnist_small, tmp_path / "models", history=result.history)
    metadata = json.loads((models / "metadata.json").read_text())
    assert metadata["training"]["best_val_accuracy"] is None
    assert "| best validation accuracy | n/a |" in (models / "report" / "report.md").read_text()


def test_get_strategy_is_the_default_strategy_without_tf_config(monkeypatch):
    import tensorflow as tf

    monkeypatch.delenv("TF_CONFIG", raising=False)
    strategy = get_strategy()
    assert strategy is tf.distribute.get_strategy()
    assert not tf.distribute.has_strategy()


# --- The exported version ----------------------------------------------------------------------

def test_export_publishes_version_1_with_the_model_artifacts(exported):
    assert exported.name == "1" and exported.parent.name == "mnist"
    assert (exported / "model.onnx").is_file()
    assert (exported / "saved_model.pb").is_file()
    assert (exported / "variables").is_dir() and any((exported / "variables").iterdir())
    assert (exported / "metadata.json").is_file()


def test_export_writes_the_evaluation_report(exported, metadata):
    report = exported / "report"
    for name in ("report.md", "metrics.json", "confusion_matrix.png", "learning_curves.png"):
        assert (report / name).is_file(), name
    for name in ("confusion_matrix.png", "learning_curves.png"):
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (report / "report.md").read_text().startswith("# mnist version 1\n")
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["accuracy"] == metadata["test_metrics"]["accuracy"]
    assert len(metrics["confusion_matrix"]) == 10 and len(metrics["history"]["loss"]) == 1


def test_export_leaves_no_staging_directory_behind(exported):
    assert [p.name for p in exported.parent.iterdir() if p.name.startswith(".")] == []


def test_export_writes_a_triton_config_for_onnxruntime(exported):
    config = (exported.parent / "config.pbtxt").read_text()
    assert 'name: "mnist"' in config
    assert 'backend: "onnxruntime"' in config
    assert "dims: [ 28, 28, 1 ]" in config
    assert "dims: [ 10 ]" in config
    assert 'label_filename: "labels.txt"' in config


def test_export_writes_labels_txt_one_label_per_line(exported):
    assert (exported.parent / "labels.txt").read_text().splitlines() == list(MNIST_LABELS)


def test_metadata_has_every_required_key(metadata):
    assert REQUIRED_METADATA_KEYS <= set(metadata)


def test_metadata_describes_the_model_interface(metadata):
    assert metadata["name"] == "mnist"
    assert metadata["version"] == 1
    assert metadata["labels"] == list(MNIST_LABELS)
    assert metadata["digit"] is True
    assert metadata["input"] == {"name": "image", "datatype": "FP32", "shape": [-1, 28, 28, 1],
                                 "range": [0, 255], "color": "grayscale"}
    assert metadata["output"] == {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}


def test_metadata_records_test_metrics_recipe_data_and_frameworks(metadata):
    metrics = metadata["test_metrics"]
    assert metrics["examples"] == LIMIT
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["loss"] > 0
    assert set(metrics["per_class"]) == set(MNIST_LABELS)
    assert metadata["recipe"]["name"] == "mnist" and metadata["recipe"]["architecture"] == "lenet"
    assert metadata["recipe"]["epochs"] == 1
    assert metadata["data"]["limit"] == LIMIT
    assert metadata["data"]["files"][0]["file"] == "mnist.npz"
    assert {"keras", "tf2onnx", "onnx", "onnxruntime", "numpy"} <= set(metadata["frameworks"])
    assert metadata["parity"]["onnx_max_abs_diff"] <= export.PARITY_TOLERANCE


def test_metadata_created_at_is_a_utc_timestamp(metadata):
    created = dt.datetime.fromisoformat(metadata["created_at"])
    assert created.utcoffset() == dt.timedelta(0)


def test_metadata_sha256_matches_every_artifact(exported, metadata):
    sums = metadata["sha256"]
    assert {"model.onnx", "saved_model.pb"} <= set(sums)
    assert any(name.startswith("variables/") for name in sums)
    for name, digest in sums.items():
        assert hashlib.sha256((exported / name).read_bytes()).hexdigest() == digest, name


def test_onnx_model_has_image_input_and_probabilities_output(exported):
    session = onnx_session(exported / "model.onnx")
    [inp], [out] = session.get_inputs(), session.get_outputs()
    assert inp.name == "image"
    assert not isinstance(inp.shape[0], int)  # a dynamic batch dimension
    assert inp.shape[1:] == [28, 28, 1]
    assert inp.type == "tensor(float)"
    assert out.name == "probabilities"
    assert out.shape[1:] == [10]


def test_onnx_model_agrees_with_the_keras_model(exported, trained, mnist_small):
    images = mnist_small.x_test[:64].astype(np.float32)
    onnx_probs = predict_onnx(onnx_session(exported / "model.onnx"), images)
    keras_probs = np.asarray(trained.model.predict(images, verbose=0))
    np.testing.assert_allclose(onnx_probs, keras_probs, atol=1e-4)
    assert np.array_equal(onnx_probs.argmax(1), keras_probs.argmax(1))
    np.testing.assert_allclose(onnx_probs.sum(1), 1.0, atol=1e-5)


def test_second_export_creates_version_2_and_keeps_version_1(exported, trained, mnist_small, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(exported.parent, models / "mnist")
    target = export_version(trained.model, trained.recipe, mnist_small, models, history=trained.history)
    assert target == models / "mnist" / "2"
    assert json.loads((target / "metadata.json").read_text())["version"] == 2
    assert json.loads((models / "mnist" / "1" / "metadata.json").read_text())["version"] == 1
    assert sorted(p.name for p in (models / "mnist").iterdir() if p.is_dir()) == ["1", "2"]


def test_export_raises_and_publishes_nothing_when_the_artifacts_disagree_with_keras(
        mnist_small, tmp_path, monkeypatch):
    import keras

    recipe = get_recipe("mnist")
    keras.utils.set_random_seed(1)
    model = build_model(recipe)
    keras.utils.set_random_seed(2)
    different = build_model(recipe)  # same architecture, other weights
    real_check = export.check_parity
    monkeypatch.setattr(export, "check_parity",
                        lambda _model, directory, images: real_check(different, directory, images))

    with pytest.raises(ExportError, match=r"export disagrees with the Keras model on 600 test images"):
        export_version(model, recipe, mnist_small, tmp_path / "models")
    assert list((tmp_path / "models" / "mnist").iterdir()) == []  # no version, no staging, no config


# --- The CLI -------------------------------------------------------------------------------------

def test_cli_train_smoke_run_exports_version_1(data_dir, tmp_path):
    models, runs = tmp_path / "models", tmp_path / "runs"
    result = run_cli("train", "--recipe", "mnist", "--epochs", "1", "--max-steps", str(MAX_STEPS),
                     "--limit", str(LIMIT), "--data-dir", data_dir, "--models-dir", models, "--runs-dir", runs)
    assert result.returncode == 0, result.stderr[-3000:]
    version = models / "mnist" / "1"
    metadata = json.loads((version / "metadata.json").read_text())
    assert f"exported {version} (test accuracy {metadata['test_metrics']['accuracy']:.4f} from model.onnx)" \
        in result.stdout
    assert (version / "model.onnx").is_file() and (models / "mnist" / "config.pbtxt").is_file()
    assert metadata["training"]["max_steps"] == MAX_STEPS and metadata["training"]["epochs_run"] == 1
    assert [p.name for p in (runs / "mnist").iterdir()] == [metadata["training"]["run"]]


def test_cli_evaluate_reports_the_accuracy_recorded_in_metadata(exported, metadata, data_dir):
    result = run_cli("evaluate", "--model-dir", exported, "--data-dir", data_dir, "--limit", str(LIMIT))
    assert result.returncode == 0, result.stderr[-3000:]
    match = re.search(r"mnist v1: accuracy (\d\.\d{4}) loss \d+\.\d{4} on (\d+) test images", result.stdout)
    assert match, result.stdout
    assert float(match.group(1)) == pytest.approx(metadata["test_metrics"]["accuracy"], abs=5e-5)
    assert int(match.group(2)) == LIMIT


def assert_one_line_error(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == f"error: {message}"
    assert "Traceback" not in result.stderr


def test_cli_train_reports_a_missing_data_dir_in_one_line_and_exits_2(tmp_path):
    missing = tmp_path / "no-such-dir"
    result = run_cli("train", "--recipe", "mnist", "--data-dir", missing,
                     "--models-dir", tmp_path / "models", "--runs-dir", tmp_path / "runs")
    assert_one_line_error(result, f"data directory {missing} does not exist")
    assert not (tmp_path / "models").exists() and not (tmp_path / "runs").exists()


def test_cli_evaluate_reports_a_missing_data_dir_in_one_line_and_exits_2(exported, tmp_path):
    missing = tmp_path / "no-such-dir"
    result = run_cli("evaluate", "--model-dir", exported, "--data-dir", missing)
    assert_one_line_error(result, f"data directory {missing} does not exist")


def test_cli_evaluate_rejects_a_directory_that_is_not_a_version(tmp_path, capsys):
    assert main(["evaluate", "--model-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"error: {tmp_path} is not a version directory: "
                                       "expected model.onnx and metadata.json\n")


@pytest.mark.parametrize("command", [[], ["train"], ["evaluate"], ["export"]])
def test_cli_help_works_for_every_subcommand(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m training {' '.join(command)}".rstrip())
    assert "--data-dir" in out or not command


def test_cli_rejects_an_unknown_recipe(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--recipe", "svhn"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'svhn'" in capsys.readouterr().err


# --- Resuming ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_epoch_run(mnist_small: Dataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run directory of a finished 1-epoch run, to be copied by each resume test."""
    runs = tmp_path_factory.mktemp("resume-runs")
    return train(get_recipe("mnist"), mnist_small, runs, epochs=1, max_steps=2, verbose=0).run_dir


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "runs" / "mnist" / run_dir.name
    shutil.copytree(run_dir, copy)
    return copy


def test_resume_continues_a_one_epoch_run_at_epoch_2(one_epoch_run, mnist_small, tmp_path):
    run_dir = copy_run(one_epoch_run, tmp_path)
    first_history = json.loads((run_dir / "history.json").read_text())
    result = train(get_recipe("mnist"), mnist_small, tmp_path / "runs", epochs=2, max_steps=2,
                   resume=run_dir, verbose=0)
    assert result.run_dir == run_dir
    assert result.epochs_run == 2
    assert len(result.history["loss"]) == 2
    assert result.history["loss"][0] == first_history["loss"][0]  # epoch 1 was not trained again
    # epoch 1 ran alone (cosine over 1 epoch: the base rate), epoch 2 of 2 is halfway down the cosine
    assert result.history["learning_rate"] == pytest.approx([1e-3, 5e-4])
    assert json.loads((run_dir / "state.json").read_text())["epochs_done"] == 2


def test_resume_of_a_finished_run_trains_nothing(one_epoch_run, mnist_small, tmp_path):
    run_dir = copy_run(one_epoch_run, tmp_path)
    result = train(get_recipe("mnist"), mnist_small, tmp_path / "runs", epochs=1, resume=run_dir, verbose=0)
    assert result.epochs_run == 1
    assert json.loads((run_dir / "history.json").read_text())["loss"] == result.history["loss"]


def test_resume_keeps_the_earlier_best_checkpoint_unless_a_new_epoch_beats_it(one_epoch_run, mnist_small, tmp_path):
    run_dir = copy_run(one_epoch_run, tmp_path)
    history = json.loads((run_dir / "history.json").read_text())
    history["val_accuracy"] = [1.0]  # say epoch 1 was perfect: no later epoch can beat it
    (run_dir / "history.json").write_text(json.dumps(history))
    best_before = (run_dir / "best.keras").read_bytes()
    train(get_recipe("mnist"), mnist_small, tmp_path / "runs", epochs=2, max_steps=2, resume=run_dir, verbose=0)
    assert (run_dir / "best.keras").read_bytes() == best_before
