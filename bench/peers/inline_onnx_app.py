"""Peer (a): the minimal FastAPI app a user would write: decode with Pillow, session.run inline.

Run: uvicorn bench.peers.inline_onnx_app:app --port 8001 [--workers N] (MODEL=models/mnist/1/model.onnx).
Routes: /predict (multipart field ``file``), /predict/raw (the PNG as the body), /v2/models/mnist/infer (JSON).
"""

import io
import os

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, File, Request, UploadFile
from PIL import Image

options = ort.SessionOptions()
options.intra_op_num_threads = int(os.environ.get("THREADS", "1"))
session = ort.InferenceSession(os.environ.get("MODEL", "models/mnist/1/model.onnx"), options)
app = FastAPI()


def classify(data: bytes) -> dict:
    image = Image.open(io.BytesIO(data)).convert("L").resize((28, 28))
    x = np.asarray(image, dtype=np.float32)[None, :, :, None]
    probabilities = session.run(None, {"image": x})[0][0]
    return {"class_id": int(probabilities.argmax()), "score": float(probabilities.max())}


@app.post("/predict")
async def predict(file: UploadFile = File(...)):
    return classify(await file.read())


@app.post("/predict/raw")
async def predict_raw(request: Request):
    """The image as the whole body (Content-Type image/png)."""
    return classify(await request.body())


@app.post("/v2/models/mnist/infer")
async def infer(request: Request):
    """The Open Inference Protocol's JSON form, the one input tensor only."""
    tensor = (await request.json())["inputs"][0]
    x = np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
    probabilities = session.run(None, {"image": x})[0]
    return {"model_name": "mnist", "outputs": [{"name": "probabilities", "datatype": "FP32",
                                                "shape": list(probabilities.shape),
                                                "data": probabilities.ravel().tolist()}]}
