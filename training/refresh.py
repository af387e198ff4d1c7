"""``python -m training refresh``: retrain a served model on its labelled production traffic (the closed loop).

The server logs every prediction, and for a fraction of requests (``CONVSERVE_KEEP_INPUTS``) the model input as
the model saw it, after decoding and preprocessing; clients label predictions (``POST /v2/models/{name}/feedback``).
A refresh:

1. reads the labelled predictions with kept inputs of one model from the state store (no preprocessing is
   re-guessed: the rows are the model's inputs), and refuses when fewer than ``min_labelled`` exist;
2. splits them, stratified by true label and seeded, into a training part and a held-out part;
3. rebuilds the stable version's Keras model from its SavedModel variables (checked against its ``model.onnx``);
4. fine-tunes it on the recipe's training set mixed with the feedback training part (repeated to make up
   ``feedback_share`` of each epoch), at a tenth of the recipe's peak rate on a cosine, the recipe's augmentation;
5. exports the candidate through two gates, both on exported files: no worse than the stable version on the
   recipe's test set (the usual gate, ``training.promotion``) and better than it on the held-out feedback by
   ``min_gain_pp`` points;
6. publishes the next version atomically, with the feedback it used in ``metadata.json`` (``feedback``) and its
   report, so that a running server starts a rollout of it (``service.rollout``).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import re
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from training.data import Dataset
from training.evaluate import onnx_session, predict_onnx
from training.promotion import Check, Gate, published_versions
from training.recipes import Recipe

log = logging.getLogger(__name__)

NOT_ENOUGH_EXIT = 4
"""``python -m training refresh``'s exit status when too few labelled predictions exist (nothing was trained)."""
DEFAULT_MIN_LABELLED = 200
DEFAULT_HELD_OUT = 0.3
DEFAULT_MIN_GAIN_PP = 1.0
DEFAULT_EPOCHS = 3
DEFAULT_FEEDBACK_SHARE = 0.3
FINE_TUNE_RATE = 0.1
"""The fine-tune's peak learning rate, as a fraction of the recipe's."""
REBUILD_TOLERANCE = 1e-4
REBUILD_IMAGES = 256


class RefreshError(Exception):
    """The refresh cannot run as asked (exit status 2): no such model or store, weights that do not rebuild."""


class NotEnoughFeedback(Exception):
    """Fewer labelled predictions with kept inputs than asked for (exit status 4); nothing was trained."""


@dataclass(frozen=True)
class Feedback:
    """Labelled predictions with kept inputs, as arrays the training pipeline takes."""

    x: np.ndarray  # [N, H, W, C], uint8 (decoded images) or float32 (tensors clients sent)
    y: np.ndarray  # the clients' labels
    predicted: np.ndarray  # what the server answered
    ids: list[str]  # "<request id>/<index>": the prediction ids
    created_at: np.ndarray  # unix seconds of each prediction
    versions: Counter[str]  # how many each version answered
    skipped: int  # kept inputs of another shape, or labels out of range


