"""Deciding whether a program's answer matches the expected one.

stdin/stdout answers follow LiveCodeBench's rules. Call-based answers are compared exactly
(LiveCodeBench's grader is exact) unless the problem gives a tolerance `atol`, which is then read
as evalplus reads it (evalplus/eval/__init__.py, `unsafe_execute`): an exact match passes; else,
with atol 0 and a float (or a list of floats) expected, atol becomes 1e-6; with atol > 0 the
answer must have the expected's type and be close as numpy.allclose(rtol=1e-7, atol) says.

Runs on the trusted side only: inside the sandbox's test runner, never in the program's process.
Standard library only: this module is also loaded inside the sandbox.
"""
from __future__ import annotations

import decimal
import math

RTOL = 1e-7  # evalplus passes rtol=1e-07 to np.allclose
FLOAT_ATOL = 1e-6  # evalplus's atol where a problem's atol is 0 and the expected is floats


def _as_number(token: str):
    try:
        number = decimal.Decimal(token)
    except decimal.InvalidOperation:
        return None
    return number if number.is_finite() else None


def lines_match(actual: str, expected: str) -> bool:
    """stdin/stdout problems: the same number of lines once surrounding whitespace is trimmed;
    lines equal after trimming, or equal token by token where numeric tokens compare as
    numbers ("1.50" == "1.5", "007" == "7")."""
    actual_lines = actual.strip().splitlines()
    expected_lines = expected.strip().splitlines()
    if len(actual_lines) != len(expected_lines):
        return False
    for got, want in zip(actual_lines, expected_lines):
        got, want = got.strip(), want.strip()
        if got == want:
            continue
        got_tokens, want_tokens = got.split(), want.split()
        if len(got_tokens) != len(want_tokens):
            return False
        for got_token, want_token in zip(got_tokens, want_tokens):
            if got_token == want_token:
                continue
            got_number, want_number = _as_number(got_token), _as_number(want_token)
            if got_number is None or want_number is None or got_number != want_number:
                return False
    return True


def _json_shape(value):
    """What a value looks like after a JSON round trip: tuples become lists."""
    if isinstance(value, (list, tuple)):
        return [_json_shape(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_shape(v) for k, v in value.items()}
    return value


def is_floats(value) -> bool:
    """evalplus's `is_floats`: a float, or a non-empty list of floats only."""
    if isinstance(value, float):
        return True
    if isinstance(value, (list, tuple)) and value:
        return all(isinstance(v, float) for v in value)
    return False


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _close(actual, expected, atol: float) -> bool:
    """Numbers within atol + RTOL * |expected| wherever a float is involved (integers compare
    exactly, so a tolerance never lets a wrong count pass); lists and dicts element by element
    with the same length and keys; anything else exactly."""
    if actual == expected:
        return True
    if _is_number(actual) and _is_number(expected) and (isinstance(actual, float) or isinstance(expected, float)):
        if not (math.isfinite(actual) and math.isfinite(expected)):
            return False
        return abs(actual - expected) <= atol + RTOL * abs(expected)
    if isinstance(actual, list) and isinstance(expected, list):
        return len(actual) == len(expected) and all(_close(a, e, atol) for a, e in zip(actual, expected))
    if isinstance(actual, dict) and isinstance(expected, dict):
        return actual.keys() == expected.keys() and all(_close(actual[k], expected[k], atol) for k in expected)
    return actual == expected


def values_match(actual, expected, atol: float | None = None) -> bool:
    """Call-based problems: the returned value equals the expected JSON value (a tuple equals
    the list it would be written as); with a tolerance `atol` (see the module doc) numbers may
    differ by it. None: exact."""
    actual, expected = _json_shape(actual), _json_shape(expected)
    if actual == expected:
        return True
    if atol is None:
        return False
    if atol == 0 and is_floats(expected):
        atol = FLOAT_ATOL
    if atol == 0 or type(actual) is not type(expected):  # evalplus: type(out) == type(exp)
        return False
    return _close(actual, expected, atol)
