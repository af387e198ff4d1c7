"""Image preprocessing: safe decoding, every Pillow mode, EXIF, resizing and MNIST-style digits."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from service.errors import InvalidInput, PayloadTooLarge
from service.preprocessing import ImageLimits, ImageSpec, decode_image, normalise_digit, preprocess
from tests.support.missing import local_datasets, missing

LIMITS = ImageLimits(max_bytes=10_000_000, max_pixels=50_000_000)
RGB32 = ImageSpec(32, 32, 3)
GRAY28 = ImageSpec(28, 28, 1)
DIGIT = ImageSpec(28, 28, 1, digit=True)


def encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


# The colour (200, 50, 25) saved in each mode, and the pixel values each model input must get: (R, G, B) and gray.
# Its luma (ITU-R 601-2, what Pillow's "L" uses) is 92. "1" and "P" are dithered (checked on average);
# 16-bit is scaled from 65535, so 92 is nearly black; 32-bit "I" and "F" have no fixed range and are scaled
# by their maximum, so a uniform image becomes white.
MODE_VALUES = {
    "1": ((92, 92, 92), 92), "L": ((92, 92, 92), 92), "LA": ((92, 92, 92), 92), "P": ((200, 50, 25), 92),
    "RGB": ((200, 50, 25), 92), "RGBA": ((200, 50, 25), 92), "CMYK": ((200, 50, 25), 92),
    "I;16": ((0, 0, 0), 0), "I": ((255, 255, 255), 255), "F": ((255, 255, 255), 255),
}
DITHERED = ("1", "P")


@pytest.mark.parametrize("mode", list(MODE_VALUES))
def test_every_mode_converts_to_rgb_and_gray(mode):
    img = Image.new("RGB", (40, 30), (200, 50, 25)).convert(mode)
    fmt = "TIFF" if mode in ("I;16", "I", "F", "CMYK") else "PNG"
    data = encode(img, fmt)
    rgb = preprocess(data, RGB32, LIMITS)
    gray = preprocess(data, GRAY28, LIMITS)
    assert rgb.shape == (32, 32, 3) and rgb.dtype == np.float32
    assert gray.shape == (28, 28, 1) and gray.dtype == np.float32
    (r, g, b), luma = MODE_VALUES[mode]
    if mode in DITHERED:  # a pattern of palette colours whose average is the colour
        np.testing.assert_allclose(rgb.mean(axis=(0, 1)), (r, g, b), atol=3)
        assert gray.mean() == pytest.approx(luma, abs=3)
    else:
        assert np.unique(rgb.reshape(-1, 3), axis=0).tolist() == [[r, g, b]]
        assert np.unique(gray).tolist() == [luma]


def test_transparent_pixels_become_white():
    img = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    rgb = preprocess(encode(img), RGB32, LIMITS)
    assert rgb.min() == 255


def test_sixteen_bit_images_are_scaled_to_eight_bits():
    img = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
    assert preprocess(encode(img), GRAY28, LIMITS).max() == 255


def test_exif_orientation_is_honoured():
    base = np.zeros((20, 40, 3), dtype=np.uint8)
    base[:, :20] = 255  # left half white
    img = Image.fromarray(base)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    data = encode(img, "JPEG", exif=exif, quality=95)
    decoded = decode_image(data, LIMITS)
    assert decoded.size == (20, 40)  # width and height swapped
    arr = np.asarray(decoded.convert("L"))
    assert arr[:20].mean() > 200 and arr[20:].mean() < 50  # the white half is now on top


def test_animated_gif_uses_first_frame():
    frames = [Image.new("L", (16, 16), 255), Image.new("L", (16, 16), 0)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    assert preprocess(buffer.getvalue(), GRAY28, LIMITS).min() > 200


def test_decode_rejects_empty_and_garbage():
    with pytest.raises(InvalidInput, match="empty"):
        decode_image(b"", LIMITS)
    with pytest.raises(InvalidInput, match="not a decodable image"):
        decode_image(b"definitely not an image", LIMITS)


def test_decode_rejects_truncated_jpeg():
    data = encode(Image.new("RGB", (64, 64), (10, 20, 30)), "JPEG")
    with pytest.raises(InvalidInput, match="corrupt or truncated"):
        decode_image(data[: len(data) // 3], LIMITS)


def test_decode_refuses_too_many_pixels_from_the_header():
    data = encode(Image.new("1", (5000, 5000)))
    with pytest.raises(PayloadTooLarge, match="pixels"):
        decode_image(data, ImageLimits(max_bytes=10_000_000, max_pixels=1_000_000))


def test_decode_refuses_too_many_bytes():
    with pytest.raises(PayloadTooLarge, match="bytes"):
        decode_image(b"x" * 2000, ImageLimits(max_bytes=1000, max_pixels=10))


def test_normalise_digit_inverts_dark_ink_on_light_paper():
    paper = np.full((100, 80), 230, dtype=np.uint8)
    paper[20:80, 35:45] = 20  # a dark vertical stroke: a "1"
    out = normalise_digit(paper)
    assert out.shape == (28, 28)
    assert out[0].max() == 0 and out[:, 0].max() == 0  # background is black
    assert out.max() > 200  # ink is bright
    rows, cols = np.nonzero(out > 50)
    assert rows.max() - rows.min() + 1 == 20  # the tall side fits 20 pixels
    assert abs(np.average(np.arange(28), weights=out.sum(0)) - 13.5) < 1.0  # centred by mass


def test_normalise_digit_blank_image_stays_blank():
    assert normalise_digit(np.full((50, 50), 255, dtype=np.uint8)).max() == 0


def test_normalise_digit_puts_mnist_samples_in_a_20px_box_centred_by_mass(mnist_pngs):
    for data, _ in mnist_pngs[:10]:
        original = np.asarray(Image.open(io.BytesIO(data)), dtype=np.uint8)
        out = normalise_digit(original)
        rows, cols = np.nonzero(out)
        assert max(rows.max() - rows.min(), cols.max() - cols.min()) + 1 <= 21
        assert abs(np.average(np.arange(28), weights=out.sum(1)) - 13.5) <= 1.0
        assert abs(np.average(np.arange(28), weights=out.sum(0)) - 13.5) <= 1.0


# --- MNIST digits made photo-like, classified by the bundled model ------------------------------

def encode_png(digit: np.ndarray) -> bytes:
    return encode(Image.fromarray(digit))


def photo_like(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    """Dark ink on light, noisy paper; scaled up 6-10x; placed off-centre; JPEG-compressed."""
    scale = int(rng.integers(6, 11))
    ink = Image.fromarray(255 - digit).resize((28 * scale, 28 * scale), Image.Resampling.BICUBIC)
    paper = rng.normal(215, 8, (400, 360)).clip(0, 255).astype(np.uint8)
    canvas = Image.fromarray(paper)
    x, y = int(rng.integers(0, 360 - 28 * scale)), int(rng.integers(0, 400 - 28 * scale))
    region = np.asarray(canvas.crop((x, y, x + 28 * scale, y + 28 * scale)), dtype=np.float32)
    blended = np.minimum(region, np.asarray(ink, dtype=np.float32))  # ink darkens the paper
    canvas.paste(Image.fromarray(blended.astype(np.uint8)), (x, y))
    return encode(canvas.convert("RGB"), "JPEG", quality=70)


def test_photo_like_mnist_digits_are_classified_as_well_as_the_originals(bundled_mnist):
    import onnxruntime as ort

    mnist = local_datasets() / "mnist.npz"  # CONVSERVE_DATA_DIR or ../shared/datasets
    if not mnist.is_file():
        missing(f"needs the MNIST test set ({mnist})")
    with np.load(mnist) as data:
        digits, labels = data["x_test"][:300], data["y_test"][:300]
    versions = sorted((bundled_mnist / "mnist").glob("[0-9]*/model.onnx"), key=lambda p: int(p.parent.name))
    session = ort.InferenceSession(str(versions[-1]))
    rng = np.random.default_rng(7)

    def accuracy(rows):
        return (session.run(None, {"image": rows})[0].argmax(1) == labels).mean()

    plain = accuracy(digits[..., None].astype(np.float32))
    uploaded = accuracy(np.stack([preprocess(png, DIGIT, LIMITS) for png in map(encode_png, digits)]))
    photos = accuracy(np.stack([preprocess(photo_like(d, rng), DIGIT, LIMITS) for d in digits]))
    print(f"MNIST accuracy: raw arrays {plain:.3f}, uploaded PNGs {uploaded:.3f}, photo-like JPEGs {photos:.3f}")
    assert plain >= 0.97
    assert uploaded >= plain - 0.01  # normalising an MNIST sample again costs (almost) nothing
    assert photos >= plain - 0.02
