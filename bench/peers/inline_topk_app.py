"""Peer (d): the inline FastAPI app that does what convserve does per image, written as a user would.

Where peer (a) resizes whatever arrives to 28x28 and answers one class, this app does the work convserve
does for every image, in a straightforward implementation of its own:

- a digit model (``DIGIT=1``, MNIST and Fashion-MNIST style): decode to grey, invert a light background,
  crop to the ink, fit it into 20x20 keeping the aspect ratio, and centre its mass in a 28x28 canvas;
- a colour model (``DIGIT=0``, CIFAR-10): decode to RGB and resize to the model's 32x32;

then ``session.run`` inline in the handler and the top 5 classes with their labels.

Run: uvicorn bench.peers.inline_topk_app:app --port 8004 [--workers N]
(MODEL=models/mnist/1/model.onnx LABELS=models/mnist/labels.txt DIGIT=1 SIZE=28 THREADS=1).
Routes: /predict (multipart field ``file``), /predict/raw (the image as the body).
"""

import io
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, File, Request, UploadFile
from PIL import Image

options = ort.SessionOptions()
options.intra_op_num_threads = int(os.environ.get("THREADS", "1"))
session = ort.InferenceSession(os.environ.get("MODEL", "models/mnist/1/model.onnx"), options)
input_name = session.get_inputs()[0].name
labels = Path(os.environ.get("LABELS", "models/mnist/labels.txt")).read_text().split("\n")
digit = os.environ.get("DIGIT", "1") == "1"
size = int(os.environ.get("SIZE", "28"))
app = FastAPI()

INK = 30
"""Grey levels above this (after inverting a light background) count as ink when cropping."""


def normalise_digit(image: Image.Image) -> np.ndarray:
    """An MNIST-style 28x28 float32 array: light ink on black, the digit in 20x20, its mass at the centre."""
    grey = np.asarray(image.convert("L"), dtype=np.float32)
    if grey.mean() > 127:  # dark ink on light paper: make it light on dark, as MNIST is
        grey = 255.0 - grey
    rows, cols = np.nonzero(grey > INK)
    canvas = np.zeros((28, 28), dtype=np.float32)
    if rows.size == 0:
        return canvas
    crop = grey[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    height, width = crop.shape
    scale = 20.0 / max(height, width)
    fitted = Image.fromarray(crop.astype(np.uint8)).resize(
        (max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.LANCZOS)
    ink = np.asarray(fitted, dtype=np.float32)
    total = ink.sum()
    if total == 0:
        return canvas
    cy = (ink.sum(axis=1) @ np.arange(ink.shape[0])) / total
    cx = (ink.sum(axis=0) @ np.arange(ink.shape[1])) / total
    top = int(np.clip(round(13.5 - cy), 0, 28 - ink.shape[0]))
    left = int(np.clip(round(13.5 - cx), 0, 28 - ink.shape[1]))
    canvas[top:top + ink.shape[0], left:left + ink.shape[1]] = ink
    return canvas


def model_input(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    if digit:
        return normalise_digit(image)[None, :, :, None]
    return np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR),
                      dtype=np.float32)[None]


def classify(data: bytes) -> dict:
    probabilities = session.run(None, {input_name: model_input(data)})[0][0]
    best = np.argsort(probabilities)[::-1][:5]
    top = [{"class_id": int(i), "label": labels[i], "score": float(probabilities[i])} for i in best]
    return {**top[0], "top_k": top}


@app.post("/predict")
async def predict(file: UploadFile = File(...)):
    return classify(await file.read())


@app.post("/predict/raw")
async def predict_raw(request: Request):
    """The image as the whole body (Content-Type image/png or image/jpeg)."""
    return classify(await request.body())
