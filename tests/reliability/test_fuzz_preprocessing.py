"""The atheris harness's oracle (fuzz/fuzz_preprocessing.py ``TestOneInput``), run without atheris over a
corpus of real images mutated the way libFuzzer does it (bit flips, interesting bytes and integers, erased,
inserted, duplicated and spliced ranges, truncation), for a bounded number of iterations: every input is either
turned into a valid model input row or refused with a 400/413 error."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import random
import struct
import time
import traceback
import warnings
from pathlib import Path

import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[2]
HARNESS = REPO_ROOT / "fuzz" / "fuzz_preprocessing.py"
ITERATIONS = 20_000  # a fixed count, however fast the machine: pytest-timeout catches a hang
# Mutations mostly break a file, but a fair share stays decodable (about 25% with this seed): an oracle that
# refused nearly everything would not be exercising the preprocessing at all.
MIN_ACCEPTED_SHARE = 0.1
INTERESTING_BYTES = (0x00, 0x01, 0x7F, 0x80, 0xFF)
INTERESTING_INTS = (0, 1, 2, 0x7F, 0xFF, 0x100, 0x7FFF, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFF)


@pytest.fixture(scope="module")
def harness():
    spec = importlib.util.spec_from_file_location("fuzz_preprocessing", HARNESS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def seeds(digits, cifar_jpegs) -> list[bytes]:
    """Real images in every accepted format and in the modes that take different code paths."""
    corpus = [png for png, _ in digits[:10]] + cifar_jpegs[:6]
    gray = Image.open(io.BytesIO(digits[0][0])).convert("L")
    color = Image.open(io.BytesIO(cifar_jpegs[0])).convert("RGB")
    for img in (gray, color, gray.convert("RGBA"), gray.convert("P"), gray.convert("CMYK"), gray.convert("1")):
        for fmt in ("PNG", "GIF", "BMP", "TIFF", "WEBP", "JPEG"):
            buffer = io.BytesIO()
            try:
                img.save(buffer, fmt)
            except (OSError, ValueError, KeyError):
                continue  # that format cannot store that mode
            corpus.append(buffer.getvalue())
    return corpus


def mutate(data: bytes, corpus: list[bytes], rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        if not out:
            out = bytearray(rng.choice(corpus))
        kind = rng.randrange(8)
        at = rng.randrange(len(out))
        if kind == 0:
            out[at] ^= 1 << rng.randrange(8)
        elif kind == 1:
            out[at] = rng.choice(INTERESTING_BYTES)
        elif kind == 2 and at + 4 <= len(out):
            out[at:at + 4] = struct.pack(rng.choice(("<I", ">I")), rng.choice(INTERESTING_INTS))
        elif kind == 3:
            del out[at:at + rng.randint(1, 64)]
        elif kind == 4:
            out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif kind == 5:
            out[at:at] = out[at:at + rng.randint(1, 256)]
        elif kind == 6:
            other = rng.choice(corpus)
            out = out[:at] + other[rng.randrange(len(other)):]
        else:
            out = out[:at]
    return bytes(out)


def test_seed_images_all_become_model_inputs(harness, seeds):
    refused = [i for i, data in enumerate(seeds) if harness.check(data) is None]
    assert refused == [], f"seeds refused: {refused} of {len(seeds)}"
    harness.TestOneInput(seeds[0])  # the atheris entry point runs the same oracle


def test_mutated_images_are_preprocessed_or_refused_with_a_client_error(harness, seeds, tmp_path):
    rng = random.Random(20261123)
    failures: list[str] = []
    started = time.monotonic()
    done = accepted = 0
    rss_after_warm_up = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about each corrupt EXIF block it skips
        while done < ITERATIONS:
            data = mutate(rng.choice(seeds), seeds, rng)
            done += 1
            if done == 1000:
                rss_after_warm_up = rss_bytes()
            try:
                accepted += harness.check(data) is not None
            except Exception:  # anything but a 4xx refusal is a finding: keep the input to reproduce it
                name = hashlib.sha1(data).hexdigest()[:12]
                (tmp_path / f"crash-{name}").write_bytes(data)
                failures.append(f"crash-{name}: {traceback.format_exc(limit=3)}")
    elapsed = time.monotonic() - started
    growth = rss_bytes() - rss_after_warm_up if rss_after_warm_up else 0
    print(f"{done} mutated images in {elapsed:.1f}s, {accepted} accepted, {len(failures)} findings (inputs kept in "
          f"{tmp_path}), RSS growth after warm-up {growth / 2**20:.1f} MB")
    assert failures == []
    assert accepted >= MIN_ACCEPTED_SHARE * done, (accepted, done)
    assert growth < 50 * 2**20  # decoding leaks nothing: a long fuzz run's growth is the fuzzing engine's own


def rss_bytes() -> int:
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) * 1024
