"""Training: the tf.data pipeline (with augmentation), the distribution strategy, and the fit loop.

A run lives in ``runs/<recipe>/<run-id>/``: TensorBoard logs, ``last.keras`` (resumable,
written every epoch), ``best.keras`` (best validation accuracy) and ``history.json``. In a
multi-worker cluster only the chief writes there; the other workers write to temporary
directories (see ``training.cluster``).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from training.cluster import Cluster, barrier, get_strategy
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
    workers: int = 1
    """Workers in the cluster that trained the model (1 without TF_CONFIG)."""
    global_batch_size: int = 0
    """Examples per optimisation step across all workers: the recipe's batch size times ``workers``."""
    chief: bool = True
    """This process writes the run directory, exports and publishes; other workers only train."""
    cluster_strategy: Any = None

    def done(self) -> None:
        """In a cluster, wait until every worker gets here (the chief after publishing), then tidy up."""
        if self.cluster_strategy is None:
            return
        barrier(self.cluster_strategy)
        if not self.chief:
            shutil.rmtree(self.run_dir, ignore_errors=True)


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


def make_datasets(recipe: Recipe, train: Split, val: Split | None, max_steps: int | None = None,
                  workers: int = 1) -> tuple[Any, Any]:
    """The shuffled, augmented training dataset and the validation dataset (None without one).

    Batches are global: ``recipe.batch_size`` per worker times ``workers``. Under a
    multi-worker strategy, Keras splits each global batch among the workers (the DATA shard
    policy; every worker shuffles with the same seed, so the slices are disjoint).
    """
    import tensorflow as tf

    n_classes = len(recipe.labels)

    def one_hot(image: Any, label: Any) -> tuple[Any, Any]:
        return tf.cast(image, tf.float32), tf.one_hot(label, n_classes)

    train_ds = (
        tf.data.Dataset.from_tensor_slices(train)
        .shuffle(len(train[0]), seed=recipe.seed, reshuffle_each_iteration=True)
        .map(augment_fn(recipe), num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
        .map(lambda x, y: (x, tf.one_hot(y, n_classes)))
        .batch(recipe.batch_size * workers, drop_remainder=False)
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


def _fix_keras_for_multi_worker(model: Any, strategy: Any) -> None:
    """Work around two Keras 3 defects that stop ``fit`` under MultiWorkerMirroredStrategy.

    1. Keras builds a model before ``fit`` by all-reducing a batch of data across the replicas,
       which the strategy cannot do for an ``(images, labels)`` tuple: every worker fails with
       "Attempt to convert a value (PerReplica...) to a Tensor" (keras-team/keras#20585). The
       build needs only the batch's shapes and dtypes, which this worker's own slice has.
    2. Keras averages each step's scalar metrics across workers with ``axis=0``, which a scalar
       does not have ("Invalid reduction dimension 0"); ``axis=None`` is the mean across workers.
    """
    import tensorflow as tf
    from keras.src.backend.tensorflow import trainer as keras_tf_trainer

    def build(iterator: Any = None, data_batch: Any = None) -> None:
        if iterator is not None:
            for _, _, batches in iterator:
                data_batch = next(batches)
                break
        local = tf.nest.map_structure(lambda value: strategy.experimental_local_results(value)[0], data_batch)
        with strategy.scope():
            model._symbolic_build(data_batch=local)

    model._maybe_symbolic_build = build

    keras_reduce = getattr(keras_tf_trainer.reduce_per_replica, "__wrapped__", keras_tf_trainer.reduce_per_replica)

    def reduce_per_replica(values: Any, strategy: Any, reduction: str) -> Any:
        if reduction in ("auto", "mean") and isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            return tf.nest.map_structure(lambda value: strategy.reduce("MEAN", value, axis=None), values)
        return keras_reduce(values, strategy, reduction)

    reduce_per_replica.__wrapped__ = keras_reduce  # type: ignore[attr-defined]
    keras_tf_trainer.reduce_per_replica = reduce_per_replica


def train(recipe: Recipe, ds: Dataset, runs_dir: Path, *, epochs: int | None = None,
          max_steps: int | None = None, resume: Path | None = None, verbose: int = 2,
          cluster: Cluster | None = None, initial_model: Any = None) -> TrainResult:
    """Train a recipe on a dataset; returns the best-on-validation model.

    A recipe with ``validation_size`` 0 trains on the whole training set and returns the
    weights of the last epoch (the schedule, not a validation score, decides when to stop).

    ``resume`` is an earlier run directory: training continues from its ``last.keras`` at
    the epoch after the last completed one. With a ``cluster`` (``cluster_from_env()``), every
    worker calls this, and each must call ``TrainResult.done()`` at the end. ``initial_model`` (a Keras
    model of the recipe's architecture) is trained from its weights instead of a fresh build: a fine-tune.
    """
    import keras

    keras.utils.set_random_seed(recipe.seed)
    if epochs is not None:
        recipe = replace(recipe, epochs=epochs)
    if list(ds.labels) != list(recipe.labels):
        recipe = replace(recipe, labels=tuple(ds.labels))

    chief = cluster is None or cluster.is_chief
    workers = cluster.workers if cluster is not None else 1
    if chief:
        run_dir = resume or runs_dir / recipe.name / time.strftime("%Y%m%d-%H%M%S")
        run_dir.mkdir(parents=True, exist_ok=True)
    else:  # a worker's own files are thrown away; the multi-worker guide has them written somewhere private
        run_dir = Path(tempfile.mkdtemp(prefix=f"convserve-{cluster.task_type}{cluster.task_index}-"))
    source = resume or run_dir  # where a resumed run's checkpoint is read (by every worker)
    state_path = run_dir / "state.json"
    history_path = run_dir / "history.json"
    history: dict[str, list[float]] = {}
    initial_epoch = 0
    previous_wall = 0.0

    strategy = get_strategy(cluster)
    with strategy.scope():
        if resume and (source / "last.keras").exists():
            model = keras.saving.load_model(source / "last.keras")  # safe_mode stays on
            state = json.loads((source / "state.json").read_text())
            initial_epoch, previous_wall = state["epochs_done"], state.get("wall_seconds", 0.0)
            history = json.loads((source / "history.json").read_text()) if (source / "history.json").exists() else {}
            log.info("resuming %s at epoch %d", source.name, initial_epoch + 1)
        else:
            model = build_model(recipe) if initial_model is None else initial_model
            model.compile(
                optimizer=make_optimizer(recipe),
                loss=keras.losses.CategoricalCrossentropy(label_smoothing=recipe.label_smoothing),
                metrics=["accuracy"],
            )
    if cluster is not None:
        _fix_keras_for_multi_worker(model, strategy)

    train_xy, val_xy = split_validation(ds, recipe.validation_size, recipe.seed)
    train_ds, val_ds = make_datasets(recipe, train_xy, val_xy, max_steps, workers)

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
                "workers": workers, "global_batch_size": recipe.batch_size * workers,
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
    if chief and val_ds is None:
        model = keras.saving.load_model(run_dir / "last.keras")  # the EMA weights when averaging
    elif chief and best_path.exists():
        model = keras.saving.load_model(best_path)
    # tf.distribute.MultiWorkerMirroredStrategy's class is named CollectiveAllReduceStrategy
    strategy_name = "MultiWorkerMirroredStrategy" if cluster is not None else type(strategy).__name__
    return TrainResult(model=model, history=history, run_dir=run_dir,
                       epochs_run=len(history.get("loss", [])), wall_seconds=wall,
                       strategy=strategy_name, recipe=recipe, workers=workers,
                       global_batch_size=recipe.batch_size * workers, chief=chief,
                       cluster_strategy=strategy if cluster is not None else None)
