"""Image uploads to model inputs: safe decoding, mode conversion, resizing, MNIST-style digits.

Decoding is bounded before any pixel is touched: the encoded size, then the declared
width x height (a decompression bomb is refused from its header). Digit models get the
classic MNIST normalisation, so a photo of a digit on paper looks like an MNIST sample.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.errors import InvalidInput, PayloadTooLarge

MNIST_BOX = 20  # MNIST digits are fitted into 20x20 ...
MNIST_SIZE = 28  # ... and centred by centre of mass in 28x28


@dataclass(frozen=True)
class ImageSpec:
    """What a model wants: size, channels, and whether to normalise like MNIST."""

    height: int
    width: int
    channels: int
    digit: bool = False


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int
    max_pixels: int


def decode_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """Decode the first frame of an encoded image under the byte and pixel limits."""
    if not data:
        raise InvalidInput("empty image")
    if len(data) > limits.max_bytes:
        raise PayloadTooLarge(f"image of {len(data)} bytes exceeds the limit of {limits.max_bytes} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > limits.max_pixels:
                raise PayloadTooLarge(f"image of {width}x{height} pixels exceeds the limit of "
                                      f"{limits.max_pixels} pixels")
            if width < 1 or height < 1:
                raise InvalidInput("image has no pixels")
            img.seek(0)  # first frame of an animation
            img.load()
            return ImageOps.exif_transpose(img) or img
    except (PayloadTooLarge, InvalidInput):
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        if isinstance(exc, UnidentifiedImageError):
            raise InvalidInput("not a decodable image (supported: PNG, JPEG, GIF, BMP, WebP, TIFF)") from None
        raise PayloadTooLarge("image exceeds the pixel limit") from None
    except Exception as exc:  # truncated or corrupt data surfaces as many error types
        raise InvalidInput(f"corrupt or truncated image ({exc.__class__.__name__})") from None


def to_gray_or_rgb(img: Image.Image, channels: int) -> np.ndarray:
    """Any Pillow mode to uint8 L or RGB; transparency is composited on white, 16-bit is scaled."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        if img.mode == "F" and arr.max() <= 1.0:
            top = 1.0
        img = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    img = img.convert("L" if channels == 1 else "RGB")
    arr = np.asarray(img, dtype=np.uint8)
    return arr[..., None] if channels == 1 else arr


def normalise_digit(gray: np.ndarray) -> np.ndarray:
    """MNIST-style normalisation of a grayscale digit image [H, W] uint8 to [28, 28] float32.

    Dark ink on light paper is inverted; the paper's level and noise are removed; the ink's
    bounding box is fitted into 20x20 keeping its aspect ratio and pasted into 28x28 so that its centre
    of mass sits at the centre.
    """
    img = gray.astype(np.float32)
    if _border(img).mean() > 127:  # light background: dark ink on paper
        img = 255.0 - img
    # Ink is what stands clearly above the paper's level and noise, judged on a lightly blurred
    # copy so that isolated noise pixels (paper grain, JPEG artefacts) do not count as ink.
    blurred = _blur(img)
    border = _border(blurred)
    background = float(np.median(border))
    noise = 1.4826 * float(np.median(np.abs(border - background)))
    peak = float(blurred.max())
    if peak - background <= 8 * max(noise, 1.0):
        return np.zeros((MNIST_SIZE, MNIST_SIZE), dtype=np.float32)  # blank: nothing stands out
    ink = blurred > background + max(4 * noise, 0.2 * (peak - background))
    img = np.where(ink, np.clip(img - background, 0, None), 0.0)
    img *= 255.0 / max(float(np.percentile(img[ink], 99)), 1.0)
    img = np.clip(img, 0, 255)
    ys, xs = np.nonzero(ink)
    img = img[ys.min():ys.max() + 1, xs.min():xs.max() + 1]

    h, w = img.shape
    scale = MNIST_BOX / max(h, w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BILINEAR
    box = np.asarray(Image.fromarray(img, "F").resize((new_w, new_h), resample), dtype=np.float32)
    box = np.clip(box, 0, 255)

    canvas = np.zeros((MNIST_SIZE, MNIST_SIZE), dtype=np.float32)
    top, left = (MNIST_SIZE - new_h) // 2, (MNIST_SIZE - new_w) // 2
    canvas[top:top + new_h, left:left + new_w] = box
    total = canvas.sum()
    if total > 0:
        rows, cols = np.indices(canvas.shape)
        cy, cx = (rows * canvas).sum() / total, (cols * canvas).sum() / total
        shift_y = int(np.clip(round(MNIST_SIZE / 2 - 0.5 - cy), -top, MNIST_SIZE - new_h - top))
        shift_x = int(np.clip(round(MNIST_SIZE / 2 - 0.5 - cx), -left, MNIST_SIZE - new_w - left))
        canvas = np.roll(canvas, (shift_y, shift_x), axis=(0, 1))
    return canvas


def _blur(img: np.ndarray) -> np.ndarray:
    """A separable binomial blur (about a Gaussian of sigma 1), edges replicated."""
    kernel = np.array([1, 4, 6, 4, 1], dtype=np.float32) / 16
    padded = np.pad(img, 2, mode="edge")
    rows = sum(k * padded[:, i:i + img.shape[1]] for i, k in enumerate(kernel))
    return sum(k * rows[i:i + img.shape[0], :] for i, k in enumerate(kernel))


def _border(img: np.ndarray) -> np.ndarray:
    return np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])


def image_to_input(img: Image.Image, spec: ImageSpec) -> np.ndarray:
    """A decoded image to one model input row [H, W, C] float32 of raw 0..255 pixels."""
    if spec.digit and spec.channels == 1 and (spec.height, spec.width) == (MNIST_SIZE, MNIST_SIZE):
        gray = to_gray_or_rgb(img, 1)[..., 0]
        return normalise_digit(gray)[..., None]
    arr = to_gray_or_rgb(img, spec.channels)
    if arr.shape[:2] != (spec.height, spec.width):
        mode = "L" if spec.channels == 1 else "RGB"
        resized = Image.fromarray(arr[..., 0] if spec.channels == 1 else arr, mode).resize(
            (spec.width, spec.height), Image.Resampling.BILINEAR, reducing_gap=3.0)
        arr = np.asarray(resized, dtype=np.uint8).reshape(spec.height, spec.width, spec.channels)
    return arr.astype(np.float32)


def preprocess(data: bytes, spec: ImageSpec, limits: ImageLimits) -> np.ndarray:
    """Encoded image bytes to one model input row."""
    img = decode_image(data, limits)
    try:
        return image_to_input(img, spec)
    finally:
        img.close()
