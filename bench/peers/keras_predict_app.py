"""Peer (b): the same minimal app as ``inline_onnx_app``, but with Keras ``model.predict`` per request.

The SavedModel beside the ONNX file is wrapped in a Keras 3 model (``TFSMLayer``) and every request
calls ``model.predict(x, verbose=0)`` inline, the way many tutorials serve a Keras model.

Run: uvicorn bench.peers.keras_predict_app:app --port 8002 (MODEL_DIR=models/mnist/1, THREADS=1)
"""

import io
import os

import numpy as np
import tensorflow as tf
from fastapi import FastAPI, File, UploadFile
from PIL import Image

threads = int(os.environ.get("THREADS", "1"))
tf.config.threading.set_intra_op_parallelism_threads(threads)
tf.config.threading.set_inter_op_parallelism_threads(threads)

import keras  # noqa: E402  (after the thread settings, which must precede any TensorFlow op)

layer = keras.layers.TFSMLayer(os.environ.get("MODEL_DIR", "models/mnist/1"), call_endpoint="serving_default")
model = keras.Sequential([keras.Input((28, 28, 1)), layer])
app = FastAPI()


@app.post("/predict")
async def predict(file: UploadFile = File(...)):
    image = Image.open(io.BytesIO(await file.read())).convert("L").resize((28, 28))
    x = np.asarray(image, dtype=np.float32)[None, :, :, None]
    probabilities = model.predict(x, verbose=0)["probabilities"][0]
    return {"class_id": int(probabilities.argmax()), "score": float(probabilities.max())}
