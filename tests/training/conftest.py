"""Fixtures for the training tests: the local datasets, a private cache, and tiny image trees."""

from __future__ import annotations

import io
import os
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from tests.support.missing import local_datasets
from training.data import Dataset, load_dataset
from training.recipes import get_recipe

# The tiny class-folder tree: folder names are created out of order on purpose, so the tests
# can check that labels come from the *sorted* folder names.
TREE_CLASSES = ("dog", "ant", "cat")
TREE_SORTED_CLASSES = ["ant", "cat", "dog"]
TREE_TRAIN_PER_CLASS = 4
TREE_TEST_PER_CLASS = 2
TREE_SIZE = 8  # 8x8 pixels
LIMIT = 600  # train and test images in every smoke run


def tree_pixel(label: str) -> int:
    """Every image of a class is one uniform grey, so a loaded pixel tells its class."""
    return 40 + 80 * TREE_SORTED_CLASSES.index(label)


@pytest.fixture(scope="session", autouse=True)
def private_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Decoded-archive caches go to a session temp dir unless the user chose a cache dir."""
    if os.environ.get("CONVSERVE_CACHE_DIR"):
        yield Path(os.environ["CONVSERVE_CACHE_DIR"])
        return
    cache = tmp_path_factory.mktemp("convserve-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CONVSERVE_CACHE_DIR", str(cache))  # inherited by CLI subprocesses too
        yield cache


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The local copies of MNIST, Fashion-MNIST and CIFAR-10 (CONVSERVE_DATA_DIR or ../shared/datasets)."""
    return local_datasets()


@dataclass
class ImageTree:
    """A class-folder tree ``train/<class>/*.png`` + ``test/<class>/*.png`` and ways to pack it."""

    root: Path
    work: Path
    classes: list[str] = field(default_factory=lambda: list(TREE_SORTED_CLASSES))  # sorted, label order
    train_per_class: int = TREE_TRAIN_PER_CLASS
    test_per_class: int = TREE_TEST_PER_CLASS
    size: int = TREE_SIZE

    def pixel(self, label: str) -> int:
        return tree_pixel(label)

    def files(self) -> list[Path]:
        return sorted(p for p in self.root.rglob("*") if p.is_file())

    def as_dir(self) -> Path:
        return self.root

    def as_zip(self, top: str = "") -> Path:
        path = self.work / "tree.zip"
        with zipfile.ZipFile(path, "w") as zf:
            for file in self.files():
                zf.write(file, _arcname(file, self.root, top))
        return path

    def _as_tar(self, name: str, mode: str, top: str) -> Path:
        path = self.work / name
        with tarfile.open(path, mode) as tar:
            for file in self.files():
                tar.add(file, _arcname(file, self.root, top))
        return path

    def as_tar(self, top: str = "") -> Path:
        return self._as_tar("tree.tar", "w", top)

    def as_tar_xz(self, top: str = "") -> Path:
        return self._as_tar("tree.tar.xz", "w:xz", top)

    def pack(self, form: str, top: str = "") -> Path:
        if form == "dir":
            return self.as_dir()
        return {"zip": self.as_zip, "tar": self.as_tar, "tar.xz": self.as_tar_xz}[form](top)


def _arcname(file: Path, root: Path, top: str) -> str:
    rel = file.relative_to(root).as_posix()
    return f"{top}/{rel}" if top else rel


def png_bytes(value: int, size: int = TREE_SIZE) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8), "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def image_tree(tmp_path: Path) -> ImageTree:
    """3 classes; 4 train and 2 test 8x8 RGB PNGs per class."""
    root = tmp_path / "tree"
    for split, count in (("train", TREE_TRAIN_PER_CLASS), ("test", TREE_TEST_PER_CLASS)):
        for label in TREE_CLASSES:
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                (folder / f"{i:04d}.png").write_bytes(png_bytes(tree_pixel(label)))
    work = tmp_path / "packed"
    work.mkdir()
    return ImageTree(root=root, work=work)


@pytest.fixture(scope="module")
def mnist_small(data_dir: Path) -> Dataset:
    """The first 600 training and 600 test images of the local MNIST copy."""
    recipe = get_recipe("mnist")
    return load_dataset(recipe.dataset, recipe.input_shape, recipe.labels, data_dir).limit(LIMIT)
