"""``python -m bench.agreement``: how often the bundled versions of a model give the same top-1 class, on the
model's whole test set (ONNX exports), next to each version's test accuracy: the figures behind
``CONVSERVE_ROLLOUT_MIN_AGREEMENT``'s default (docs/rollout.md).
"""

from __future__ import annotations

import argparse
import json
from itertools import combinations
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bench.targets import ROOT
from training.data import load_dataset

MODELS = {"mnist": ("mnist", (28, 28, 1)), "fashion-mnist": ("fashion-mnist", (28, 28, 1)),
          "cifar10": ("cifar10", (32, 32, 3))}


def top1(model_dir: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + 512]})[0] for i in range(0, len(x), 512)]).argmax(1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.agreement", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "datasets")
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    args = parser.parse_args(argv)
    for model in args.models:
        dataset, shape = MODELS[model]
        root = ROOT / "models" / model
        versions = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit())
        if len(versions) < 2:
            print(f"{model}: one version, nothing to compare")
            continue
        labels = json.loads((root / str(versions[0]) / "metadata.json").read_text())["labels"]
        data = load_dataset(dataset, shape, labels, data_dir=args.data_dir)
        x = data.x_test.astype(np.float32)
        answers = {v: top1(root / str(v), x) for v in versions}
        for v in versions:
            print(f"{model} v{v}: test accuracy {np.mean(answers[v] == data.y_test):.4f}")
        for a, b in combinations(versions, 2):
            print(f"{model} v{a} / v{b}: top-1 agreement {np.mean(answers[a] == answers[b]):.4f}")


if __name__ == "__main__":
    main()
