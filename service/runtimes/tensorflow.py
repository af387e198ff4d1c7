"""TensorFlow SavedModel backend (``CONVSERVE_RUNTIME=tensorflow``, needs the ``[tf]`` extra)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.runtimes import TensorSpec

_DATATYPES = {"float32": "FP32", "float64": "FP64", "uint8": "UINT8", "int32": "INT32", "int64": "INT64"}


class SavedModelRuntime:
    platform = "tensorflow_savedmodel"

    def __init__(self, version_dir: Path, threads: int) -> None:
        import tensorflow as tf

        try:  # thread pools can only be sized before TensorFlow's first op
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:
            pass
        self._tf = tf
        self._loaded = tf.saved_model.load(str(version_dir))
        self._signature = self._loaded.signatures["serving_default"]
        _, kwargs = self._signature.structured_input_signature
        (self._input_name, in_spec), = kwargs.items()
        out_specs = self._signature.structured_outputs

        def spec(name: str, s: tf.TensorSpec) -> TensorSpec:
            shape = tuple(-1 if d is None else int(d) for d in s.shape)
            return TensorSpec(name, _DATATYPES.get(s.dtype.name, s.dtype.name.upper()), shape)

        self.inputs = [spec(self._input_name, in_spec)]
        self.outputs = [spec(name, s) for name, s in sorted(out_specs.items())]

    def predict(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        result = self._signature(**{self._input_name: self._tf.constant(batch)})
        return {name: tensor.numpy() for name, tensor in result.items()}

    def close(self) -> None:
        self._signature = None
        self._loaded = None
