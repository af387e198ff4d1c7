"""What an export writes to ``models/<name>/``: its own name (``--name``), a minimal config.pbtxt for a new
model, an existing config.pbtxt's user settings kept; and unwritable directories as one error line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from google.protobuf import text_format

from service.model_config import config_version_policy
from service.protos.model_config_pb2 import ModelConfig
from tests.training.conftest import LIMIT
from tests.training.test_train_export import MAX_STEPS, assert_one_line_error, run_cli
from training.cli import build_parser, main
from training.export import ExportError, export_version, triton_config
from training.recipes import get_recipe

USER_CONFIG = """# edited by the operator: pin version 1 while version 2 is investigated
name: "mnist"
platform: "onnxruntime_onnx"
max_batch_size: 16
input {
  name: "old_input"  # a comment with brackets ] } [
  data_type: TYPE_FP32
  dims: [ 1, 2, 3 ]
}
output [ { name: "old_output", data_type: TYPE_FP32, dims: [ 4 ] } ]
version_policy: { specific: { versions: [1, 3] } }
dynamic_batching {
  preferred_batch_size: [ 4, 8 ]
  max_queue_delay_microseconds: 100
}
instance_group [ { count: 2, kind: KIND_CPU } ]
parameters { key: "note" value: { string_value: "keep \\"me\\" {" } }
"""


def test_a_new_config_says_only_what_the_export_must():
    config = triton_config("digits", get_recipe("mnist"))
    assert config.startswith('name: "digits"\nbackend: "onnxruntime"\nmax_batch_size: 64\ninput [\n')
    assert "dims: [ 28, 28, 1 ]" in config and "dims: [ 10 ]" in config
    assert "version_policy" not in config and "dynamic_batching" not in config  # the service's settings apply
    parsed = text_format.Parse(config, ModelConfig())  # as the service and Triton read it
    assert parsed.name == "digits" and parsed.backend == "onnxruntime" and parsed.max_batch_size == 64
    assert not parsed.HasField("version_policy") and not parsed.HasField("dynamic_batching")
    assert [(i.name, list(i.dims)) for i in parsed.input] == [("image", [28, 28, 1])]
    assert [(o.name, list(o.dims), o.label_filename) for o in parsed.output] == [("probabilities", [10], "labels.txt")]


def test_an_existing_config_keeps_every_user_setting_and_gets_new_tensor_specs():
    config = triton_config("mnist", get_recipe("mnist"), USER_CONFIG)
    for kept in ('platform: "onnxruntime_onnx"', "max_batch_size: 16",
                 "version_policy: { specific: { versions: [1, 3] } }", "preferred_batch_size: [ 4, 8 ]",
                 "max_queue_delay_microseconds: 100", "instance_group [ { count: 2, kind: KIND_CPU } ]",
                 'parameters { key: "note" value: { string_value: "keep \\"me\\" {" } }',
                 "# edited by the operator: pin version 1 while version 2 is investigated"):
        assert kept in config, kept
    for gone in ("old_input", "old_output", "dims: [ 1, 2, 3 ]", "dims: [ 4 ]"):
        assert gone not in config, gone
    assert config.count('name: "mnist"') == 1 and config.count("input [") == 1 and config.count("output [") == 1
    assert 'name: "image"' in config and 'name: "probabilities"' in config and "dims: [ 28, 28, 1 ]" in config
    parsed = text_format.Parse(config, ModelConfig())
    assert config_version_policy(parsed) == "specific:1,3"
    assert (parsed.max_batch_size, parsed.dynamic_batching.max_queue_delay_microseconds) == (16, 100)
    assert list(parsed.dynamic_batching.preferred_batch_size) == [4, 8] and parsed.instance_group[0].count == 2
    assert [i.name for i in parsed.input] == ["image"] and [o.name for o in parsed.output] == ["probabilities"]


def test_an_existing_config_that_triton_would_reject_stops_the_export_early(mnist_small, tmp_path):
    import keras

    model_root = tmp_path / "models" / "mnist"
    model_root.mkdir(parents=True)
    (model_root / "config.pbtxt").write_text('name: "mnist"\nmax_batch_sise: 8\n')  # a misspelt field
    with pytest.raises(ExportError, match=r"config.pbtxt cannot be updated, fix or remove it: .*max_batch_sise"):
        export_version(keras.Sequential(), get_recipe("mnist"), mnist_small, tmp_path / "models")
    assert sorted(p.name for p in model_root.iterdir()) == ["config.pbtxt"]


def test_an_existing_config_is_renamed_to_the_model_it_belongs_to():
    config = triton_config("digits", get_recipe("mnist"), USER_CONFIG)
    assert '\nname: "digits"\nplatform' in config and 'name: "mnist"' not in config


@pytest.mark.parametrize("model", ["mnist", "fashion-mnist", "cifar10"])
def test_exporting_a_bundled_model_again_leaves_its_config_as_it_is(model):
    bundled = Path(__file__).resolve().parents[2] / "models" / model / "config.pbtxt"
    if not bundled.is_file():
        pytest.skip(f"the bundled models/{model} is not in this checkout")
    assert triton_config(model, get_recipe(model), bundled.read_text()) == bundled.read_text()


def test_an_export_keeps_the_repository_config_and_an_unreadable_one_stops_it_early(mnist_small, tmp_path):
    import keras

    model_root = tmp_path / "models" / "mnist"
    model_root.mkdir(parents=True)
    (model_root / "config.pbtxt").write_text('name: "mnist"\ninput [ { name: "x" ')
    with pytest.raises(ExportError, match=r"config.pbtxt cannot be updated, fix or remove it: "
                                          r"config.pbtxt has an unclosed bracket"):
        export_version(keras.Sequential(), get_recipe("mnist"), mnist_small, tmp_path / "models")
    assert sorted(p.name for p in model_root.iterdir()) == ["config.pbtxt"]  # nothing staged or published


# --- --name: your own model, not the next version of the recipe's ---------------------------------

def test_training_a_class_folder_tree_under_its_own_name(image_tree, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(Path(__file__).resolve().parents[2] / "models" / "mnist", models / "mnist")
    result = run_cli("train", "--recipe", "mnist", "--name", "shapes", "--data-dir", image_tree.as_dir(),
                     "--epochs", "1", "--max-steps", "1", "--models-dir", models, "--runs-dir", tmp_path / "runs")
    assert result.returncode == 0, result.stderr[-3000:]
    version = models / "shapes" / "1"
    metadata = json.loads((version / "metadata.json").read_text())
    assert metadata["name"] == "shapes" and metadata["labels"] == image_tree.classes
    assert metadata["promotion"]["decision"] == "first version"
    assert (models / "shapes" / "labels.txt").read_text().splitlines() == image_tree.classes
    config = (models / "shapes" / "config.pbtxt").read_text()
    assert config.startswith('name: "shapes"\n') and "dims: [ 3 ]" in config
    assert sorted(p.name for p in (models / "mnist").iterdir() if p.is_dir()) == ["1"]  # mnist untouched
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["mnist"]


@pytest.mark.parametrize("name", ["../evil", ".hidden", "a/b"])
def test_an_invalid_model_name_is_refused_before_any_work(name, tmp_path, capsys):
    assert main(["train", "--recipe", "mnist", "--name", name, "--models-dir", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --name {name!r} is not a valid model name")
    assert not (tmp_path / "m").exists()


# --- Unwritable directories ------------------------------------------------------------------------

@pytest.fixture
def a_file(tmp_path: Path) -> Path:
    """A regular file: nothing can be created under it, whoever runs the tests (root included)."""
    path = tmp_path / "file"
    path.write_text("")
    return path


@pytest.mark.parametrize("which", ["runs", "models"])
def test_train_with_an_unwritable_directory_is_one_error_line_and_exit_2(which, a_file, data_dir, tmp_path):
    dirs = {"runs": tmp_path / "runs", "models": tmp_path / "models", which: a_file / which}
    result = run_cli("train", "--recipe", "mnist", "--epochs", "1", "--max-steps", str(MAX_STEPS), "--limit",
                     str(LIMIT), "--data-dir", data_dir, "--models-dir", dirs["models"], "--runs-dir", dirs["runs"])
    assert_one_line_error(result, f"{which} directory {a_file / which} is not writable: Not a directory")


def test_export_to_an_unwritable_models_directory_is_one_error_line_and_exit_2(a_file, data_dir, tmp_path):
    checkpoint = tmp_path / "last.keras"
    checkpoint.write_bytes(b"not opened: the directory is checked first")
    result = run_cli("export", "--checkpoint", checkpoint, "--recipe", "mnist", "--limit", str(LIMIT),
                     "--data-dir", data_dir, "--models-dir", a_file / "models")
    assert_one_line_error(result, f"models directory {a_file / 'models'} is not writable: Not a directory")


def test_make_train_runs_the_training_cli_for_the_recipe():
    import subprocess

    # --no-print-directory: under `make test` the parent make's flags would add "Leaving directory" lines
    result = subprocess.run(["make", "--no-print-directory", "-n", "train", "RECIPE=cifar10",
                             "TRAIN_ARGS=--name pets --epochs 2"],
                            cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    argv = result.stdout.strip().splitlines()[-1].split()
    assert argv[1:4] == ["-m", "training", "train"]
    args = build_parser().parse_args(argv[3:])
    assert (args.recipe, args.name, args.epochs) == ("cifar10", "pets", 2)
