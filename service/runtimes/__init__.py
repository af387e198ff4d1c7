"""One runtime interface, several backends: load a version directory, describe it, predict a batch."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: name, KServe datatype and shape (-1 for a free dimension)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


class Runtime(Protocol):
    """A loaded model. ``predict`` is called from one worker thread at a time."""

    platform: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def predict(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Run the (only) input on a float32 batch [N, ...]; return every output by name, each [N, ...]."""
        ...

    def close(self) -> None:
        """Release what the runtime holds."""
        ...


RUNTIME_FILES = {"onnx": "model.onnx", "tensorflow": "saved_model.pb"}


def runtime_problem(kind: str) -> str | None:
    """Why the named backend cannot be used (None: it can), checked once before the service starts.

    TensorFlow is imported in a child interpreter: importing it here would keep half a gigabyte in a supervisor
    that never runs a model (the workers are fresh interpreters). ONNX Runtime is a core dependency."""
    if kind != "tensorflow":
        return None
    result = subprocess.run([sys.executable, "-c", "import tensorflow"], capture_output=True, text=True)
    if result.returncode == 0:
        return None
    last = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
    return f"tensorflow cannot be imported ({last}); install the [tf] extra or use CONVSERVE_RUNTIME=onnx"


def load_runtime(kind: str, version_dir: Path, threads: int) -> Runtime:
    """Load ``version_dir`` with the named backend; TensorFlow is imported only when asked for."""
    if kind == "onnx":
        from service.runtimes.onnx import OnnxRuntime

        return OnnxRuntime(version_dir / "model.onnx", threads)
    if kind == "tensorflow":
        from service.runtimes.tensorflow import SavedModelRuntime

        return SavedModelRuntime(version_dir, threads)
    raise ValueError(f"unknown runtime {kind!r}")
