"""Peer (c): a minimal BentoML service serving the same ONNX model.

The upload arrives as multipart form field ``file``; BentoML decodes it with Pillow (the ``Image``
annotation) and the handler runs onnxruntime inline. It runs in its own virtual environment
(``bench/.venv-bentoml``) so BentoML's dependencies cannot disturb the project's.

Run: bench/.venv-bentoml/bin/bentoml serve bench.peers.bento_service:MnistOnnx --port 8003
(MODEL=models/mnist/1/model.onnx, THREADS=1)
"""

import os

import bentoml
import numpy as np
from PIL.Image import Image


@bentoml.service(workers=1, logging={"access": {"enabled": False}})
class MnistOnnx:
    def __init__(self) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(os.environ.get("THREADS", "1"))
        self.session = ort.InferenceSession(os.environ.get("MODEL", "models/mnist/1/model.onnx"), options)

    @bentoml.api
    def predict(self, file: Image) -> dict:
        x = np.asarray(file.convert("L").resize((28, 28)), dtype=np.float32)[None, :, :, None]
        probabilities = self.session.run(None, {"image": x})[0][0]
        return {"class_id": int(probabilities.argmax()), "score": float(probabilities.max())}
