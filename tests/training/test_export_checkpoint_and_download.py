"""Two documented training paths: ``python -m training export --checkpoint`` publishing a saved run's Keras
checkpoint as the next model version, and datasets downloaded through ``keras.datasets`` when no --data-dir is
given (from a local HTTP server holding the real files, in place of the internet)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from training.data import DataError, load_dataset
from training.evaluate import onnx_session, predict_onnx
from training.recipes import get_recipe
from training.train import train

REPO_ROOT = Path(__file__).resolve().parents[2]
LIMIT = 600
KERAS_ORIGIN = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/"


# --- export --checkpoint ---------------------------------------------------------------------------

def test_cli_export_checkpoint_publishes_the_checkpoint_as_the_next_version(data_dir, tmp_path):
    import keras

    recipe = get_recipe("mnist")
    ds = load_dataset(recipe.dataset, recipe.input_shape, recipe.labels, data_dir).limit(LIMIT)
    result = train(recipe, ds, tmp_path / "runs", epochs=1, max_steps=3, verbose=0)
    checkpoint = result.run_dir / "best.keras"
    assert checkpoint.is_file(), sorted(p.name for p in result.run_dir.iterdir())
    models = tmp_path / "models"
    command = [sys.executable, "-m", "training", "export", "--checkpoint", str(checkpoint), "--recipe", "mnist",
               "--data-dir", str(data_dir), "--limit", str(LIMIT), "--models-dir", str(models)]
    done = subprocess.run(command, cwd=REPO_ROOT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    version = models / "mnist" / "1"
    assert f"exported {version}" in done.stdout
    metadata = json.loads((version / "metadata.json").read_text())
    assert metadata["training"]["run"] == result.run_dir.name  # the run the checkpoint came from
    assert metadata["version"] == 1 and metadata["labels"] == list(recipe.labels)
    # The published model.onnx computes what the checkpoint computes.
    saved = keras.saving.load_model(checkpoint)
    x = ds.x_test[:32]
    np.testing.assert_allclose(predict_onnx(onnx_session(version / "model.onnx"), x),
                               saved.predict(x, verbose=0), atol=1e-4)


# --- keras.datasets downloads -----------------------------------------------------------------------

class Mirror:
    """A local HTTP server over a directory, recording the paths asked for; ``cache`` is where keras keeps what it
    downloads."""

    def __init__(self, directory: Path, cache: Path) -> None:
        self.cache = cache
        self.requested: list[str] = []
        mirror = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the base class's name
                mirror.requested.append(self.path)
                super().do_GET()

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
                pass  # quiet: the test reads ``requested``

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                      functools.partial(Handler, directory=str(directory)))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def mirror(data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Mirror]:
    """keras.datasets downloads go to a local mirror of the real files, into an empty cache: keras's own
    ``get_file`` still fetches, checks the file's sha256 and caches it; only the origin, the cache and the hash
    (that of the local copy, which is packed differently from Google's) are replaced."""
    import keras.src.datasets.mnist as keras_mnist
    from keras.src.utils.file_utils import get_file

    cache = tmp_path / "keras-cache"
    cache.mkdir()  # keras falls back to /tmp/.keras for a cache directory that does not exist yet
    served = Mirror(data_dir, cache)

    def fetch_from_mirror(fname: str | None = None, origin: str | None = None, **kwargs: object) -> str:
        assert origin is not None and origin.startswith(KERAS_ORIGIN), origin
        name = origin.removeprefix(KERAS_ORIGIN)
        local = data_dir / name
        file_hash = hashlib.sha256(local.read_bytes()).hexdigest() if local.is_file() else None
        return get_file(fname, origin=served.url + name, file_hash=file_hash, cache_dir=str(cache))

    monkeypatch.setattr(keras_mnist, "get_file", fetch_from_mirror)
    yield served
    served.close()


def test_without_a_data_dir_mnist_is_downloaded_through_keras_datasets(mirror, data_dir):
    recipe = get_recipe("mnist")
    ds = load_dataset(recipe.dataset, recipe.input_shape, recipe.labels)
    assert mirror.requested == ["/mnist.npz"]  # fetched once, from the origin keras.datasets names
    assert list(mirror.cache.rglob("mnist.npz"))  # and kept in keras's cache
    assert ds.provenance["source"] == "keras.datasets.mnist"
    assert ds.x_train.shape == (60_000, 28, 28, 1) and ds.x_test.shape == (10_000, 28, 28, 1)
    local = load_dataset(recipe.dataset, recipe.input_shape, recipe.labels, data_dir)
    assert np.array_equal(ds.x_test, local.x_test) and np.array_equal(ds.y_train, local.y_train)


def test_a_failed_download_is_a_one_line_error_naming_data_dir(mirror, monkeypatch):
    import keras.src.datasets.mnist as keras_mnist

    fetch = keras_mnist.get_file  # the mirror has no such file: 404
    monkeypatch.setattr(keras_mnist, "get_file",
                        lambda fname=None, origin=None, **kw: fetch(fname, origin=origin.replace("mnist", "missing")))
    recipe = get_recipe("mnist")
    with pytest.raises(DataError, match=r"could not download mnist through keras\.datasets .*pass --data-dir"):
        load_dataset(recipe.dataset, recipe.input_shape, recipe.labels)
    assert mirror.requested == ["/missing.npz"]
