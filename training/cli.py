"""``python -m training``: train, evaluate and export; a thin layer over the library functions."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from training.recipes import RECIPES


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="local dataset files, or a class-folder tree (dir, .zip, .tar[.gz|.xz]); "
                             "default: download through keras.datasets")
    parser.add_argument("--limit", type=int, default=None,
                        help="use at most N train and N test images (smoke runs)")


def _default_dir(env: str, fallback: str) -> Path:
    """A directory flag's default: the environment's (the train image sets /models and /runs, which its user can
    write; the working directory there is not writable), else a path relative to the working directory."""
    return Path(os.environ.get(env) or fallback)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training",
                                     description="Train, evaluate and export convserve models.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a recipe, evaluate it and export the next model version")
    train.add_argument("--recipe", required=True, choices=sorted(RECIPES), help="which model to train")
    train.add_argument("--epochs", type=int, default=None, help="override the recipe's epoch count")
    train.add_argument("--max-steps", type=int, default=None, help="at most N batches per epoch (smoke runs)")
    train.add_argument("--models-dir", type=Path, default=_default_dir("CONVSERVE_MODELS_DIR", "models"),
                       help="model repository to write to (default: $CONVSERVE_MODELS_DIR, else models)")
    train.add_argument("--runs-dir", type=Path, default=_default_dir("CONVSERVE_RUNS_DIR", "runs"),
                       help="where TensorBoard logs and checkpoints go (default: $CONVSERVE_RUNS_DIR, else runs)")
    train.add_argument("--resume", type=Path, default=None,
                       help="continue an interrupted run from its directory (runs/<recipe>/<id>)")
    _add_data_args(train)

    evaluate = sub.add_parser("evaluate", help="score an exported model.onnx on the test set")
    evaluate.add_argument("--model-dir", type=Path, required=True, help="a version directory, e.g. models/mnist/1")
    _add_data_args(evaluate)

    export = sub.add_parser("export", help="export a saved Keras checkpoint as the next model version")
    export.add_argument("--checkpoint", type=Path, required=True, help="a .keras file (e.g. runs/.../best.keras)")
    export.add_argument("--recipe", required=True, choices=sorted(RECIPES), help="the recipe it was trained with")
    export.add_argument("--models-dir", type=Path, default=_default_dir("CONVSERVE_MODELS_DIR", "models"),
                        help="model repository to write to (default: $CONVSERVE_MODELS_DIR, else models)")
    _add_data_args(export)
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from training.data import load_dataset
    from training.export import export_version
    from training.recipes import get_recipe
    from training.train import train

    recipe = get_recipe(args.recipe)
    ds = load_dataset(recipe.dataset, recipe.input_shape, recipe.labels, args.data_dir).limit(args.limit)
    result = train(recipe, ds, args.runs_dir, epochs=args.epochs, max_steps=args.max_steps, resume=args.resume)
    target = export_version(
        result.model, result.recipe, ds, args.models_dir, history=result.history,
        training={"epochs_run": result.epochs_run, "wall_seconds": result.wall_seconds,
                  "strategy": result.strategy, "run": result.run_dir.name, "max_steps": args.max_steps},
    )
    accuracy = json.loads((target / "metadata.json").read_text())["test_metrics"]["accuracy"]
    print(f"exported {target} (test accuracy {accuracy:.4f} from model.onnx)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from training.data import DataError, load_dataset
    from training.evaluate import evaluate_onnx

    metadata_path = args.model_dir / "metadata.json"
    onnx_path = args.model_dir / "model.onnx"
    if not metadata_path.is_file() or not onnx_path.is_file():
        raise DataError(f"{args.model_dir} is not a version directory: expected model.onnx and metadata.json")
    metadata = json.loads(metadata_path.read_text())
    recipe = metadata["recipe"]
    shape = tuple(metadata["input"]["shape"][1:])
    ds = load_dataset(recipe["dataset"], shape, metadata["labels"], args.data_dir).limit(args.limit)
    metrics = evaluate_onnx(onnx_path, ds.x_test, ds.y_test, metadata["labels"])
    reported = metadata["test_metrics"]["accuracy"]
    print(f"{metadata['name']} v{metadata['version']}: accuracy {metrics['accuracy']:.4f} "
          f"loss {metrics['loss']:.4f} on {metrics['examples']} test images (metadata says {reported:.4f})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import keras

    from training.data import load_dataset
    from training.export import export_version
    from training.recipes import get_recipe

    recipe = get_recipe(args.recipe)
    ds = load_dataset(recipe.dataset, recipe.input_shape, recipe.labels, args.data_dir).limit(args.limit)
    model = keras.saving.load_model(args.checkpoint)  # safe_mode stays on: no arbitrary code
    history_path = args.checkpoint.parent / "history.json"
    history = json.loads(history_path.read_text()) if history_path.exists() else {}
    state_path = args.checkpoint.parent / "state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    target = export_version(model, recipe, ds, args.models_dir, history=history,
                            training={"wall_seconds": state.get("wall_seconds", 0.0),
                                      "run": args.checkpoint.parent.name})
    print(f"exported {target}")
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from training.data import DataError
    from training.export import ExportError

    commands = {"train": cmd_train, "evaluate": cmd_evaluate, "export": cmd_export}
    try:
        return commands[args.command](args)
    except (DataError, ExportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
