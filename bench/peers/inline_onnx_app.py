"""Peer (a): the minimal FastAPI app a user would write: decode with Pillow, session.run inline.

Run: uvicorn bench.peers.inline_onnx_app:app --port 8001 (MODEL=models/mnist/1/model.onnx)
"""

import io
import os

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, File, UploadFile
from PIL import Image

options = ort.SessionOptions()
options.intra_op_num_threads = int(os.environ.get("THREADS", "1"))
session = ort.InferenceSession(os.environ.get("MODEL", "models/mnist/1/model.onnx"), options)
app = FastAPI()


@app.post("/predict")
async def predict(file: UploadFile = File(...)):
    image = Image.open(io.BytesIO(await file.read())).convert("L").resize((28, 28))
    x = np.asarray(image, dtype=np.float32)[None, :, :, None]
    probabilities = session.run(None, {"image": x})[0][0]
    return {"class_id": int(probabilities.argmax()), "score": float(probabilities.max())}
