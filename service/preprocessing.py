"""Image uploads to model inputs: safe decoding, mode conversion, resizing, MNIST-style digits.

Decoding is bounded before any pixel is touched: the encoded size, then the declared
width x height (a decompression bomb is refused from its header), the number of JPEG scans
(each one a pass over the whole image), and the pixels of all of a request's images together.
Digit models get the classic MNIST normalisation, so a photo of a digit on paper looks like
an MNIST sample.
"""

from __future__ import annotations

import contextlib
import functools
import io
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from service.errors import InvalidInput, PayloadTooLarge, ServingError

MNIST_BOX = 20  # MNIST digits are fitted into 20x20 ...
MNIST_SIZE = 28  # ... and centred by centre of mass in 28x28
_BLUR = ImageFilter.GaussianBlur(1)
_POSITIONS = np.arange(MNIST_BOX, dtype=np.float32)  # pixel indices, for centres of mass
# The encoded formats accepted. Only their decoders are ever tried, so Pillow's many others (PPM, PCX, ICO,
# EPS, PSD, ...) stay out of reach of uploads. MPO is the multi-picture JPEG that cameras write; the JPEG
# decoder opens it under that name.
ACCEPTED_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")
OPENED_AS = (*ACCEPTED_FORMATS, "MPO")
SUPPORTED = "supported: PNG, JPEG, GIF, BMP, WebP, TIFF"


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
    max_jpeg_scans: int = 32
    max_request_pixels: int | None = None
    """Pixels of all the images of one request together (None: only the per-image limit)."""


@dataclass
class OpenedImage:
    """An image whose header has passed the limits, not yet decoded, and the work its decoding costs."""

    image: Image.Image
    work: int
    """Declared pixels, times the scans of a JPEG (each scan of a progressive JPEG is a pass over the image), times
    the decoder's cost per pixel (:data:`CODEC_COST`)."""


CODEC_COST = {"bmp_rle": 100}
"""Decoders that cost far more per pixel than the others, by how much: Pillow decodes RLE-compressed BMP in Python,
pixel by pixel where a row ends early (its end-of-line padding) and in RLE4 runs, about 100 ns a pixel against about
1 for the C decoders. Such an image counts as that many pixels of work, and may declare at most ``max_pixels`` of
work: a 10 KB RLE BMP declaring 5000x5000 took seconds of a decode thread."""

SOS = b"\xff\xda"  # start of scan: in entropy-coded data a 0xFF byte is always followed by 0x00 or a restart marker


@functools.cache
def _decoders() -> tuple[str, ...]:
    """The accepted formats this Pillow build can decode (naming one it lacks would fail every upload)."""
    Image.init()
    return tuple(f for f in ACCEPTED_FORMATS if f in Image.OPEN)


def open_image(data: bytes, limits: ImageLimits) -> OpenedImage:
    """Read an encoded image's header and check it against the limits; nothing is decoded yet."""
    if not data:
        raise InvalidInput("empty image")
    if len(data) > limits.max_bytes:
        raise PayloadTooLarge(f"image of {len(data)} bytes exceeds the limit of {limits.max_bytes} bytes")
    with _decoder_errors():
        with warnings.catch_warnings():  # Pillow warns of a bomb when it opens one (only then)
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=_decoders())
        if img.format not in OPENED_AS:
            raise InvalidInput(f"image format {img.format} is not accepted ({SUPPORTED})")
        width, height = img.size
        if width * height > limits.max_pixels:
            raise PayloadTooLarge(f"image of {width}x{height} pixels exceeds the limit of "
                                  f"{limits.max_pixels} pixels")
        if width < 1 or height < 1:
            raise InvalidInput("image has no pixels")
        scans = data.count(SOS) if img.format in ("JPEG", "MPO") else 1
        if scans > limits.max_jpeg_scans:
            raise PayloadTooLarge(f"JPEG with {scans} scans exceeds the limit of {limits.max_jpeg_scans} scans "
                                  f"(encoders write about a dozen at most)")
        cost = max((CODEC_COST.get(tile[0], 1) for tile in img.tile), default=1)
        if width * height * cost > limits.max_pixels:
            raise PayloadTooLarge(f"{img.format} image of {width}x{height} pixels compressed as "
                                  f"{img.tile[0][0]} exceeds the limit of {limits.max_pixels // cost} pixels for that "
                                  f"encoding (its decoder costs about {cost} times as much per pixel)")
        return OpenedImage(img, width * height * max(1, scans) * cost)


