"""Facts the docs state that can drift from their source: Python minimum, training figures, portable commands."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
README = (REPO_ROOT / "README.md").read_text()


def test_readme_states_the_python_minimum_of_pyproject():
    requires = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    minimum = re.fullmatch(r">=(3\.\d+)", requires).group(1)
    assert f"Python {minimum}+ is needed" in README
    assert re.findall(r"Python (3\.\d+)\+", README) == [minimum]


def test_training_md_quotes_the_last_epoch_of_cifar10_v2_from_its_metrics():
    history = json.loads((REPO_ROOT / "models/cifar10/2/report/metrics.json").read_text())["history"]
    text = (REPO_ROOT / "docs/training.md").read_text()
    match = re.search(r"\(epoch (\d+)\) the training accuracy [^%]*?was\s+([\d.]+)% and the validation "
                      r"accuracy ([\d.]+)%", text)
    assert match, "docs/training.md no longer quotes the end of cifar10 v2's second cycle"
    epoch, train, val = int(match.group(1)), float(match.group(2)), float(match.group(3))
    assert epoch == len(history["accuracy"])
    assert (train, val) == (round(history["accuracy"][-1] * 100, 1), round(history["val_accuracy"][-1] * 100, 1))


def test_readme_commands_are_portable():
    # GNU-only flags fail on macOS and BSD: base64 -w (use `base64 < f | tr -d '\n'`), sed -i without a suffix.
    assert not re.search(r"base64 -w|sed -i ", README)


def test_training_md_table_quotes_every_bundled_versions_test_accuracy():
    text = (REPO_ROOT / "docs/training.md").read_text()
    quoted = {(name, int(version)): float(accuracy) for name, version, accuracy in
              re.findall(r"^\| `([\w-]+)` v(\d+) \| [^|]* \| \**([\d.]+)%\** \|", text, re.MULTILINE)}
    bundled = {}
    for metadata in (REPO_ROOT / "models").glob("*/*/metadata.json"):
        meta = json.loads(metadata.read_text())
        bundled[meta["name"], meta["version"]] = round(meta["test_metrics"]["accuracy"] * 100, 2)
    assert quoted == bundled



def test_the_benchmark_labels_the_shipped_config_with_what_its_config_pbtxt_sets(tmp_path):
    # docs/benchmarks.md's generated part names the bundled config's batching; the generator reads it from the file
    from bench.targets import MODEL_DIR, shipped_batching

    bundled = (MODEL_DIR / "config.pbtxt").read_text()
    assert "dynamic_batching { }" in bundled  # max_batch_size 64 and no queue delay of its own
    assert shipped_batching(MODEL_DIR) == "b64, no delay"
    delayed = tmp_path / "mnist"
    delayed.mkdir()
    (delayed / "config.pbtxt").write_text(bundled.replace("dynamic_batching { }",
                                                          "dynamic_batching { max_queue_delay_microseconds: 500 }"))
    assert shipped_batching(delayed) == "b64/500us"
    assert "500 us" not in (REPO_ROOT / "bench" / "report.py").read_text()
