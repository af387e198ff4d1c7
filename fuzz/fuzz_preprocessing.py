"""Coverage-guided fuzzing of the image preprocessing (decode, mode conversion, resize, MNIST normalisation).

Whatever the bytes, ``preprocess`` must either return one model input row of the right shape with finite
values in 0..255, or refuse the image with a client error (``InvalidInput`` 400, ``PayloadTooLarge`` 413).
Any other exception, or a bad row, is a finding. Run it with atheris (``pip install atheris``; Linux, CPython
3.11-3.13 wheels), seeded with the real test images, for a bounded time:

    mkdir -p /tmp/fuzz-corpus && cp tests/data/mnist/*.png tests/data/cifar10/*.jpg /tmp/fuzz-corpus/
    .venv/bin/python fuzz/fuzz_preprocessing.py /tmp/fuzz-corpus -max_total_time=240 -timeout=10 -rss_limit_mb=4096

New interesting inputs go into the corpus directory, so repeating the command continues the campaign (the
instrumentation grows the process by a few KB per input: keep each run to a few minutes); a crash is written
to ``crash-<sha1>`` in the working directory. See docs/reliability.md.

``check``, the oracle behind ``TestOneInput``, is also what tests/reliability/test_fuzz_preprocessing.py runs,
without atheris, over mutated real images, so CI exercises the same oracle.
"""

from __future__ import annotations

import sys
import warnings

import numpy as np

from service.errors import InvalidInput, PayloadTooLarge
from service.preprocessing import ImageLimits, ImageSpec, preprocess

# Lower than the service's defaults so that each input stays fast; the checks are the same.
LIMITS = ImageLimits(max_bytes=1 << 20, max_pixels=1 << 22)
# The three kinds of model input: a digit model (MNIST normalisation), an RGB model, a plain grayscale one.
SPECS = (ImageSpec(28, 28, 1, digit=True), ImageSpec(32, 32, 3), ImageSpec(28, 28, 1))


def check(data: bytes) -> np.ndarray | None:
    """The oracle: the model input row ``preprocess`` made of ``data``, or None if it refused the image with a
    client error; any other exception, or a bad row, fails an assertion."""
    spec = SPECS[len(data) % len(SPECS)]  # the bytes themselves stay a valid image file
    try:
        row = preprocess(data, spec, LIMITS)
    except (InvalidInput, PayloadTooLarge):
        return None  # refused with a 4xx: the expected outcome for most mutated files
    assert row.shape == (spec.height, spec.width, spec.channels), row.shape
    assert row.dtype == np.float32, row.dtype
    assert np.isfinite(row).all(), "non-finite pixel values"
    assert row.min() >= 0.0 and row.max() <= 255.0, (row.min(), row.max())
    return row


def TestOneInput(data: bytes) -> None:  # noqa: N802 - the name libFuzzer and atheris expect
    check(data)


def main() -> None:
    import atheris

    warnings.simplefilter("ignore")  # Pillow warns about every corrupt EXIF block it skips
    atheris.instrument_all()  # Python-level coverage of the service and of Pillow's format plugins
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