def open_images(images: list[bytes], limits: ImageLimits) -> list[OpenedImage]:
    """Open every image of a request (headers only) and check their pixels together against the request's
    budget, before any of them is decoded."""
    opened: list[OpenedImage] = []
    total = 0
    try:
        for i, data in enumerate(images):
            try:
                opened.append(open_image(data, limits))
            except ServingError as exc:
                raise _numbered(exc, i, len(images)) from None
            width, height = opened[-1].image.size
            total += width * height
            if limits.max_request_pixels is not None and total > limits.max_request_pixels:
                raise PayloadTooLarge(f"images of {total} pixels in all (up to image {i}) exceed the limit of "
                                      f"{limits.max_request_pixels} pixels per request")
    except BaseException:
        for item in opened:
            item.image.close()
        raise
    return opened


def load_image(img: Image.Image) -> Image.Image:
    """Decode the first frame of an opened image, upright (EXIF orientation)."""
    with _decoder_errors():
        img.seek(0)  # first frame of an animation
        img.load()
        ImageOps.exif_transpose(img, in_place=True)  # not a copy: without in_place every image was copied
        return img


def decode_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """Decode the first frame of an encoded image under the byte, pixel and scan limits."""
    return load_image(open_image(data, limits).image)


def images_to_rows(opened: list[OpenedImage], spec: ImageSpec, check: Callable[[], None] | None = None) -> np.ndarray:
    """Decode opened images into model input rows [N, H, W, C]; ``check()`` runs before each image (it raises
    to stop: the request's deadline passed, its client left)."""
    rows = np.empty((len(opened), spec.height, spec.width, spec.channels), dtype=np.float32)
    try:
        for i, item in enumerate(opened):
            if check is not None:
                check()
            try:
                rows[i] = _to_row(item.image, spec)
            except ServingError as exc:
                raise _numbered(exc, i, len(opened)) from None
    finally:
        for item in opened:
            item.image.close()
    return rows


def _numbered(exc: ServingError, index: int, count: int) -> ServingError:
    """A client error prefixed with the image it is about, when a request has several."""
    if count > 1:
        exc.message = f"image {index}: {exc.message}"
    return exc


@contextlib.contextmanager
def _decoder_errors() -> Iterator[None]:
    """Pillow's many failure types as client errors: a bad upload is the client's fault, never a 500."""
    try:
        yield
    except (PayloadTooLarge, InvalidInput):
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        if isinstance(exc, UnidentifiedImageError):
            raise InvalidInput(f"not a decodable image ({SUPPORTED})") from None
        raise PayloadTooLarge("image exceeds the pixel limit") from None
    except Exception as exc:  # truncated or corrupt data surfaces as many error types
        raise InvalidInput(f"corrupt or truncated image ({exc.__class__.__name__})") from None


WIDE_BAND_ROWS = 256


