"""The floor: onnxruntime alone, in this process, with the server's session options and thread count.

No HTTP, no image decoding, no queue: what the model costs per batch on this machine. The server
can approach these numbers but not beat them.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bench.report import Row


def session(model: Path, threads: int) -> ort.InferenceSession:
    """A session configured like service/runtimes/onnx.py's."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])


def onnx_floor(model: Path, threads: int, batch_sizes: list[int], iterations: int, warmup: int = 20,
               min_seconds: float = 1.0, max_seconds: float = 10.0) -> list[Row]:
    """Images/s of ``session.run`` at each batch size, after ``warmup`` untimed calls: at least
    ``iterations`` timed calls and ``min_seconds``, but stopping after ``max_seconds``."""
    sess = session(model, threads)
    name = sess.get_inputs()[0].name
    rows = []
    for batch in batch_sizes:
        x = np.random.default_rng(batch).integers(0, 256, (batch, 28, 28, 1)).astype(np.float32)
        for _ in range(warmup):
            sess.run(None, {name: x})
        latencies = []
        cpu_start, started = time.process_time(), time.perf_counter()
        deadline = started + max_seconds
        while len(latencies) < iterations or time.perf_counter() - started < min_seconds:
            t = time.perf_counter()
            sess.run(None, {name: x})
            latencies.append(time.perf_counter() - t)
            if t > deadline:
                break
        elapsed = time.perf_counter() - started
        p50, p99 = np.percentile(latencies, [50, 99]) * 1000
        rows.append(Row(name=f"floor: onnxruntime in-process, batch {batch}", concurrency=None, duration_s=elapsed,
                        requests=len(latencies), images_per_request=batch, p50_ms=float(p50), p99_ms=float(p99),
                        server_cpu_s=round(time.process_time() - cpu_start, 4), group="floor",
                        extra={"threads": threads}))
    return rows