def parse_since(text: str | None, now: float | None = None) -> float | None:
    """``--since``: an ISO 8601 time (UTC unless it says), unix seconds, or an age such as ``30m``, ``12h``, ``7d``."""
    if text is None:
        return None
    now = time.time() if now is None else now
    age = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text.strip())
    if age:
        return now - float(age.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[age.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise RefreshError(f"--since {text!r} is not an ISO 8601 time, unix seconds or an age like 7d") from None
    return (when if when.tzinfo else when.replace(tzinfo=dt.UTC)).timestamp()


def iso(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat(timespec="seconds")


def read_feedback(store: Any, model: str, shape: tuple[int, int, int], classes: int,
                  since: float | None) -> Feedback:
    """The model's labelled predictions with kept inputs of the model's input shape, oldest first."""
    wanted = ",".join(str(d) for d in shape)
    rows, labels, predicted, ids, created, versions, skipped = [], [], [], [], [], Counter(), 0
    floats = False
    for e in store.labelled_examples(model, since=since):
        if e.input_shape != wanted or not 0 <= e.label < classes or e.input_dtype not in ("uint8", "float32"):
            skipped += 1
            continue
        row = np.frombuffer(e.input, dtype=np.uint8 if e.input_dtype == "uint8" else np.float32)
        if row.size != math.prod(shape):
            skipped += 1
            continue
        floats |= e.input_dtype == "float32"
        rows.append(row.reshape(shape))
        labels.append(e.label)
        predicted.append(e.predicted)
        ids.append(f"{e.request_id}/{e.idx}")
        created.append(e.created_at)
        versions[e.version] += 1
    dtype = np.float32 if floats else np.uint8
    x = np.stack(rows).astype(dtype) if rows else np.zeros((0, *shape), dtype)
    return Feedback(x, np.asarray(labels, np.int64), np.asarray(predicted, np.int64), ids,
                    np.asarray(created, np.float64), versions, skipped)


def stratified_split(y: np.ndarray, held_out: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training part and the held-out part: each class split in the same proportion (a class
    with one example trains), shuffled with ``seed``."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        n_out = int(round(len(members) * held_out)) if len(members) > 1 else 0
        n_out = min(max(n_out, 1 if len(members) > 1 and held_out > 0 else 0), len(members) - 1)
        test.extend(members[:n_out])
        train.extend(members[n_out:])
    return np.sort(np.asarray(train, np.int64)), np.sort(np.asarray(test, np.int64))


def stable_version(store: Any, model: str, model_root: Path) -> tuple[int, str]:
    """The version a refresh starts from and is judged against: the state store's stable version of the model,
    else (no rollout has run against this store) the newest published version not rolled back."""
    rows, blocked = store.rollout_state()
    row = rows.get(model)
    published = published_versions(model_root)
    if row and row.get("stable") is not None:
        version = int(row["stable"])
        if version not in published:
            raise RefreshError(f"the state store says {model} v{version} serves, but {model_root}/{version} "
                               "does not exist: is --models-dir the server's repository?")
        return version, "the state store's stable version"
    candidates = [v for v in published if v not in blocked.get(model, set())]
    if not candidates:
        raise RefreshError(f"{model_root} has no published version to refresh")
    return candidates[-1], "the newest published version (the state store has no rollout of it)"


def rebuild(version_dir: Path, recipe: Recipe, images: np.ndarray) -> Any:
    """The Keras model of a published version: the recipe's architecture with the weights of the version's SavedModel
    (``variables/``, saved with the model as the SavedModel's ``model``), checked against its ``model.onnx``."""
    import tensorflow as tf

    from training.recipes import build_model

    model = build_model(recipe)
    status = tf.train.Checkpoint(model=model).read(str(version_dir / "variables" / "variables"))
    try:
        status.assert_existing_objects_matched()
    except AssertionError as exc:
        raise RefreshError(f"{version_dir}'s SavedModel variables do not fit the {recipe.architecture} "
                           f"architecture: {str(exc).splitlines()[0]}") from None
    status.expect_partial()  # the SavedModel also holds the optimizer's state, which a fine-tune starts afresh
    x = images[:REBUILD_IMAGES].astype(np.float32)
    diff = float(np.abs(np.asarray(model.predict(x, batch_size=128, verbose=0))
                        - predict_onnx(onnx_session(version_dir / "model.onnx"), x)).max())
    if diff > REBUILD_TOLERANCE:
        raise RefreshError(f"the weights rebuilt from {version_dir}/variables disagree with its model.onnx "
                           f"(max abs diff {diff:.2e} on {len(x)} test images)")
    return model


def mix(ds: Dataset, x: np.ndarray, y: np.ndarray, share: float) -> tuple[Dataset, int]:
    """The recipe's dataset with the feedback examples added to its training set, each repeated so that they make
    up ``share`` of an epoch (at least once); returns the dataset and the number of repeats."""
    n = len(ds.x_train)
    repeats = max(1, round(share / (1 - share) * n / len(x))) if len(x) else 0
    dtype = np.float32 if np.float32 in (ds.x_train.dtype, x.dtype) else np.uint8
    x_train = np.concatenate([ds.x_train.astype(dtype), np.repeat(x.astype(dtype), repeats, axis=0)])
    y_train = np.concatenate([ds.y_train, np.repeat(y, repeats)])
    return Dataset(x_train, y_train, ds.x_test, ds.y_test, ds.labels, ds.provenance), repeats


def per_class(y: np.ndarray, labels: list[str]) -> dict[str, int]:
    counts = np.bincount(y, minlength=len(labels)) if len(y) else np.zeros(len(labels), np.int64)
    return {label: int(c) for label, c in zip(labels, counts) if c}


@dataclass(frozen=True)
class Options:
    model: str
    models_dir: Path
    state_url: str
    data_dir: Path | None = None
    runs_dir: Path = Path("runs")
    epochs: int = DEFAULT_EPOCHS
    since: str | None = None
    min_labelled: int = DEFAULT_MIN_LABELLED
    held_out: float = DEFAULT_HELD_OUT
    min_gain_pp: float = DEFAULT_MIN_GAIN_PP
    feedback_share: float = DEFAULT_FEEDBACK_SHARE
    learning_rate: float | None = None
    seed: int = 1234
    limit: int | None = None
    gate: Gate = Gate()


def refresh(o: Options) -> Path:
    """Run the loop once (see the module docstring); returns the published version's directory.

    Raises :class:`NotEnoughFeedback` before any training, :class:`training.promotion.PromotionRefused` when a
    gate refuses the candidate (nothing published), :class:`RefreshError` on a setup the refresh cannot use.
    """
    from service.state.store import StateStore, StateStoreError, engine_url, redacted
    from training.data import load_dataset
    from training.evaluate import evaluate_onnx
    from training.export import export_version
    from training.train import train

    model_root = o.models_dir / o.model
    if not published_versions(model_root):
        raise RefreshError(f"{model_root} has no published version: nothing to refresh")
    since = parse_since(o.since)
    url = engine_url(o.state_url)
    if url.get_backend_name() == "sqlite" and url.database and not Path(url.database).is_file():
        raise RefreshError(f"the state store {redacted(o.state_url)} does not exist: give the server's "
                           "CONVSERVE_STATE_URL")
    store = StateStore(o.state_url)
    try:
        try:
            if store.schema_version() is None:
                raise RefreshError(f"the state store {redacted(o.state_url)} is empty: no server has written to it "
                                   "(give the server's CONVSERVE_STATE_URL)")
            store.open()
        except StateStoreError as exc:
            raise RefreshError(str(exc)) from None
        except Exception as exc:  # the driver's own errors: no such file, host or database
            raise RefreshError(f"cannot read the state store {redacted(o.state_url)}: {type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
        base, base_from = stable_version(store, o.model, model_root)
        base_dir = model_root / str(base)
        metadata = json.loads((base_dir / "metadata.json").read_text())
        recipe = Recipe.from_dict(metadata["recipe"])
        labels = list(metadata["labels"])
        shape = tuple(metadata["input"]["shape"][1:])
        feedback = read_feedback(store, o.model, shape, len(labels), since)
    finally:
        store.close()

    found = len(feedback.y)
    window = f" since {iso(since)}" if since is not None else ""
    if found < o.min_labelled:
        raise NotEnoughFeedback(
            f"{o.model}: {found} labelled predictions with kept inputs{window} in {redacted(o.state_url)}, "
            f"fewer than --min-labelled {o.min_labelled}; nothing was trained (the server keeps inputs for "
            "CONVSERVE_KEEP_INPUTS of its requests, and clients label them with POST /v2/models/{name}/feedback)")
    train_idx, held_idx = stratified_split(feedback.y, o.held_out, o.seed)
    log.info("%s: %d labelled predictions%s: %d to train on, %d held out; starting from v%d (%s)",
             o.model, found, window, len(train_idx), len(held_idx), base, base_from)

    ds = load_dataset(recipe.dataset, recipe.input_shape, labels, o.data_dir).limit(o.limit)
    model = rebuild(base_dir, recipe, ds.x_test)
    mixed, repeats = mix(ds, feedback.x[train_idx], feedback.y[train_idx], o.feedback_share)
    rate = o.learning_rate if o.learning_rate is not None else recipe.learning_rate * FINE_TUNE_RATE
    tune = replace(recipe, epochs=o.epochs, learning_rate=rate, warmup_epochs=0, restarts=(), schedule="cosine",
                   validation_size=0, early_stopping_patience=0, ema_momentum=0.0, seed=o.seed)
    result = train(tune, mixed, o.runs_dir / "refresh", initial_model=model)

    held_x, held_y = feedback.x[held_idx].astype(np.float32), feedback.y[held_idx]
    stable_held = evaluate_onnx(base_dir / "model.onnx", held_x, held_y, labels)["accuracy"] if len(held_y) else None
    record: dict[str, Any] = {
        "state_store": redacted(o.state_url),
        "base_version": base,
        "base": base_from,
        "since": iso(since) if since is not None else None,
        "labelled": found,
        "skipped": feedback.skipped,
        "first_prediction_at": iso(float(feedback.created_at.min())),
        "last_prediction_at": iso(float(feedback.created_at.max())),
        "answered_by": dict(sorted(feedback.versions.items())),
        "split": {"seed": o.seed, "held_out_fraction": o.held_out, "stratified_by": "true label",
                  "train_per_class": per_class(feedback.y[train_idx], labels),
                  "held_out_per_class": per_class(held_y, labels), "ids": "report/feedback_split.json"},
        "mix": {"recipe_examples": len(ds.x_train), "feedback_examples": len(train_idx), "repeats": repeats,
                "feedback_share": round(len(train_idx) * repeats / len(mixed.x_train), 4)},
        "schedule": {"epochs": o.epochs, "peak_learning_rate": rate, "shape": "cosine to zero, no warm-up",
                     "augmentation": "the recipe's", "from": f"v{base}'s weights"},
        "held_out": {"examples": int(len(held_y)), "stable_accuracy": stable_held, "candidate_accuracy": None,
                     "gain_pp": None, "min_gain_pp": o.min_gain_pp},
    }

    def held_out_gate(staging: Path) -> Check:
        (staging / "report").mkdir(exist_ok=True)
        (staging / "report" / "feedback_split.json").write_text(json.dumps(
            {"train": [feedback.ids[i] for i in train_idx], "held_out": [feedback.ids[i] for i in held_idx]}))
        held = record["held_out"]
        if not len(held_y):
            return Check("feedback", record, "no held-out feedback to judge the candidate on (raise --held-out)")
        candidate = evaluate_onnx(staging / "model.onnx", held_x, held_y, labels)["accuracy"]
        gain = (candidate - stable_held) * 100
        held.update(candidate_accuracy=candidate, gain_pp=round(gain, 4))
        if gain + 1e-9 >= o.min_gain_pp:
            return Check("feedback", record)
        return Check("feedback", record,
                     f"on the {len(held_y)} held-out feedback examples the candidate scores {candidate:.2%} against "
                     f"v{base}'s {stable_held:.2%}: {gain:+.2f} pp, short of --min-gain {o.min_gain_pp:g} pp")

    return export_version(
        result.model, replace(recipe, labels=tuple(labels)), ds, o.models_dir, history=result.history, name=o.model,
        gate=replace(o.gate, incumbent=base, keep_dir=result.run_dir), check=held_out_gate,
        training={"epochs_run": result.epochs_run, "wall_seconds": result.wall_seconds, "strategy": result.strategy,
                  "run": result.run_dir.name, "refresh_of": base})
