"""``python -m bench.preprocess``: the in-process CPU cost of one MNIST upload, stage by stage.

Decode, grayscale conversion, MNIST digit normalisation, the whole ``preprocess()`` and batched
LeNet inference, each as CPU microseconds per image (``time.process_time``, so a busy machine
inflates the figures less than wall time would), median over rounds on the committed test PNGs.
This is the denominator of "server CPU per request / in-process cost".
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from service.preprocessing import ImageLimits, ImageSpec, decode_image, normalise_digit, preprocess, to_gray_or_rgb
from service.runtimes.onnx import OnnxRuntime

ROOT = Path(__file__).resolve().parent.parent


def cpu_us_per_item(work: Callable[[object], object], items: list, rounds: int, repeat: int = 10) -> float:
    samples = []
    for _ in range(rounds):
        started = time.process_time()
        for _ in range(repeat):
            for item in items:
                work(item)
        samples.append((time.process_time() - started) / (repeat * len(items)) * 1e6)
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.preprocess", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=32, help="inference batch size")
    args = parser.parse_args(argv)
    limits = ImageLimits(10 * 1024 * 1024, 25_000_000)
    spec = ImageSpec(28, 28, 1, digit=True)
    pngs = [p.read_bytes() for p in sorted((ROOT / "tests" / "data" / "mnist").glob("*.png"))]
    grays = [to_gray_or_rgb(decode_image(d, limits), 1)[..., 0] for d in pngs]
    runtime = OnnxRuntime(ROOT / "models" / "mnist" / "1" / "model.onnx", threads=1)
    batches = [np.stack([preprocess(d, spec, limits) for d in pngs[i:i + args.batch]])
               for i in range(0, len(pngs) - args.batch + 1, args.batch)]
    rows = {
        "decode": cpu_us_per_item(lambda d: decode_image(d, limits), pngs, args.rounds),
        "decode + grayscale": cpu_us_per_item(lambda d: to_gray_or_rgb(decode_image(d, limits), 1), pngs, args.rounds),
        "digit normalisation": cpu_us_per_item(normalise_digit, grays, args.rounds),
        "preprocess() in all": cpu_us_per_item(lambda d: preprocess(d, spec, limits), pngs, args.rounds),
        f"LeNet inference (batch {args.batch}, 1 thread)":
            cpu_us_per_item(runtime.predict, batches, args.rounds) / args.batch,
    }
    print(f"CPU microseconds per image, median of {args.rounds} rounds over {len(pngs)} MNIST test PNGs")
    for name, value in rows.items():
        print(f"  {name:<40} {value:8.1f}")


if __name__ == "__main__":
    main()
