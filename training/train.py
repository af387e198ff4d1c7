"""Training: the tf.data pipeline (with augmentation), the distribution strategy, and the fit loop.

A run lives in ``runs/<recipe>/<run-id>/``: TensorBoard logs, ``last.keras`` (resumable,
written every epoch), ``best.keras`` (best validation accuracy) and ``history.json``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from training.data import Dataset
from training.recipes import Recipe, build_model

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    model: Any
    history: dict[str, list[float]]
    run_dir: Path
    epochs_run: int
    wall_seconds: float
    strategy: str
    recipe: Recipe


def get_strategy() -> Any:
    """MultiWorkerMirrored when TF_CONFIG names a cluster, Mirrored over several GPUs, else default."""
    import tensorflow as tf

    tf_config = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}")
    if tf_config.get("cluster"):
        return tf.distribute.MultiWorkerMirroredStrategy()
    if len(tf.config.list_physical_devices("GPU")) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


Split = tuple[np.ndarray, np.ndarray]


def split_validation(ds: Dataset, size: int, seed: int) -> tuple[Split, Split | None]:
    """Carve a validation split out of the training set (the test set stays untouched).

    ``size`` 0 keeps the whole training set for training and returns no validation split.
    """
    if size <= 0:
        return (ds.x_train, ds.y_train), None
    order = np.random.default_rng(seed).permutation(len(ds.x_train))
    size = min(size, len(order) // 5)
    val, train = order[:size], order[size:]
    return (ds.x_train[train], ds.y_train[train]), (ds.x_train[val], ds.y_train[val])


def augment_fn(recipe: Recipe) -> Any:
    """A per-example tf function applying the recipe's augmentation to uint8 images."""
    import tensorflow as tf

    aug = recipe.augmentation
    height, width, _ = recipe.input_shape
    rotate = None
    if aug.rotation_degrees:
        import keras

        rotate = keras.layers.RandomRotation(aug.rotation_degrees / 360.0, fill_mode="constant", seed=recipe.seed)

    def apply(image: Any, label: Any) -> tuple[Any, Any]:
        image = tf.cast(image, tf.float32)
        if aug.pad_crop:
            p = aug.pad_crop
            image = tf.pad(image, [[p, p], [p, p], [0, 0]])
            image = tf.image.random_crop(image, (height, width, recipe.input_shape[2]))
        if aug.horizontal_flip:
            image = tf.image.random_flip_left_right(image)
        if rotate is not None:
            image = rotate(image, training=True)
        if aug.cutout:
            image = _cutout(image, aug.cutout)
        return image, label

    return apply


