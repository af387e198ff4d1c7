"""Strict parsing of the numbers and tensors clients send: one rule for every header, query and JSON field.

Python's ``str.isdigit()`` and ``int()`` accept far more than ASCII digits (``"²"``, ``"３"``, ``" 7 "``,
``"1_000"``), and numpy turns strings and booleans into numbers (``"1e3"`` as FP32, ``"x"`` as BOOL).
The protocols say a count is ASCII digits and a tensor's data are JSON values of its datatype, so
everything here refuses the rest with a 400 that names the field.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from service.errors import InvalidInput

MAX_DIGITS = 18  # any count a client may mean fits in int64; int() never sees a longer string
_ASCII_DIGITS = frozenset("0123456789")
# numpy kinds a JSON tensor may infer to, per target kind: integers and floats for numbers, booleans for BOOL.
_ACCEPTED_KINDS = {"f": "iuf", "i": "iu", "u": "iu", "b": "b"}


def ascii_count(text: str, what: str) -> int:
    """A non-negative integer written in ASCII digits (a header or query value). More than 18 digits read as
    10**18, beyond any limit, so the caller's "too large" answer applies and int() never parses thousands."""
    if not text or not _ASCII_DIGITS.issuperset(text):
        raise InvalidInput(f"{what} must be a whole number written in ASCII digits")
    return int(text) if len(text) <= MAX_DIGITS else 10**MAX_DIGITS


def json_count(value: Any, what: str) -> int:
    """A non-negative JSON integer: ``true``, ``2.9``, ``"3"`` and ``-1`` are refused."""
    if type(value) is not int or value < 0:  # bool is a subclass of int: exclude it by exact type
        raise InvalidInput(f"{what} must be a non-negative integer")
    return value


def positive_int(value: Any, what: str, *, text_allowed: bool) -> int:
    """A positive integer from JSON (``text_allowed=False``) or from text (a query or form field)."""
    message = f"{what} must be a positive integer"
    if isinstance(value, str) and text_allowed:
        if len(value) > MAX_DIGITS or not value or not _ASCII_DIGITS.issuperset(value):
            raise InvalidInput(message)
        number = int(value)
    elif type(value) is int:
        number = value
    else:
        raise InvalidInput(message)
    if number < 1:
        raise InvalidInput(message)
    return number


def strict_array(data: Any, dtype: np.dtype[Any], where: str, type_name: str) -> np.ndarray:
    """A (nested) JSON list as an array of ``dtype``, refusing strings, nulls, objects and mixed kinds:
    numbers for numeric types (integers only for integer types), booleans only for BOOL."""
    try:
        inferred = np.asarray(data)
    except (ValueError, TypeError, OverflowError):
        raise InvalidInput(f"{where}: data is not a regular array of {type_name} values") from None
    accepted = _ACCEPTED_KINDS.get(dtype.kind, "")
    if inferred.dtype.kind not in accepted and inferred.size:
        raise InvalidInput(f"{where}: data is not a regular array of {type_name} values")
    if dtype.kind in "iu" and inferred.size:
        bounds = np.iinfo(dtype)
        if inferred.min() < bounds.min or inferred.max() > bounds.max:
            raise InvalidInput(f"{where}: data has values out of range for {type_name}")
    return inferred.astype(dtype, copy=False)  # floats beyond FP32/FP16 become Inf, which the rows check refuses
