"""Deciding whether a program's answer matches the expected one (LiveCodeBench's rules).

Runs on the trusted side only: inside the sandbox's test runner, never in the program's process.
Standard library only: this module is also loaded inside the sandbox.
"""
from __future__ import annotations

import decimal


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


def values_match(actual, expected) -> bool:
    """Call-based problems: the returned value equals the expected JSON value
    (a tuple equals the list it would be written as)."""
    return _json_shape(actual) == _json_shape(expected)
