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

    from training import refresh as r

    refresh = sub.add_parser(
        "refresh", help="fine-tune the served version on labelled production traffic and publish it as a candidate",
        description="Read a model's labelled predictions with kept inputs from the state store, fine-tune the stable "
                    "version on the recipe's dataset mixed with them, and publish the next version if it is no worse "
                    "on the recipe's test set and better on held-out feedback. Exit status: 0 published, 2 error, "
                    f"{REFUSED_EXIT} refused by a gate, {r.NOT_ENOUGH_EXIT} too few labelled predictions.")
    refresh.add_argument("--model", required=True, help="the model's name in the repository and the state store")
    refresh.add_argument("--models-dir", type=Path, default=_default_dir("CONVSERVE_MODELS_DIR", "models"),
                         help="the server's model repository (default: $CONVSERVE_MODELS_DIR, else models)")
    refresh.add_argument("--state-url", default=os.environ.get("CONVSERVE_STATE_URL"),
                         help="the server's state store (default: $CONVSERVE_STATE_URL)")
    refresh.add_argument("--epochs", type=int, default=r.DEFAULT_EPOCHS,
                         help=f"fine-tuning epochs (default {r.DEFAULT_EPOCHS})")
    refresh.add_argument("--since", default=None, metavar="T",
                         help="only predictions made since T: ISO 8601 time, unix seconds, or an age (30m, 12h, 7d)")
    refresh.add_argument("--min-labelled", type=int, default=r.DEFAULT_MIN_LABELLED, metavar="N",
                         help=f"refuse (exit {r.NOT_ENOUGH_EXIT}) with fewer labelled predictions "
                              f"(default {r.DEFAULT_MIN_LABELLED})")
    refresh.add_argument("--held-out", type=float, default=r.DEFAULT_HELD_OUT, metavar="FRACTION",
                         help=f"share of the feedback held out to judge the candidate (default {r.DEFAULT_HELD_OUT:g})")
    refresh.add_argument("--min-gain", type=float, default=r.DEFAULT_MIN_GAIN_PP, metavar="PP",
                         help="publish only if the candidate beats the stable version on the held-out feedback by PP "
                              f"percentage points (default {r.DEFAULT_MIN_GAIN_PP:g})")
    refresh.add_argument("--feedback-share", type=float, default=r.DEFAULT_FEEDBACK_SHARE, metavar="FRACTION",
                         help="share of each epoch the feedback examples make up, repeated "
                              f"(default {r.DEFAULT_FEEDBACK_SHARE:g})")
    refresh.add_argument("--learning-rate", type=float, default=None,
                         help=f"peak rate of the cosine (default: {r.FINE_TUNE_RATE:g} x the recipe's)")
    refresh.add_argument("--seed", type=int, default=1234, help="the split's and the training's seed (default 1234)")
    refresh.add_argument("--runs-dir", type=Path, default=_default_dir("CONVSERVE_RUNS_DIR", "runs"),
                         help="where the fine-tune's logs go (default: $CONVSERVE_RUNS_DIR, else runs)")
    refresh.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE_PP, metavar="PP",
                         help="on the recipe's test set, publish only if at most PP points below the stable version "
                              f"(default {DEFAULT_TOLERANCE_PP:g})")
    refresh.add_argument("--force", action="store_true", help="publish even if a gate refuses (recorded)")
    _add_data_args(refresh)
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


def cmd_refresh(args: argparse.Namespace) -> int:
    from training.refresh import Options, refresh

    if not args.state_url:
        raise UsageError("--state-url (or CONVSERVE_STATE_URL) is needed: the server's state store")
    for flag, value, low, high in (("--held-out", args.held_out, 0.0, 0.9), ("--feedback-share", args.feedback_share,
                                                                              0.01, 0.9)):
        if not low <= value <= high:
            raise UsageError(f"{flag} must be between {low:g} and {high:g}, got {value:g}")
    if args.epochs < 1 or args.min_labelled < 1:
        raise UsageError("--epochs and --min-labelled must be 1 or more")
    from service.repository import valid_name

    if not valid_name(args.model):
        raise UsageError(f"--model {args.model!r} is not a valid model name")
    ensure_writable(args.models_dir, "models directory")
    ensure_writable(args.runs_dir, "runs directory")
    target = refresh(Options(
        model=args.model, models_dir=args.models_dir, state_url=args.state_url, data_dir=args.data_dir,
        runs_dir=args.runs_dir, epochs=args.epochs, since=args.since, min_labelled=args.min_labelled,
        held_out=args.held_out, min_gain_pp=args.min_gain, feedback_share=args.feedback_share,
        learning_rate=args.learning_rate, seed=args.seed, limit=args.limit, gate=_gate(args)))
    _published(target)
    held = json.loads((target / "metadata.json").read_text())["feedback"]["held_out"]
    print(f"held-out feedback ({held['examples']} examples): v{target.name} {held['candidate_accuracy']:.2%}, "
          f"the stable version {held['stable_accuracy']:.2%}; a running server now rolls it out")
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from training.data import DataError
    from training.export import ExportError
    from training.promotion import PromotionRefused
    from training.refresh import NOT_ENOUGH_EXIT, NotEnoughFeedback, RefreshError

    commands = {"train": cmd_train, "evaluate": cmd_evaluate, "export": cmd_export, "refresh": cmd_refresh}
    try:
        if args.command == "train" and SUPERVISED_ENV not in os.environ and (cluster := cluster_from_env()):
            return run_supervised(sys.argv[1:] if argv is None else argv, cluster, args.cluster_timeout)
        return commands[args.command](args)
    except PromotionRefused as exc:
        print(str(exc), file=sys.stderr)
        return REFUSED_EXIT
    except NotEnoughFeedback as exc:
        print(str(exc), file=sys.stderr)
        return NOT_ENOUGH_EXIT
    except (DataError, ExportError, ClusterError, UsageError, RefreshError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ERROR_EXIT
