"""Bounds on the work and the answer of one request, checked before the work is done.

Declared tensor sizes are checked before any JSON list is converted (large bodies are parsed and converted
where the event loop does not wait: :mod:`service.json_bodies`); the response size is known before the model
runs; and non-finite model outputs never reach a client or the metrics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from service.errors import InvalidInput, NonFiniteOutput

JSON_FP32_BYTES = 16  # the longest FP32 orjson writes ("-1.1754944e-38") and its comma
JSON_VALUE_BYTES = 26  # the longest FP64 or INT64 ("-2.2250738585072014e-308") and its comma
CLASSIFICATION_BYTES = 40  # "0.999999:123:" in quotes with its length prefix or comma, before the label


def check_rows(rows: int, max_rows: int) -> None:
    if rows > max_rows:
        raise InvalidInput(f"{rows} rows exceed the limit of {max_rows} per request")


def check_images(images: int, max_images: int) -> None:
    if images > max_images:
        raise InvalidInput(f"{images} images exceed the limit of {max_images} per request")


def check_declared_shape(shape: Sequence[int], row_shape: Sequence[int], max_rows: int, where: str) -> None:
    """Refuse a declared tensor shape that holds more than ``max_rows`` rows' worth of values, before its
    data is converted (the exact shape is checked against the model afterwards)."""
    if len(shape) == len(row_shape) + 1:
        check_rows(shape[0], max_rows)
    limit = max_rows * math.prod(row_shape)
    count = math.prod(shape)
    if count > limit:
        raise InvalidInput(f"{where}: shape {list(shape)} holds {count} values, more than the limit of "
                           f"{limit} ({max_rows} rows) per request")


def check_json_items(data: Any, budget: int, where: str) -> None:
    """Refuse nested JSON lists that hold more than ``budget`` items (lists and values together) before numpy
    converts them. A declared shape says how many values a tensor has; without this, 5 M one-element rows under a
    declared ``[1, 28, 28, 1]`` were converted row by row for 15 s before the size check refused them. The walk
    stops as soon as the budget is spent, so its own cost is bounded by the budget, not by the body."""
    stack = [data]
    while stack:
        item = stack.pop()
        budget -= 1
        if type(item) is list:
            if len(item) > budget:
                raise InvalidInput(f"{where}: data holds more values than its shape allows")
            first = item[0] if item else None
            if type(first) is not list:  # values (the innermost level): counted, not walked
                budget -= len(item)
            elif not first or type(first[0]) is not list:  # rows of values: their lengths summed at C speed
                try:
                    budget -= len(item) + sum(map(len, item))
                except TypeError:
                    raise InvalidInput(f"{where}: data is not a regular array") from None
            else:
                stack.extend(item)
            # Deeper lists hidden past the first element of a level make the array ragged, which numpy refuses at
            # once; a regular array's size is what the walk counted.
        if budget < 0:
            raise InvalidInput(f"{where}: data holds more values than its shape allows")


def nested_budget(values: int, rank: int) -> int:
    """The items a tensor of ``values`` values and ``rank`` dimensions has at most as nested JSON lists: the values,
    at most ``values`` lists per level (every dimension is at least 1), and the outer list."""
    return values * (rank + 1) + 1


def check_response_bytes(estimate: int, limit: int) -> None:
    """Refuse, before inference, a request whose answer would exceed ``limit`` bytes."""
    if estimate > limit:
        raise InvalidInput(f"the response would take about {estimate} bytes, more than the limit of {limit} "
                           f"bytes: ask for fewer rows or outputs")


def finite_outputs(outputs: dict[str, np.ndarray], model: str) -> dict[str, np.ndarray]:
    """The outputs, if every value of every output is finite; else a 422 naming the rows (extreme inputs
    overflow a model: ±3.4e38 makes NaN probabilities)."""
    bad_rows: set[int] = set()
    for values in outputs.values():
        finite = np.isfinite(values)
        if not finite.all():
            rows = finite.reshape(len(finite), -1).all(axis=1) if values.ndim else np.array([False])
            bad_rows.update(np.flatnonzero(~rows).tolist())
    if not bad_rows:
        return outputs
    bad = sorted(bad_rows)
    shown = ", ".join(map(str, bad[:8])) + (", ..." if len(bad) > 8 else "")
    raise NonFiniteOutput(f"model {model} produced non-finite outputs (NaN or Inf) for row(s) {shown}; "
                          f"its input is raw pixel values, 0 to 255")
