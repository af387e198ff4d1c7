"""The tests' expected answers, worked out from the models' documented contract, never from ``service``.

A model version's metadata.json says what it takes (``input``: raw 0..255 pixels as float32, shape
``[-1, H, W, C]``; ``digit``: MNIST normalisation first, as the README describes it), and its model.onnx, run
here by onnxruntime directly, says what it answers (``probabilities``, already a softmax). An image whose model
input that contract does not pin down (a photo to denoise, a size to resample, a mode to convert) is refused with
:class:`Unreproducible` rather than guessed at: the oracle would only be copying the service's choices.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

MNIST_SIZE = 28  # the README: the ink is "fitted into 20x20 and centred by centre of mass in 28x28"
MNIST_BOX = 20
CENTRE = (MNIST_SIZE - 1) / 2  # the middle of pixels 0..27


class Unreproducible(ValueError):
    """The contract leaves this image's model input to the service's own choices."""


def decode(data: bytes, channels: int) -> np.ndarray:
    """An encoded grayscale (``channels`` 1) or RGB (3) image as uint8 [H, W, C], exactly as stored."""
    with Image.open(io.BytesIO(data)) as img:
        mode = "L" if channels == 1 else "RGB"
        if img.mode != mode:
            raise Unreproducible(f"a {img.mode} image for a {mode} model: the conversion is the service's choice")
        return np.asarray(img, dtype=np.uint8).reshape(img.height, img.width, channels)


def mnist_digit(gray: np.ndarray) -> np.ndarray:
    """A clean digit (uniform border: an MNIST sample or a drawing) [H, W] uint8, MNIST-normalised to [28, 28]
    float32 as the README states it: dark ink on light paper inverted, the background removed, the ink cropped,
    fitted into 20x20 and centred by centre of mass in 28x28; and its strongest ink made white (255), as in MNIST.

    Only ink already 20 pixels on its longer side is taken: fitting anything else resamples it, with a filter the
    contract does not name. All the committed MNIST test digits are such ink.
    """
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]]).astype(np.int32)
    if border.min() != border.max():
        raise Unreproducible("a noisy border (a photo or a scan): telling ink from paper is the service's choice")
    ink = gray.astype(np.int32)
    paper = int(border[0])
    if paper > 127:  # dark ink on light paper
        ink, paper = 255 - ink, 255 - paper
    ink = np.clip(ink - paper, 0, 255)
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    canvas = np.zeros((MNIST_SIZE, MNIST_SIZE), np.float32)
    if rows.size == 0:
        return canvas  # no ink at all
    ink = ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    if max(ink.shape) != MNIST_BOX:
        raise Unreproducible(f"ink of {ink.shape[0]}x{ink.shape[1]} pixels would be resampled to fit 20x20")
    ink = np.round(ink * (255 / ink.max()))
    height, width = ink.shape
    cy = (ink.sum(axis=1) @ np.arange(height)) / ink.sum()
    cx = (ink.sum(axis=0) @ np.arange(width)) / ink.sum()
    top = int(np.clip(np.rint(CENTRE - cy), 0, MNIST_SIZE - height))
    left = int(np.clip(np.rint(CENTRE - cx), 0, MNIST_SIZE - width))
    canvas[top:top + height, left:left + width] = ink
    return canvas


class Oracle:
    """One model version as its own files describe it: metadata.json's input, model.onnx under onnxruntime."""

    def __init__(self, version_dir: Path) -> None:
        self.metadata = json.loads((version_dir / "metadata.json").read_text())
        spec = self.metadata["input"]
        assert spec["datatype"] == "FP32" and spec.get("range", [0, 255]) == [0, 255], spec
        self.input_name = spec["name"]
        self.output_name = self.metadata.get("output", {}).get("name", "probabilities")
        _, self.height, self.width, self.channels = spec["shape"]
        self.digit = bool(self.metadata.get("digit"))
        self.session = ort.InferenceSession(str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"])

    def model_input(self, data: bytes) -> np.ndarray:
        """One encoded image as the model's input row [H, W, C] float32 of raw pixels."""
        pixels = decode(data, self.channels)
        if self.digit and self.channels == 1 and (self.height, self.width) == (MNIST_SIZE, MNIST_SIZE):
            return mnist_digit(pixels[..., 0])[..., None]
        if pixels.shape[:2] != (self.height, self.width):
            raise Unreproducible(f"a {pixels.shape[1]}x{pixels.shape[0]} image for a {self.width}x{self.height} "
                                 f"model: the resampling filter is the service's choice")
        return pixels.astype(np.float32)

    def reproducible(self, images: list[bytes]) -> list[int]:
        """The indices of the images whose model input the contract pins down (the others raise in :meth:`rows`)."""
        kept = []
        for i, data in enumerate(images):
            try:
                self.model_input(data)
            except Unreproducible:
                continue
            kept.append(i)
        return kept

    def rows(self, images: list[bytes]) -> np.ndarray:
        """Encoded images as a model input batch [N, H, W, C] float32."""
        return np.stack([self.model_input(data) for data in images])

    def run(self, rows: np.ndarray) -> np.ndarray:
        """The model's probabilities [N, classes] for input rows."""
        return self.session.run([self.output_name], {self.input_name: rows})[0]

    def probabilities(self, images: list[bytes]) -> np.ndarray:
        """The model's probabilities [N, classes] for encoded images."""
        return self.run(self.rows(images))
