"""``python -m training``: train, evaluate and export; a thin layer over the library functions."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from training.cluster import DEFAULT_CLUSTER_TIMEOUT, SUPERVISED_ENV, ClusterError, cluster_from_env, run_supervised
from training.promotion import DEFAULT_TOLERANCE_PP, REFUSED_EXIT, Gate
from training.recipes import RECIPES

ERROR_EXIT = 2


class UsageError(Exception):
    """A directory or option the command cannot work with (exit status 2)."""


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


def _add_publish_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models-dir", type=Path, default=_default_dir("CONVSERVE_MODELS_DIR", "models"),
                        help="model repository to write to (default: $CONVSERVE_MODELS_DIR, else models)")
    parser.add_argument("--name", default=None,
                        help="the model's name in the repository (default: the recipe's name); "
                             "give your own when training on your own images")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE_PP, metavar="PP",
                        help="publish only if the candidate's test accuracy is at most PP percentage points "
                             f"below the newest published version's (default {DEFAULT_TOLERANCE_PP:g}); "
                             f"otherwise exit with status {REFUSED_EXIT}")
    parser.add_argument("--force", action="store_true",
                        help="publish even if the promotion gate refuses (recorded in the metadata)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training",
                                     description="Train, evaluate and export convserve models.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a recipe, evaluate it and export the next model version")
    train.add_argument("--recipe", required=True, choices=sorted(RECIPES), help="which model to train")
    train.add_argument("--epochs", type=int, default=None, help="override the recipe's epoch count")
    train.add_argument("--max-steps", type=int, default=None, help="at most N batches per epoch (smoke runs)")
    _add_publish_args(train)
    train.add_argument("--runs-dir", type=Path, default=_default_dir("CONVSERVE_RUNS_DIR", "runs"),
                       help="where TensorBoard logs and checkpoints go (default: $CONVSERVE_RUNS_DIR, else runs)")
    train.add_argument("--resume", type=Path, default=None,
                       help="continue an interrupted run from its directory (runs/<recipe>/<id>)")
    train.add_argument("--cluster-timeout", type=float, default=DEFAULT_CLUSTER_TIMEOUT, metavar="SECONDS",
                       help="with TF_CONFIG: give up when the cluster has not formed after SECONDS "
                            f"(default {DEFAULT_CLUSTER_TIMEOUT:g})")
    _add_data_args(train)

    evaluate = sub.add_parser("evaluate", help="score an exported model.onnx on the test set")
    evaluate.add_argument("--model-dir", type=Path, required=True, help="a version directory, e.g. models/mnist/1")
    _add_data_args(evaluate)

    export = sub.add_parser("export", help="export a saved Keras checkpoint as the next model version")
    export.add_argument("--checkpoint", type=Path, required=True, help="a .keras file (e.g. runs/.../best.keras)")
    export.add_argument("--recipe", required=True, choices=sorted(RECIPES), help="the recipe it was trained with")
    _add_publish_args(export)
    _add_data_args(export)
    return parser


def ensure_writable(path: Path, what: str) -> None:
    """Create ``path`` if needed and check that files can be written in it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise UsageError(f"{what} {path} is not writable: {exc.strerror or exc}") from None


def model_name(args: argparse.Namespace) -> str:
    from service.repository import valid_name  # the service's rule for what it will load

    name = args.name or args.recipe
    if not valid_name(name):
        raise UsageError(f"--name {name!r} is not a valid model name: 1-128 letters, digits, '_', '.' or '-', "
                         "starting with a letter or digit")
    return name


def _gate(args: argparse.Namespace, keep_dir: Path | None = None) -> Gate:
    if args.tolerance < 0:
        raise UsageError(f"--tolerance must be 0 or more percentage points, got {args.tolerance:g}")
    return Gate(tolerance_pp=args.tolerance, force=args.force, keep_dir=keep_dir)


def _published(target: Path) -> None:
    from training.promotion import describe

    metadata = json.loads((target / "metadata.json").read_text())
    print(f"exported {target} (test accuracy {metadata['test_metrics']['accuracy']:.4f} from model.onnx)")
    print(f"promotion gate: {describe(metadata['promotion'])}")


def cmd_train(args: argparse.Namespace) -> int:
    from training.data import load_dataset
    from training.export import export_version
    from training.recipes import get_recipe
    from training.train import train

    cluster = cluster_from_env()
    chief = cluster is None or cluster.is_chief
    name = model_name(args)
    gate = _gate(args)  # the run directory it keeps a refused candidate in is known after training
    recipe = get_recipe(args.recipe)
    ds = load_dataset(recipe.dataset, recipe.input_shape, recipe.labels, args.data_dir).limit(args.limit)
    if chief:  # before hours of training, not after
        ensure_writable(args.resume or args.runs_dir, "runs directory")
        ensure_writable(args.models_dir, "models directory")
    result = train(recipe, ds, args.runs_dir, epochs=args.epochs, max_steps=args.max_steps, resume=args.resume,
                   cluster=cluster)
    try:
        if not result.chief:
            print(f"{cluster.task} finished training; the chief evaluates, exports and publishes")
            return 0
        target = export_version(
            result.model, result.recipe, ds, args.models_dir, history=result.history, name=name,
            gate=replace(gate, keep_dir=result.run_dir),
            training={"epochs_run": result.epochs_run, "wall_seconds": result.wall_seconds,
                      "strategy": result.strategy, "run": result.run_dir.name, "max_steps": args.max_steps,
                      "workers": result.workers, "global_batch_size": result.global_batch_size},
        )
    finally:
        result.done()  # in a cluster: every worker waits here until the chief has published
    _published(target)
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

    name = model_name(args)
    run_dir = args.checkpoint.parent
    gate = _gate(args, run_dir)
    recipe = get_recipe(args.recipe)
    if not args.checkpoint.is_file():
        raise UsageError(f"checkpoint {args.checkpoint} is not a file")
    ds = load_dataset(recipe.dataset, recipe.input_shape, recipe.labels, args.data_dir).limit(args.limit)
    ensure_writable(args.models_dir, "models directory")
    model = keras.saving.load_model(args.checkpoint)  # safe_mode stays on: no arbitrary code
    history_path = run_dir / "history.json"
    history = json.loads(history_path.read_text()) if history_path.exists() else {}
    state_path = run_dir / "state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    if list(ds.labels) != list(recipe.labels):  # a class-folder tree brings its own labels
        recipe = replace(recipe, labels=tuple(ds.labels))
    target = export_version(model, recipe, ds, args.models_dir, history=history, name=name, gate=gate,
                            training={"wall_seconds": state.get("wall_seconds", 0.0), "run": run_dir.name,
                                      "workers": state.get("workers", 1),
                                      "global_batch_size": state.get("global_batch_size", recipe.batch_size)})
    _published(target)
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from training.data import DataError
    from training.export import ExportError
    from training.promotion import PromotionRefused

    commands = {"train": cmd_train, "evaluate": cmd_evaluate, "export": cmd_export}
    try:
        if args.command == "train" and SUPERVISED_ENV not in os.environ and (cluster := cluster_from_env()):
            return run_supervised(sys.argv[1:] if argv is None else argv, cluster, args.cluster_timeout)
        return commands[args.command](args)
    except PromotionRefused as exc:
        print(str(exc), file=sys.stderr)
        return REFUSED_EXIT
    except (DataError, ExportError, ClusterError, UsageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ERROR_EXIT