def _wide_to_gray(img: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float image to 8-bit L, with no temporary wider than the image's own pixels:
    16-bit by its high byte; ``I`` and ``F`` scaled by their maximum (``F`` up to 1.0 as 0..1) in place, in float32.
    (Through float64 and full-size temporaries a 49 KB 16-bit 5000x5000 PNG cost 678 MB.)"""
    width, height = img.size
    out = np.empty((height, width), np.uint8)
    bands = [(top, min(top + WIDE_BAND_ROWS, height)) for top in range(0, height, WIDE_BAND_ROWS)]
    if img.mode.startswith("I;16"):
        for top, bottom in bands:  # a band at a time: numpy's copy of a band, not of the image
            out[top:bottom] = np.asarray(img.crop((0, top, width, bottom))) >> 8
        return Image.fromarray(out, "L")
    peak = float(img.getextrema()[1])  # Pillow's own pass over the pixels: no copy
    scale = 255.0 if img.mode == "F" and peak <= 1.0 else 255.0 / max(peak, 1.0)
    for top, bottom in bands:
        band = np.asarray(img.crop((0, top, width, bottom)), np.float32) * scale
        out[top:bottom] = np.clip(band, 0, 255, out=band)
    return Image.fromarray(out, "L")


def to_gray_or_rgb(img: Image.Image, channels: int) -> np.ndarray:
    """Any Pillow mode to uint8 L or RGB; transparency is composited on a background that contrasts with what is
    drawn, 16-bit is scaled."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        img = _wide_to_gray(img)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    mode = "L" if channels == 1 else "RGB"
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Pasted through its alpha onto a background in the target mode: one image of the output's size besides the
        # input (alpha_composite needed two more RGBA copies: 300 MB for a 5000x5000 image).
        # The background contrasts with what is drawn: white, unless the opaque pixels are light (white ink on a
        # transparent background, which on white would be a blank image answered with confidence), then black.
        premultiplied = img.mode in ("RGBa", "La")
        source = img.convert("RGBA" if premultiplied or img.mode == "PA" else img.mode)
        alpha = source.getchannel("A")
        colour = source.convert(mode)
        weights = np.asarray(alpha, np.float32)
        drawn = float(weights.sum())
        luminance = colour if mode == "L" else colour.convert("L")
        light = drawn > 0 and float((np.asarray(luminance, np.float32) * weights).sum()) / drawn > 127.5
        paper = 0 if light else 255
        canvas = Image.new(mode, source.size, paper if mode == "L" else (paper,) * 3)
        canvas.paste(colour, (0, 0), alpha)
        img = canvas
    if img.mode != mode:  # (converting to the same mode would only copy)
        img = img.convert(mode)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[..., None] if channels == 1 else arr


def normalise_digit(gray: np.ndarray) -> np.ndarray:
    """MNIST-style normalisation of a grayscale digit image [H, W] uint8 to [28, 28] float32.

    Dark ink on light paper is inverted; the paper's level and noise are removed; the ink's
    bounding box is fitted into 20x20 keeping its aspect ratio and pasted into 28x28 so that
    its centre of mass sits at the centre.
    """
    border = _border(gray)
    if border.mean() > 127:  # light background: dark ink on paper
        gray = 255 - gray
        border = 255 - border
    if border.min() == border.max():
        return _normalise_clean(gray, int(border[0]))
    # A photo or scan: ink is what stands clearly above the paper's level and noise, judged on
    # a blurred copy so that isolated noise pixels (grain, JPEG artefacts) do not count.
    blurred = np.asarray(Image.fromarray(gray, "L").filter(_BLUR), dtype=np.float32)
    border = _border(blurred)
    background = float(np.median(border))
    noise = 1.4826 * float(np.median(np.abs(border - background)))
    peak = float(blurred.max())
    if peak - background <= 8 * max(noise, 1.0):
        return np.zeros((MNIST_SIZE, MNIST_SIZE), dtype=np.float32)  # blank: nothing stands out
    ink = blurred > background + max(4 * noise, 0.2 * (peak - background))
    rows = np.flatnonzero(ink.any(axis=1))
    cols = np.flatnonzero(ink.any(axis=0))
    crop = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    img = gray[crop].astype(np.float32) - background
    ink = ink[crop]
    img[~ink] = 0.0
    values = img[ink]
    k = int(0.99 * (values.size - 1))
    img *= 255.0 / max(float(np.partition(values, k)[k]), 1.0)  # the ink's 99th percentile becomes white
    np.minimum(img, 255.0, out=img)  # (np.clip costs several times more on small arrays)

    return _fit_and_centre(Image.fromarray(img, "F"))


@functools.cache
def _stretch(peak: int) -> np.ndarray:
    """Lookup table that makes ink of strength ``peak`` white: v -> min(255, round(v * 255 / peak))."""
    return np.minimum(255, np.round(np.arange(256) * (255 / peak))).astype(np.uint8)


def _normalise_clean(gray: np.ndarray, background: int) -> np.ndarray:
    """A clean digital image (an MNIST sample, a drawing; uniform border): everything off the
    background is ink. This is the hot path: it stays in numpy until the one resize."""
    if background:
        gray = np.subtract(gray, background, dtype=np.int16).clip(0).astype(np.uint8)
    rows = np.flatnonzero(gray.any(axis=1))
    if rows.size == 0:
        return np.zeros((MNIST_SIZE, MNIST_SIZE), dtype=np.float32)
    cols = np.flatnonzero(gray.any(axis=0))
    crop = gray[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    peak = int(crop.max())
    if peak < 255:  # make the strongest ink white, as in MNIST
        crop = _stretch(peak)[crop]
    h, w = crop.shape
    scale = MNIST_BOX / max(h, w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BILINEAR
    box = _weights(h, new_h, resample) @ crop.astype(np.float32) @ _weights(w, new_w, resample).T
    return _centre(np.rint(np.clip(box, 0.0, 255.0, out=box), out=box))


@functools.lru_cache(maxsize=512)
def _weights(size: int, new_size: int, resample: Image.Resampling) -> np.ndarray:
    """Pillow's own resampling weights along one axis, as a [new_size, size] matrix.

    Read off Pillow by resizing an identity image in float mode, so resizing with two matrix
    products gives Pillow's result (to within its 8-bit rounding) without a round trip
    through Pillow images for every upload.
    """
    identity = Image.fromarray(np.eye(size, dtype=np.float32), "F")
    return np.asarray(identity.resize((new_size, size), resample), dtype=np.float32).T.copy()


def _fit_and_centre(ink: Image.Image) -> np.ndarray:
    """Fit the cropped ink into 20x20 keeping its aspect ratio; place it in 28x28 so that its
    centre of mass lands on the centre."""
    w, h = ink.size
    scale = MNIST_BOX / max(h, w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BILINEAR
    box = np.asarray(ink.resize((new_w, new_h), resample), dtype=np.float32)
    if ink.mode == "F":
        box = np.maximum(np.minimum(box, 255.0), 0.0)  # Lanczos over- and undershoots (8-bit saturates)
    return _centre(box)


def _centre(box: np.ndarray) -> np.ndarray:
    """Place fitted ink [h, w] (at most 20x20) in 28x28 with its centre of mass at the centre."""
    new_h, new_w = box.shape
    row_mass = box.sum(axis=1)
    total = float(row_mass.sum()) or 1.0
    cy = float(row_mass @ _POSITIONS[:new_h]) / total
    cx = float(box.sum(axis=0) @ _POSITIONS[:new_w]) / total
    top = min(max(round((MNIST_SIZE - 1) / 2 - cy), 0), MNIST_SIZE - new_h)
    left = min(max(round((MNIST_SIZE - 1) / 2 - cx), 0), MNIST_SIZE - new_w)
    canvas = np.zeros((MNIST_SIZE, MNIST_SIZE), dtype=np.float32)
    canvas[top:top + new_h, left:left + new_w] = box
    return canvas


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
    opened = open_image(data, limits)
    try:
        return _to_row(opened.image, spec)
    finally:
        opened.image.close()


REDUCE_ABOVE = 2048
"""Images larger than this on their longest side are first box-reduced (Pillow's ``reduce``) to at most it: every
model input is tens of pixels a side, and the conversions after decoding (mode, compositing, the digit's
normalisation) would otherwise each make a full-size copy: hundreds of MB for one 5000x5000 upload."""


def reduced(img: Image.Image) -> Image.Image:
    """``img`` box-reduced by a whole factor so that its longest side is at most :data:`REDUCE_ABOVE`."""
    factor = -(-max(img.size) // REDUCE_ABOVE)
    if factor <= 1:
        return img
    try:
        return img.reduce(factor)
    except ValueError:  # a mode reduce does not take (P, 1, ...): converted at full size, as before
        return img


def _to_row(opened: Image.Image, spec: ImageSpec) -> np.ndarray:
    img = load_image(opened)
    try:
        small = reduced(img)
        if small is not img:
            img.close()
            img = small
        return image_to_input(img, spec)
    except (ValueError, OSError):  # a mode Pillow cannot convert (LAB, ...): a bad upload, not a server fault
        target = "grayscale" if spec.channels == 1 else "RGB"
        raise InvalidInput(f"cannot convert a {img.mode} image to {target}") from None
    finally:
        img.close()
