"""ONNX Runtime backend (the default): CPU provider, explicit thread counts, full graph optimisation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.runtimes import TensorSpec

# ONNX Runtime's type strings, as KServe v2 datatypes.
_DATATYPES = {
    "tensor(float)": "FP32", "tensor(double)": "FP64", "tensor(float16)": "FP16",
    "tensor(uint8)": "UINT8", "tensor(int8)": "INT8", "tensor(int16)": "INT16",
    "tensor(int32)": "INT32", "tensor(int64)": "INT64", "tensor(bool)": "BOOL",
    "tensor(string)": "BYTES",
}


def _spec(arg: ort.NodeArg) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) and d > 0 else -1 for d in arg.shape)
    return TensorSpec(arg.name, _DATATYPES.get(arg.type, arg.type), shape)


class OnnxRuntime:
    platform = "onnxruntime_onnx"

    def __init__(self, path: Path, threads: int) -> None:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Loading a session reads only this file (and external data beside it); no URLs.
        self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = [_spec(i) for i in self._session.get_inputs()]
        self.outputs = [_spec(o) for o in self._session.get_outputs()]
        self._input_name = self.inputs[0].name
        self._output_names = [o.name for o in self.outputs]

    def predict(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(self._output_names, self._session.run(self._output_names, {self._input_name: batch})))

    def close(self) -> None:
        self._session = None  # type: ignore[assignment]
