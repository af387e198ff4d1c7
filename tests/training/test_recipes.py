"""Recipes: the architectures they build, and the learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from training.recipes import RECIPES, build_model, get_recipe
from training.train import learning_rate_at

# --- Expected parameter counts, by hand -------------------------------------------------------
# A Conv2D with k x k kernels, c_in input channels and f filters has k*k*c_in*f weights + f biases;
# a Dense layer with n inputs and m units has n*m + m; BatchNormalization has 4 per channel
# (gamma, beta trainable; moving mean and variance not trainable).

# LeNet on 28x28x1 ("valid" convolutions):
#   conv1  20 @ 5x5 on 1 channel:   5*5*1*20 + 20   =    520   -> 24x24x20, pool -> 12x12x20
#   conv2  50 @ 5x5 on 20 channels: 5*5*20*50 + 50  = 25 050   -> 8x8x50,   pool -> 4x4x50 = 800
#   fc1    800 -> 500:              800*500 + 500   = 400 500
#   out    500 -> 10:               500*10 + 10     =   5 010
LENET_PARAMS = 520 + 25_050 + 400_500 + 5_010  # = 431 080

# Fashion CNN on 28x28x1 ("same" convolutions):
#   conv1  32 @ 3x3 on 1 channel:   3*3*1*32 + 32   =    320   -> 28x28x32, pool -> 14x14x32
#   conv2  64 @ 3x3 on 32 channels: 3*3*32*64 + 64  = 18 496   -> 14x14x64, pool -> 7x7x64 = 3136
#   fc1    3136 -> 100:             3136*100 + 100  = 313 700
#   out    100 -> 10:               100*10 + 10     =   1 010
FASHION_PARAMS = 320 + 18_496 + 313_700 + 1_010  # = 333 526

# CIFAR CNN on 32x32x3, three blocks of [conv+BN, conv+BN, pool, dropout] ("same" convolutions):
#   block1 conv1 32 @ 3x3 on 3:     3*3*3*32 + 32    =     896, BN 4*32  = 128
#   block1 conv2 32 @ 3x3 on 32:    3*3*32*32 + 32   =   9 248, BN 4*32  = 128   pool -> 16x16x32
#   block2 conv1 64 @ 3x3 on 32:    3*3*32*64 + 64   =  18 496, BN 4*64  = 256
#   block2 conv2 64 @ 3x3 on 64:    3*3*64*64 + 64   =  36 928, BN 4*64  = 256   pool -> 8x8x64
#   block3 conv1 128 @ 3x3 on 64:   3*3*64*128 + 128 =  73 856, BN 4*128 = 512
#   block3 conv2 128 @ 3x3 on 128:  3*3*128*128 + 128 = 147 584, BN 4*128 = 512  pool -> 4x4x128 = 2048
#   out    2048 -> 10:              2048*10 + 10     =  20 490
CIFAR_CONV_PARAMS = 896 + 9_248 + 18_496 + 36_928 + 73_856 + 147_584  # = 287 008
CIFAR_BN_PARAMS = 128 + 128 + 256 + 256 + 512 + 512  # = 1 792, half of it (896) moving statistics
CIFAR_PARAMS = CIFAR_CONV_PARAMS + CIFAR_BN_PARAMS + 20_490  # = 309 290
CIFAR_NON_TRAINABLE = CIFAR_BN_PARAMS // 2  # = 896

EXPECTED = {
    # recipe: (input shape, total params, non-trainable params, layer names after the input)
    "mnist": ((28, 28, 1), LENET_PARAMS, 0,
              ["rescale", "conv1", "pool1", "conv2", "pool2", "flatten", "fc1", "probabilities"]),
    "fashion-mnist": ((28, 28, 1), FASHION_PARAMS, 0,
                      ["rescale", "conv1", "pool1", "conv2", "pool2", "flatten", "fc1", "dropout",
                       "probabilities"]),
    "cifar10": ((32, 32, 3), CIFAR_PARAMS, CIFAR_NON_TRAINABLE,
                ["rescale"]
                + [name for b in (1, 2, 3) for name in (f"block{b}_conv1", f"block{b}_bn1", f"block{b}_conv2",
                                                         f"block{b}_bn2", f"block{b}_pool", f"block{b}_dropout")]
                + ["flatten", "probabilities"]),
}
EXPECTED["cifar10-notebook"] = EXPECTED["cifar10"]  # the notebook's training of the same network


@pytest.fixture(scope="module")
def models() -> dict:
    return {name: build_model(recipe) for name, recipe in RECIPES.items()}


def test_every_expected_recipe_exists():
    assert set(RECIPES) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_model_takes_raw_images_of_the_recipe_shape(models, name):
    shape = EXPECTED[name][0]
    assert RECIPES[name].input_shape == shape
    assert tuple(models[name].input_shape) == (None, *shape)
    assert models[name].inputs[0].name == "image"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_model_outputs_a_softmax_over_ten_classes(models, name):
    model = models[name]
    assert tuple(model.output_shape) == (None, 10)
    assert len(RECIPES[name].labels) == 10
    out = model.get_layer("probabilities")
    assert out.get_config()["activation"] == "softmax"
    assert model.layers[-1] is out


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_model_layers_are_named_by_role(models, name):
    names = [layer.name for layer in models[name].layers]
    assert names[0] == "image"
    assert names[1:] == EXPECTED[name][3]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_model_has_the_hand_computed_parameter_count(models, name):
    model = models[name]
    _, total, non_trainable, _ = EXPECTED[name]
    trainable = sum(int(w.numpy().size) for w in model.trainable_weights)
    assert model.count_params() == total
    assert trainable == total - non_trainable


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_model_rescales_pixels_inside_the_graph(models, name):
    rescale = models[name].get_layer("rescale")
    assert type(rescale).__name__ == "Rescaling"
    assert rescale.get_config()["scale"] == pytest.approx(1 / 255)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_model_contains_no_augmentation_layers(models, name):
    kinds = [type(layer).__name__ for layer in models[name].layers]
    assert not [k for k in kinds if k.startswith("Random") or k in ("RandAugment", "AugMix", "MixUp", "CutMix")]


def test_get_recipe_returns_the_named_recipe():
    assert get_recipe("fashion-mnist") is RECIPES["fashion-mnist"]


def test_get_recipe_rejects_an_unknown_name_listing_the_known_ones():
    known = "cifar10, cifar10-notebook, fashion-mnist, mnist"
    with pytest.raises(ValueError, match=rf"unknown recipe 'svhn'; known recipes: {known}"):
        get_recipe("svhn")


def test_recipe_to_dict_is_json_friendly():
    data = RECIPES["cifar10"].to_dict()
    assert data["input_shape"] == [32, 32, 3]
    assert data["labels"][0] == "airplane"
    assert data["augmentation"] == {"pad_crop": 4, "horizontal_flip": True, "rotation_degrees": 0.0, "cutout": 0}


# --- learning_rate_at ---------------------------------------------------------------------------

def test_learning_rate_warms_up_linearly():
    recipe = RECIPES["cifar10"]  # lr 0.05, 2 warm-up epochs
    assert recipe.warmup_epochs == 2
    assert learning_rate_at(recipe, 0) == pytest.approx(0.05 * 1 / 3)
    assert learning_rate_at(recipe, 1) == pytest.approx(0.05 * 2 / 3)


def test_learning_rate_reaches_the_base_rate_right_after_warmup():
    recipe = RECIPES["cifar10"]
    assert learning_rate_at(recipe, recipe.warmup_epochs) == pytest.approx(recipe.learning_rate)


def test_learning_rate_cosine_decays_monotonically_to_about_zero():
    recipe = RECIPES["fashion-mnist"]  # lr 2e-3, 1 warm-up epoch, 40 epochs
    after_warmup = [learning_rate_at(recipe, e) for e in range(recipe.warmup_epochs, recipe.epochs)]
    assert all(a > b for a, b in zip(after_warmup, after_warmup[1:]))
    assert after_warmup[-1] < 0.01 * recipe.learning_rate
    assert learning_rate_at(recipe, recipe.epochs) == pytest.approx(0.0, abs=1e-12)


def test_learning_rate_cosine_is_half_the_base_rate_halfway():
    recipe = replace(RECIPES["mnist"], epochs=10, warmup_epochs=0)
    assert learning_rate_at(recipe, 5) == pytest.approx(0.5 * recipe.learning_rate)
    assert learning_rate_at(recipe, 0) == pytest.approx(recipe.learning_rate)


def test_learning_rate_constant_schedule_keeps_the_base_rate_after_warmup():
    recipe = replace(RECIPES["cifar10"], schedule="constant")
    rates = [learning_rate_at(recipe, e) for e in range(2, recipe.epochs)]
    assert rates == [recipe.learning_rate] * len(rates)
    assert learning_rate_at(recipe, 0) < recipe.learning_rate


def test_learning_rate_warm_restart_starts_a_new_cosine_cycle_at_a_decayed_peak():
    recipe = replace(RECIPES["mnist"], epochs=30, warmup_epochs=0, restarts=(10,), restart_decay=0.5)
    first = [learning_rate_at(recipe, e) for e in range(10)]
    second = [learning_rate_at(recipe, e) for e in range(10, 30)]
    assert first[0] == pytest.approx(recipe.learning_rate)
    assert first[5] == pytest.approx(0.5 * recipe.learning_rate)  # halfway down the first 10-epoch cycle
    assert second[0] == pytest.approx(0.5 * recipe.learning_rate)  # the restart, at half the first peak
    assert second[10] == pytest.approx(0.25 * recipe.learning_rate)  # halfway down the 20-epoch cycle
    assert all(a > b for a, b in zip(first, first[1:]))
    assert all(a > b for a, b in zip(second, second[1:]))
    assert learning_rate_at(recipe, 30) == pytest.approx(0.0, abs=1e-12)


def test_learning_rate_restarts_compound_their_decay_and_ignore_warmup_epochs():
    recipe = replace(RECIPES["mnist"], epochs=30, warmup_epochs=2, restarts=(20, 1, 10), restart_decay=0.5)
    assert learning_rate_at(recipe, 2) == pytest.approx(recipe.learning_rate)  # a restart inside warm-up is moot
    assert learning_rate_at(recipe, 10) == pytest.approx(0.5 * recipe.learning_rate)
    assert learning_rate_at(recipe, 20) == pytest.approx(0.25 * recipe.learning_rate)


def test_cifar10_recipe_is_one_cosine_cycle_on_the_whole_training_set():
    recipe = RECIPES["cifar10"]
    assert recipe.restarts == () and recipe.validation_size == 0
    assert learning_rate_at(recipe, recipe.warmup_epochs) == pytest.approx(recipe.learning_rate)
    halfway = recipe.warmup_epochs + (recipe.epochs - recipe.warmup_epochs) // 2
    assert learning_rate_at(recipe, halfway) == pytest.approx(0.5 * recipe.learning_rate)
    assert learning_rate_at(recipe, recipe.epochs - 1) < 0.001 * recipe.learning_rate


def test_early_stopping_without_a_validation_split_is_refused():
    with pytest.raises(ValueError, match="early stopping needs a validation split"):
        replace(RECIPES["mnist"], validation_size=0, early_stopping_patience=3)


def test_learning_rate_never_negative_or_nan():
    for recipe in RECIPES.values():
        for epoch in range(recipe.epochs + 1):
            rate = learning_rate_at(recipe, epoch)
            assert rate >= 0 and not math.isnan(rate)
