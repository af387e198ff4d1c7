"""Dataset loading: Keras downloads, local copies of the standard files, and class-folder trees.

Every loader returns a :class:`Dataset` of uint8 NHWC arrays plus its provenance. Problems
with the data raise :class:`DataError` with one message naming what was expected.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import numpy as np

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2")
MAX_IMAGE_PIXELS = 4096 * 4096
FASHION_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}
CIFAR_PICKLE_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR_TREE_NAMES = ("cifar10-jpeg.tar.xz", "cifar10.tar.xz", "cifar10.tar", "cifar10.zip", "cifar10")


class DataError(Exception):
    """The data is missing or malformed; the message says what was expected."""


@dataclass
class Dataset:
    """Train and test splits as uint8 arrays [N, H, W, C] with integer labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    labels: list[str]
    provenance: dict[str, Any] = field(default_factory=dict)

    def limit(self, n: int | None) -> Dataset:
        """A copy with at most ``n`` train and ``n`` test examples (for smoke runs)."""
        if not n:
            return self
        return Dataset(self.x_train[:n], self.y_train[:n], self.x_test[:n], self.y_test[:n],
                       self.labels, {**self.provenance, "limit": n})


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _checked(ds: Dataset, input_shape: tuple[int, int, int], num_classes: int, source: str) -> Dataset:
    ds.x_train = _as_nhwc(ds.x_train, input_shape, source, "train")
    ds.x_test = _as_nhwc(ds.x_test, input_shape, source, "test")
    for split, x, y in (("train", ds.x_train, ds.y_train), ("test", ds.x_test, ds.y_test)):
        y = np.asarray(y).reshape(-1)
        if len(x) == 0:
            raise DataError(f"{source}: the {split} split is empty")
        if len(y) != len(x):
            raise DataError(f"{source}: {split} has {len(x)} images but {len(y)} labels")
        if y.min() < 0 or y.max() >= num_classes:
            raise DataError(f"{source}: {split} labels must lie in 0..{num_classes - 1}")
    ds.y_train = np.asarray(ds.y_train).reshape(-1).astype(np.int64)
    ds.y_test = np.asarray(ds.y_test).reshape(-1).astype(np.int64)
    return ds


def _as_nhwc(x: np.ndarray, shape: tuple[int, int, int], source: str, split: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 3 and shape[2] == 1:
        x = x[..., None]
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(shape):
        raise DataError(f"{source}: expected {split} images of shape [N, {', '.join(map(str, shape))}], "
                        f"got {list(x.shape)}")
    if x.dtype != np.uint8:
        raise DataError(f"{source}: expected uint8 pixels, got {x.dtype}")
    return x


# --- Keras downloads (the default for users with a network) -----------------------------------

def _load_keras(name: str) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    import keras

    loaders: dict[str, Callable[[], Any]] = {
        "mnist": keras.datasets.mnist.load_data,
        "fashion-mnist": keras.datasets.fashion_mnist.load_data,
        "cifar10": keras.datasets.cifar10.load_data,
    }
    try:
        return loaders[name]()
    except Exception as exc:  # network errors come in many types
        raise DataError(
            f"could not download {name} through keras.datasets ({exc.__class__.__name__}: {exc}); "
            "pass --data-dir pointing at a local copy"
        ) from None


# --- Local copies of the standard files --------------------------------------------------------

def _read_idx(path: Path, magic: int) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path.name}: not a readable gzip IDX file ({exc})") from None
    if len(data) < 8 or struct.unpack(">I", data[:4])[0] != magic:
        raise DataError(f"{path.name}: bad IDX magic number (expected {magic})")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise DataError(f"{path.name}: truncated IDX file (header of {len(data)} bytes, expected {4 + 4 * ndim})")
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path.name}: truncated IDX file ({body.size} bytes for dims {list(dims)})")
    return body.reshape(dims)


def _load_mnist_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except KeyError as exc:
        raise DataError(f"{path.name}: missing array {exc}; expected x_train, y_train, x_test, y_test") from None
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path.name}: not a readable .npz file ({exc})") from None


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR-10 python batches and nothing else: only numpy array reconstruction."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise DataError(f"refusing to unpickle {module}.{name}: only numpy arrays are allowed")
        return super().find_class(module, name)