def _cutout(image: Any, size: int) -> Any:
    """Zero the pixels within size // 2 of a random centre (clipped at the border)."""
    import tensorflow as tf

    height, width = tf.shape(image)[0], tf.shape(image)[1]
    cy = tf.random.uniform([], 0, height, dtype=tf.int32)
    cx = tf.random.uniform([], 0, width, dtype=tf.int32)
    rows = tf.range(height)[:, None]
    cols = tf.range(width)[None, :]
    inside = (tf.abs(rows - cy) <= size // 2) & (tf.abs(cols - cx) <= size // 2)
    return image * tf.cast(~inside, image.dtype)[..., None]


def make_datasets(recipe: Recipe, train: Split, val: Split | None,
                  max_steps: int | None = None) -> tuple[Any, Any]:
    """The shuffled, augmented training dataset and the validation dataset (None without one)."""
    import tensorflow as tf

    n_classes = len(recipe.labels)

    def one_hot(image: Any, label: Any) -> tuple[Any, Any]:
        return tf.cast(image, tf.float32), tf.one_hot(label, n_classes)

    train_ds = (
        tf.data.Dataset.from_tensor_slices(train)
        .shuffle(len(train[0]), seed=recipe.seed, reshuffle_each_iteration=True)
        .map(augment_fn(recipe), num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
        .map(lambda x, y: (x, tf.one_hot(y, n_classes)))
        .batch(recipe.batch_size, drop_remainder=False)
    )
    if max_steps:
        train_ds = train_ds.take(max_steps)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    train_ds = train_ds.prefetch(tf.data.AUTOTUNE).with_options(options)
    if val is None:
        return train_ds, None
    val_ds = tf.data.Dataset.from_tensor_slices(val).map(one_hot).batch(256)
    return train_ds, val_ds.prefetch(2).with_options(options)


def learning_rate_at(recipe: Recipe, epoch: int) -> float:
    """Linear warm-up, then cosine decay to zero (or constant), evaluated per epoch.

    With ``recipe.restarts`` the cosine restarts at each listed epoch (a warm restart),
    peaking at ``restart_decay`` times the previous peak and decaying to zero by the next
    restart or the last epoch.
    """
    base = recipe.learning_rate
    if epoch < recipe.warmup_epochs:
        return base * (epoch + 1) / (recipe.warmup_epochs + 1)
    if recipe.schedule == "constant":
        return base
    start, end = recipe.warmup_epochs, recipe.epochs
    for restart in sorted(recipe.restarts):
        if restart > epoch:
            end = restart
            break
        if restart > start:
            start, base = restart, base * recipe.restart_decay
    span = max(1, end - start)
    progress = (epoch - start) / span
    return 0.5 * base * (1 + math.cos(math.pi * progress))


def make_optimizer(recipe: Recipe) -> Any:
    import keras

    ema = {"use_ema": True, "ema_momentum": recipe.ema_momentum} if recipe.ema_momentum else {}
    if recipe.optimizer == "sgd":
        return keras.optimizers.SGD(recipe.learning_rate, momentum=0.9, nesterov=True,
                                    weight_decay=recipe.weight_decay or None, **ema)
    if recipe.optimizer == "adam":
        if recipe.weight_decay:
            return keras.optimizers.AdamW(recipe.learning_rate, weight_decay=recipe.weight_decay, **ema)
        return keras.optimizers.Adam(recipe.learning_rate, **ema)
    raise ValueError(f"unknown optimizer {recipe.optimizer!r}")


def train(recipe: Recipe, ds: Dataset, runs_dir: Path, *, epochs: int | None = None,
          max_steps: int | None = None, resume: Path | None = None, verbose: int = 2) -> TrainResult:
    """Train a recipe on a dataset; returns the best-on-validation model.

    A recipe with ``validation_size`` 0 trains on the whole training set and returns the
    weights of the last epoch (the schedule, not a validation score, decides when to stop).

    ``resume`` is an earlier run directory: training continues from its ``last.keras`` at
    the epoch after the last completed one.
    """
    import keras

    keras.utils.set_random_seed(recipe.seed)
    if epochs is not None:
        recipe = replace(recipe, epochs=epochs)
    if list(ds.labels) != list(recipe.labels):
        recipe = replace(recipe, labels=tuple(ds.labels))

    run_dir = resume or runs_dir / recipe.name / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    state_path = run_dir / "state.json"
    history_path = run_dir / "history.json"
    history: dict[str, list[float]] = {}
    initial_epoch = 0
    previous_wall = 0.0

    strategy = get_strategy()
    with strategy.scope():
        if resume and (run_dir / "last.keras").exists():
            model = keras.saving.load_model(run_dir / "last.keras")  # safe_mode stays on
            state = json.loads(state_path.read_text())
            initial_epoch, previous_wall = state["epochs_done"], state.get("wall_seconds", 0.0)
            history = json.loads(history_path.read_text()) if history_path.exists() else {}
            log.info("resuming %s at epoch %d", run_dir.name, initial_epoch + 1)
        else:
            model = build_model(recipe)
            model.compile(
                optimizer=make_optimizer(recipe),
                loss=keras.losses.CategoricalCrossentropy(label_smoothing=recipe.label_smoothing),
                metrics=["accuracy"],
            )

    train_xy, val_xy = split_validation(ds, recipe.validation_size, recipe.seed)
    train_ds, val_ds = make_datasets(recipe, train_xy, val_xy, max_steps)

    class Persist(keras.callbacks.Callback):
        """Writes history.json, last.keras and state.json every epoch, so a killed run resumes."""

        def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            for key, value in (logs or {}).items():
                history.setdefault(key, []).append(float(value))
            history_path.write_text(json.dumps(history))
            self.model.save(run_dir / "last.keras")
            state_path.write_text(json.dumps({
                "recipe": recipe.name, "epochs_done": epoch + 1, "epochs": recipe.epochs,
                "wall_seconds": previous_wall + time.monotonic() - started,
            }))

    started = time.monotonic()
    callbacks: list[Any] = [
        keras.callbacks.LearningRateScheduler(lambda epoch: learning_rate_at(recipe, epoch)),
        keras.callbacks.TensorBoard(log_dir=str(run_dir / "tensorboard"), write_graph=False),
        Persist(),
    ]
    if val_ds is not None:
        # on resume, only an epoch beating the best so far may replace best.keras
        best_so_far = max(history["val_accuracy"]) if history.get("val_accuracy") else None
        callbacks.insert(1, keras.callbacks.ModelCheckpoint(
            run_dir / "best.keras", monitor="val_accuracy", save_best_only=True, mode="max",
            initial_value_threshold=best_so_far))
    if recipe.ema_momentum:
        # Validation, checkpoints and the saved model all use the averaged weights.
        callbacks.insert(1, keras.callbacks.SwapEMAWeights(swap_on_epoch=True))
    if recipe.early_stopping_patience:
        callbacks.append(keras.callbacks.EarlyStopping(monitor="val_accuracy", mode="max",
                                                       patience=recipe.early_stopping_patience))

    if initial_epoch < recipe.epochs:
        model.fit(train_ds, validation_data=val_ds, epochs=recipe.epochs, initial_epoch=initial_epoch,
                  callbacks=callbacks, verbose=verbose)
    wall = previous_wall + time.monotonic() - started

    best_path = run_dir / "best.keras"
    if val_ds is None:
        model = keras.saving.load_model(run_dir / "last.keras")  # the EMA weights when averaging
    elif best_path.exists():
        model = keras.saving.load_model(best_path)
    return TrainResult(model=model, history=history, run_dir=run_dir,
                       epochs_run=len(history.get("loss", [])), wall_seconds=wall,
                       strategy=type(strategy).__name__, recipe=recipe)
