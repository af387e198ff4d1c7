"""Where a request's images are decoded: cheap ones in the batch, expensive ones in a pool, under a deadline.

Headers are read first (:func:`service.preprocessing.open_images`: formats, pixel and scan limits, the
request's pixel budget), which tells the decoding work before any of it is done. Requests within a small
budget (thumbnails, digits, CIFAR-sized photos: nearly all traffic) are decoded on the model's inference
thread as part of its batch, which costs no extra thread hop. Larger ones are decoded in a pool of
``decode_threads`` threads shared by all models, so a slow decode never holds up another client's batch,
and the request's deadline runs while it waits for and occupies that pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from service import tracing
from service.batching import Gone
from service.errors import ClientDisconnected, DeadlineExceeded
from service.preprocessing import ImageLimits, ImageSpec, OpenedImage, images_to_rows, open_images

if TYPE_CHECKING:
    from opentelemetry.trace import Span

Observe = Callable[[float], None]


class DecodePool:
    """Decodes the images of large requests off the inference threads, each request under its deadline."""

    def __init__(self, threads: int, limits: ImageLimits, inline_work: int, timeout_s: float) -> None:
        self.limits = limits
        self.inline_work = inline_work
        self.timeout_s = timeout_s
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode")

    async def outputs(self, images: list[bytes], spec: ImageSpec, observe: Observe,
                      run_rows: Callable[[np.ndarray], Awaitable[np.ndarray]],
                      run_prepared: Callable[[int, Callable[[], np.ndarray]], Awaitable[np.ndarray]],
                      gone: Gone | None = None, on_rows: Callable[[np.ndarray], None] | None = None) -> np.ndarray:
        """Model outputs for encoded images: ``run_prepared(n, prepare)`` queues a request whose rows are
        made in the batch, ``run_rows(rows)`` one whose rows are ready; ``observe`` gets the decoding time,
        ``on_rows`` (when given) the rows the model gets."""
        opened = open_images(images, self.limits)
        traced = tracing.current_span()  # the request's span, when it is recorded: its decoding's parent
        if self.inline(opened):
            def prepare() -> np.ndarray:
                started = time.perf_counter()
                if traced is None:
                    rows = images_to_rows(opened, spec)
                else:
                    with tracing.stage("preprocess", {"convserve.images": len(opened), "convserve.decoded_in": "batch"},
                                       traced):
                        rows = images_to_rows(opened, spec)
                observe(time.perf_counter() - started)
                if on_rows is not None:
                    on_rows(rows)
                return rows

            return await run_prepared(len(opened), prepare)
        rows = await self.decode(opened, spec, observe, gone, traced)
        if on_rows is not None:
            on_rows(rows)
        return await run_rows(rows)

    def inline(self, opened: list[OpenedImage]) -> bool:
        """Whether these images are cheap enough to decode where the batches run (else: :meth:`decode`)."""
        return sum(item.work for item in opened) <= self.inline_work

    async def decode(self, opened: list[OpenedImage], spec: ImageSpec, observe: Observe,
                     gone: Gone | None, traced: Span | None = None) -> np.ndarray:
        """The rows of opened images, decoded in the pool under the request's deadline."""
        deadline = time.monotonic() + self.timeout_s
        stop = threading.Event()  # set when the request no longer waits: its images are skipped

        def check() -> None:
            if stop.is_set() or time.monotonic() > deadline:
                raise DeadlineExceeded(self._late())
            if gone is not None and gone():
                raise ClientDisconnected("client disconnected while its images were decoded")

        def decode() -> np.ndarray:
            started = time.perf_counter()
            try:
                with tracing.stage("preprocess", {"convserve.images": len(opened), "convserve.decoded_in": "pool"},
                                   traced) if traced is not None else contextlib.nullcontext():
                    return images_to_rows(opened, spec, check)
            finally:
                observe(time.perf_counter() - started)

        future = asyncio.get_running_loop().run_in_executor(self._executor, decode)
        try:
            return await asyncio.wait_for(future, max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise DeadlineExceeded(self._late()) from None
        finally:
            stop.set()

    def _late(self) -> str:
        return f"decoding the request's images took longer than its {self.timeout_s:g}s deadline"

    def close(self) -> None:
        """Stop taking work; a decode that is running finishes its current image and stops (its request is gone)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
