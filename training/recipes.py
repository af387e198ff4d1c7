"""Named training recipes: one typed config per served model, and the Keras model it builds.

Each builder reads like the notebook it comes from: ``keras.Input`` taking raw 0..255
pixels, rescaling inside the graph, then the layers named by role, ending in a softmax
named ``probabilities``. Augmentation is *not* part of these graphs (see ``training.data``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

MNIST_LABELS = tuple(str(d) for d in range(10))
FASHION_LABELS = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
CIFAR10_LABELS = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)


@dataclass(frozen=True)
class Augmentation:
    """Training-time augmentation, applied in the tf.data pipeline, never exported."""

    pad_crop: int = 0
    """Pad each side by this many pixels, then crop back at a random offset (a shift)."""
    horizontal_flip: bool = False
    """Flip left-right with probability 0.5."""
    rotation_degrees: float = 0.0
    """Rotate by a random angle in [-d, d] degrees."""
    cutout: int = 0
    """Random erasing: blank the pixels within cutout // 2 of a random centre (a square of side
    2 * (cutout // 2) + 1, clipped at the border)."""


@dataclass(frozen=True)
class Recipe:
    """Everything needed to reproduce one trained model: architecture, data and optimisation."""

    name: str
    dataset: str
    architecture: str
    input_shape: tuple[int, int, int]
    labels: tuple[str, ...]
    digit: bool
    epochs: int
    batch_size: int
    optimizer: str  # "adam" or "sgd" (Nesterov momentum 0.9)
    learning_rate: float
    weight_decay: float = 0.0
    warmup_epochs: int = 0
    schedule: str = "cosine"  # "cosine" or "constant"
    restarts: tuple[int, ...] = ()
    """Epochs at which the cosine schedule starts a new cycle (warm restarts, SGDR)."""
    restart_decay: float = 1.0
    """Each cycle peaks at this fraction of the previous cycle's peak."""
    label_smoothing: float = 0.0
    ema_momentum: float = 0.0  # >0: evaluate, keep and export an exponential moving average of the weights
    validation_size: int = 5000
    """Images carved from the training set for validation; 0 trains on all of them and keeps the
    last epoch's weights."""
    early_stopping_patience: int = 0  # 0: train every epoch, keep the best on validation
    augmentation: Augmentation = field(default_factory=Augmentation)
    seed: int = 1234

    def __post_init__(self) -> None:
        if self.early_stopping_patience and self.validation_size <= 0:
            raise ValueError(f"recipe {self.name!r}: early stopping needs a validation split (validation_size > 0)")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["input_shape"] = list(self.input_shape)
        data["labels"] = list(self.labels)
        data["restarts"] = list(self.restarts)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        """The recipe a version was trained with, from its ``metadata.json`` (:meth:`to_dict`'s output)."""
        fields = {**data, "input_shape": tuple(data["input_shape"]), "labels": tuple(data["labels"]),
                  "restarts": tuple(data.get("restarts", ())),
                  "augmentation": Augmentation(**data.get("augmentation", {}))}
        return cls(**fields)


def build_lenet(recipe: Recipe) -> Any:
    """LeNet as in the MNIST notebook: two conv/pool stages, Dense 500, softmax."""
    import keras
    from keras import layers

    image = keras.Input(shape=recipe.input_shape, name="image")
    x = layers.Rescaling(1.0 / 255, name="rescale")(image)
    x = layers.Conv2D(20, 5, activation="relu", name="conv1")(x)
    x = layers.MaxPooling2D(2, name="pool1")(x)
    x = layers.Conv2D(50, 5, activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(2, name="pool2")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(500, activation="relu", name="fc1")(x)
    probabilities = layers.Dense(len(recipe.labels), activation="softmax", name="probabilities")(x)
    return keras.Model(image, probabilities, name="lenet")


def build_fashion_cnn(recipe: Recipe) -> Any:
    """The Fashion-MNIST notebook CNN: conv 32, pool, conv 64, pool, Dense 100, dropout 0.4."""
    import keras
    from keras import layers

    image = keras.Input(shape=recipe.input_shape, name="image")
    x = layers.Rescaling(1.0 / 255, name="rescale")(image)
    x = layers.Conv2D(32, 3, padding="same", activation="relu", name="conv1")(x)
    x = layers.MaxPooling2D(2, name="pool1")(x)
    x = layers.Conv2D(64, 3, padding="same", activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(2, name="pool2")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(100, activation="relu", name="fc1")(x)
    x = layers.Dropout(0.4, name="dropout")(x)
    probabilities = layers.Dense(len(recipe.labels), activation="softmax", name="probabilities")(x)
    return keras.Model(image, probabilities, name="fashion_cnn")


def build_cifar_cnn(recipe: Recipe) -> Any:
    """The CIFAR-10 notebook VGG-style net: three [Conv-BN, Conv-BN, MaxPool, Dropout] blocks."""
    import keras
    from keras import layers

    image = keras.Input(shape=recipe.input_shape, name="image")
    x = layers.Rescaling(1.0 / 255, name="rescale")(image)
    for block, (filters, dropout) in enumerate(((32, 0.2), (64, 0.3), (128, 0.4)), start=1):
        for conv in (1, 2):
            x = layers.Conv2D(
                filters, 3, padding="same", activation="relu",
                kernel_initializer="he_uniform", name=f"block{block}_conv{conv}",
            )(x)
            x = layers.BatchNormalization(name=f"block{block}_bn{conv}")(x)
        x = layers.MaxPooling2D(2, name=f"block{block}_pool")(x)
        x = layers.Dropout(dropout, name=f"block{block}_dropout")(x)
    x = layers.Flatten(name="flatten")(x)
    probabilities = layers.Dense(len(recipe.labels), activation="softmax", name="probabilities")(x)
    return keras.Model(image, probabilities, name="cifar_cnn")


BUILDERS: dict[str, Callable[[Recipe], Any]] = {
    "lenet": build_lenet,
    "fashion_cnn": build_fashion_cnn,
    "cifar_cnn": build_cifar_cnn,
}

RECIPES: dict[str, Recipe] = {
    "mnist": Recipe(
        name="mnist",
        dataset="mnist",
        architecture="lenet",
        input_shape=(28, 28, 1),
        labels=MNIST_LABELS,
        digit=True,
        epochs=15,
        batch_size=128,
        optimizer="adam",
        learning_rate=1e-3,
        schedule="cosine",
        validation_size=5000,
        augmentation=Augmentation(pad_crop=2, rotation_degrees=8.0),
    ),
    "fashion-mnist": Recipe(
        name="fashion-mnist",
        dataset="fashion-mnist",
        architecture="fashion_cnn",
        input_shape=(28, 28, 1),
        labels=FASHION_LABELS,
        digit=False,
        epochs=40,
        batch_size=128,
        optimizer="adam",
        learning_rate=2e-3,
        weight_decay=0.0,
        warmup_epochs=1,
        schedule="cosine",
        label_smoothing=0.1,
        # Settled on a 5,000-image validation split (v1: 92.97% test); trained on all 60,000.
        validation_size=0,
        augmentation=Augmentation(pad_crop=2, horizontal_flip=True),
    ),
    "cifar10": Recipe(
        name="cifar10",
        dataset="cifar10",
        architecture="cifar_cnn",
        input_shape=(32, 32, 3),
        labels=CIFAR10_LABELS,
        digit=False,
        # v3: one clean cosine cycle over 150 epochs on all 50,000 training images. v2 (75 epochs,
        # 35 + a 40-epoch warm restart) ended with training accuracy (84.9%) level with validation
        # (84.6%): the net was still under-fitted, so the budget grows and no regulariser is added.
        # v4: the same cycle over 300 epochs, the only change. v3 (86.35% test) still fitted only
        # 93.3% of its own training images (its model.onnx, no augmentation or dropout; 88.8% with
        # them) and its training accuracy rose for as long as the rate was above ~0.003: it is
        # short of epochs rather than of capacity or regularisation. Changing epochs re-spreads
        # the schedule of a run being resumed. v4 scored 87.74% (95.8% of its training images).
        epochs=300,
        batch_size=128,
        optimizer="sgd",
        learning_rate=0.05,
        weight_decay=5e-4,
        warmup_epochs=2,
        schedule="cosine",
        label_smoothing=0.1,
        validation_size=0,
        augmentation=Augmentation(pad_crop=4, horizontal_flip=True, rotation_degrees=0.0),
    ),
    # The CIFAR-10 notebook's own training, kept as the baseline the cifar10 recipe is measured
    # against: SGD at a constant 1e-3 (Nesterov momentum 0.9, like every sgd recipe here), batch 64,
    # shifts of about 10%, flips and rotations; no schedule, label smoothing or weight decay.
    # Not bundled in models/.
    "cifar10-notebook": Recipe(
        name="cifar10-notebook",
        dataset="cifar10",
        architecture="cifar_cnn",
        input_shape=(32, 32, 3),
        labels=CIFAR10_LABELS,
        digit=False,
        epochs=30,
        batch_size=64,
        optimizer="sgd",
        learning_rate=1e-3,
        schedule="constant",
        validation_size=5000,
        augmentation=Augmentation(pad_crop=3, horizontal_flip=True, rotation_degrees=15.0),
    ),
}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        known = ", ".join(sorted(RECIPES))
        raise ValueError(f"unknown recipe {name!r}; known recipes: {known}") from None


def build_model(recipe: Recipe) -> Any:
    """Build the (uncompiled) Keras model of a recipe."""
    return BUILDERS[recipe.architecture](recipe)