def _load_cifar_pickles(path: Path) -> dict[str, np.ndarray]:
    batches: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"train": [], "test": []}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar.getmembers():
                base = PurePosixPath(member.name).name
                split = "train" if base.startswith("data_batch_") else "test" if base == "test_batch" else None
                if split is None or not member.isfile():
                    continue
                raw = _NumpyOnlyUnpickler(tar.extractfile(member), encoding="bytes").load()  # type: ignore[arg-type]
                data = np.asarray(raw[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
                batches[split].append((data, np.asarray(raw[b"labels"])))
    except (tarfile.TarError, OSError, KeyError, pickle.UnpicklingError) as exc:
        raise DataError(f"{path.name}: not a valid CIFAR-10 python archive ({exc})") from None
    if not batches["train"] or not batches["test"]:
        raise DataError(f"{path.name}: expected data_batch_1..5 and test_batch inside")
    out = {}
    for split in ("train", "test"):
        out[f"x_{split}"] = np.concatenate([b[0] for b in batches[split]])
        out[f"y_{split}"] = np.concatenate([b[1] for b in batches[split]])
    return out


# --- Class-folder image trees (directory or archive) -------------------------------------------

def _iter_tree_files(source: Path) -> Iterator[tuple[PurePosixPath, Callable[[], bytes]]]:
    """Yield (relative path, reader) for every regular file; archives are read in memory."""
    if source.is_dir():
        for path in sorted(source.rglob("*")):
            if path.is_file() and not path.is_symlink():
                yield PurePosixPath(path.relative_to(source).as_posix()), path.read_bytes
        return
    name = source.name.lower()
    if name.endswith(".zip"):
        with zipfile.ZipFile(source) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    yield PurePosixPath(info.filename), (lambda i=info: zf.read(i))
        return
    with tarfile.open(source, "r:*") as tar:
        for member in tar:
            if member.isfile():
                fileobj: BinaryIO = tar.extractfile(member)  # type: ignore[assignment]
                yield PurePosixPath(member.name), fileobj.read


def _decode(data: bytes, mode: str, size: tuple[int, int], where: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise DataError(f"{where}: image too large ({img.width}x{img.height})")
            img = img.convert(mode)
            if img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{where}: not a decodable image ({exc.__class__.__name__})") from None


def is_image_tree(source: Path) -> bool:
    """True for a directory with train/ and test/ folders, or an archive file."""
    if source.is_dir():
        return (source / "train").is_dir() and (source / "test").is_dir()
    return source.is_file() and source.name.lower().endswith(ARCHIVE_SUFFIXES)


def load_image_tree(source: Path, input_shape: tuple[int, int, int]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Read ``train/<class>/*`` and ``test/<class>/*`` (optionally under one top folder).

    Classes are the sorted folder names under ``train/``; images are converted to the
    recipe's channels and resized to its size.
    """
    height, width, channels = input_shape
    mode = "L" if channels == 1 else "RGB"
    found: dict[str, list[tuple[str, np.ndarray]]] = {"train": [], "test": []}
    try:
        for rel, read in _iter_tree_files(source):
            parts = rel.parts
            if any(p.startswith(".") or p in ("..", "/") for p in parts):
                continue
            if len(parts) < 3 or parts[-3] not in found or rel.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            split, label = parts[-3], parts[-2]
            found[split].append((label, _decode(read(), mode, (height, width), str(rel))))
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as exc:
        raise DataError(f"{source.name}: cannot read the image tree ({exc})") from None
    if not found["train"] or not found["test"]:
        raise DataError(f"{source.name}: expected images under train/<class>/ and test/<class>/")
    classes = sorted({label for label, _ in found["train"]})
    unknown = sorted({label for label, _ in found["test"]} - set(classes))
    if unknown:
        raise DataError(f"{source.name}: test classes {unknown} have no train/ folder")
    index = {c: i for i, c in enumerate(classes)}
    arrays: dict[str, np.ndarray] = {}
    for split, items in found.items():
        arrays[f"x_{split}"] = np.stack([img for _, img in items]).reshape(-1, height, width, channels)
        arrays[f"y_{split}"] = np.array([index[label] for label, _ in items], dtype=np.int64)
    return arrays, classes


def _cache_dir() -> Path:
    return Path(os.environ.get("CONVSERVE_CACHE_DIR", Path.home() / ".cache" / "convserve")) / "datasets"


def _load_image_tree_cached(
    source: Path, input_shape: tuple[int, int, int]
) -> tuple[dict[str, np.ndarray], list[str], str | None]:
    """Decoding 60k JPEGs takes a while: archives are cached as .npz keyed by their sha256."""
    if source.is_dir():
        arrays, classes = load_image_tree(source, input_shape)
        return arrays, classes, None
    digest = sha256_file(source)
    cache = _cache_dir() / f"{digest[:20]}-{'x'.join(map(str, input_shape))}.npz"
    if cache.exists():
        try:
            with np.load(cache, allow_pickle=False) as npz:
                return {k: npz[k] for k in ("x_train", "y_train", "x_test", "y_test")}, list(npz["classes"]), digest
        except Exception:
            cache.unlink(missing_ok=True)
    arrays, classes = load_image_tree(source, input_shape)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npz")
        np.savez(tmp, classes=np.array(classes), **arrays)
        tmp.replace(cache)
    except OSError:
        pass  # a read-only home only costs the next run a re-decode
    return arrays, classes, digest


# --- Entry point -------------------------------------------------------------------------------

def _find_standard(name: str, data_dir: Path) -> tuple[dict[str, np.ndarray], list[Path], list[str] | None]:
    """Find the standard files for a named dataset inside ``data_dir``."""
    if name == "mnist":
        for path in (data_dir / "mnist.npz", data_dir / "mnist" / "mnist.npz"):
            if path.is_file():
                return _load_mnist_npz(path), [path], None
        raise DataError(f"no MNIST found in the data directory: expected mnist.npz (Keras layout) "
                        f"or a class-folder tree; looked in {data_dir.name}/")
    if name == "fashion-mnist":
        for folder in (data_dir / "fashion-mnist", data_dir):
            paths = {k: folder / f for k, f in FASHION_FILES.items()}
            if all(p.is_file() for p in paths.values()):
                arrays = {k: _read_idx(p, 2051 if k.startswith("x") else 2049) for k, p in paths.items()}
                return arrays, list(paths.values()), None
        raise DataError("no Fashion-MNIST found in the data directory: expected the four IDX files "
                        f"{', '.join(FASHION_FILES.values())} (optionally under fashion-mnist/)")
    if name == "cifar10":
        for candidate in CIFAR_TREE_NAMES:
            path = data_dir / candidate
            if path.exists() and is_image_tree(path):
                arrays, classes, _ = _load_image_tree_cached(path, (32, 32, 3))
                return arrays, [path], classes
        pickles = data_dir / CIFAR_PICKLE_ARCHIVE
        if pickles.is_file():
            return _load_cifar_pickles(pickles), [pickles], None
        raise DataError("no CIFAR-10 found in the data directory: expected a class-folder tree "
                        f"({', '.join(CIFAR_TREE_NAMES)}) or {CIFAR_PICKLE_ARCHIVE}")
    raise DataError(f"unknown dataset {name!r}")


def load_dataset(name: str, input_shape: tuple[int, int, int], labels: list[str] | tuple[str, ...],
                 data_dir: str | Path | None = None) -> Dataset:
    """Load a dataset by name: from ``data_dir`` when given, else through ``keras.datasets``.

    ``data_dir`` may also be a class-folder tree itself (directory or archive), in which
    case its folder names become the labels.
    """
    labels = list(labels)
    if data_dir is None:
        (x_train, y_train), (x_test, y_test) = _load_keras(name)
        ds = Dataset(x_train, y_train, x_test, y_test, labels, {"source": f"keras.datasets.{name.replace('-', '_')}"})
        return _checked(ds, input_shape, len(labels), name)

    source = Path(data_dir)
    if not source.exists():
        raise DataError(f"data directory {source} does not exist")
    if is_image_tree(source):
        arrays, classes, digest = _load_image_tree_cached(source, input_shape)
        files = [{"file": source.name, **({"sha256": digest} if digest else {})}]
        labels = classes
    else:
        arrays, paths, classes = _find_standard(name, source)
        files = [{"file": p.name, "sha256": sha256_file(p) if p.is_file() else None} for p in paths]
        if classes is not None and len(classes) != len(labels):
            raise DataError(f"{paths[0].name}: found {len(classes)} classes, the recipe expects {len(labels)}")
    ds = Dataset(arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"], labels,
                 {"source": "local files", "files": files})
    return _checked(ds, input_shape, len(labels), source.name)
