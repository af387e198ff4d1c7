"""Training-time augmentation in the input pipeline (never part of the exported graph)."""

from __future__ import annotations

import numpy as np

from training.recipes import get_recipe
from training.train import _cutout, augment_fn


def test_cutout_blanks_one_clipped_square_and_nothing_else():
    import tensorflow as tf

    for seed in range(20):
        tf.random.set_seed(seed)
        image = _cutout(tf.fill((28, 28, 1), 255.0), 8).numpy()[..., 0]
        rows, cols = np.nonzero(image == 0)
        assert 0 < len(rows) <= 9 * 9
        height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert len(rows) == height * width  # one solid rectangle
        assert set(np.unique(image)) <= {0.0, 255.0}


def test_augmented_examples_keep_shape_dtype_and_pixel_range():
    import tensorflow as tf

    recipe = get_recipe("fashion-mnist")
    images = tf.constant(np.random.default_rng(0).integers(0, 256, (8, 28, 28, 1)).astype(np.uint8))
    augment = augment_fn(recipe)
    for image in images:
        out, label = augment(image, tf.constant(3))
        assert out.shape == (28, 28, 1) and out.dtype == tf.float32
        assert 0.0 <= float(tf.reduce_min(out)) and float(tf.reduce_max(out)) <= 255.0
        assert int(label) == 3
