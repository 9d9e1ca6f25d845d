"""How values and messages cross the sandbox boundary.

Values are encoded as JSON with single-key tags for the Python types JSON lacks, so that a
decoded value is always built from plain builtin types (int, float, str, list, tuple, dict,
set, ...). Whatever bytes a sandboxed program sends, decoding them can only produce such plain
data: an object with a rigged `__eq__` never reaches the trusted side.

Messages are length-prefixed JSON frames on file descriptors.

Standard library only: this module is also loaded inside the sandbox.
"""
from __future__ import annotations

import json
import os
import struct

MAX_DEPTH = 200
HEADER = struct.Struct(">I")


class Unsupported(TypeError):
    """The value has a type that does not cross the boundary (functions, generators, objects)."""


def encode(value, depth: int = 0):
    """Plain data -> a JSON-able structure. Exact builtin types are kept as they are; subclasses
    of numbers and strings (numpy scalars, IntEnum) are reduced to their builtin value."""
    if depth > MAX_DEPTH:
        raise Unsupported("value nested too deeply")
    kind = type(value)
    if value is None or kind is bool or kind is str:
        return value
    if kind is int:
        # json would write it in decimal, which Python refuses past 4300 digits; hex is exempt
        return value if value.bit_length() < 10000 else {"x": hex(value)}
    if kind is float:
        return value
    if kind is list:
        return [encode(v, depth + 1) for v in value]
    if kind is tuple:
        return {"t": [encode(v, depth + 1) for v in value]}
    if kind is dict:
        return {"d": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]}
    if kind is set:
        return {"s": [encode(v, depth + 1) for v in value]}
    if kind is frozenset:
        return {"f": [encode(v, depth + 1) for v in value]}
    if kind is bytes:
        return {"b": value.hex()}
    if kind is complex:
        return {"c": [value.real, value.imag]}
    # Subclasses and foreign scalars (numpy.int64, numpy.float64, numpy.bool_): reduce to builtins.
    if type(value).__name__ in ("bool_", "bool"):  # numpy.bool_ (1.x) / numpy.bool (2.x)
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, str):
        return str.__str__(value)
    if hasattr(value, "__index__") and not hasattr(value, "__len__"):
        return int(value.__index__())
    if type(value).__name__.startswith("float") and hasattr(value, "__float__"):
        return float(value)
    raise Unsupported(f"a value of type {type(value).__name__} cannot leave the sandbox")


def decode(data, depth: int = 0):
    """The inverse of `encode`; anything malformed raises ValueError."""
    if depth > MAX_DEPTH:
        raise ValueError("value nested too deeply")
    kind = type(data)
    if data is None or kind in (bool, int, float, str):
        return data
    if kind is list:
        return [decode(v, depth + 1) for v in data]
    if kind is dict and len(data) == 1:
        (tag, body), = data.items()
        if tag == "t" and type(body) is list:
            return tuple(decode(v, depth + 1) for v in body)
        if tag == "d" and type(body) is list:
            out = {}
            for pair in body:
                if type(pair) is not list or len(pair) != 2:
                    raise ValueError("malformed dict entry")
                out[decode(pair[0], depth + 1)] = decode(pair[1], depth + 1)
            return out
        if tag == "s" and type(body) is list:
            return {decode(v, depth + 1) for v in body}
        if tag == "f" and type(body) is list:
            return frozenset(decode(v, depth + 1) for v in body)
        if tag == "x" and type(body) is str:
            return int(body, 16)
        if tag == "b" and type(body) is str:
            return bytes.fromhex(body)
        if tag == "c" and type(body) is list and len(body) == 2:
            return complex(float(body[0]), float(body[1]))
    raise ValueError(f"malformed value of type {kind.__name__}")


def pack(message) -> bytes:
    payload = json.dumps(message, separators=(",", ":")).encode()
    return HEADER.pack(len(payload)) + payload


def write_frame(fd: int, message) -> None:
    data = memoryview(pack(message))
    while data:
        written = os.write(fd, data)
        data = data[written:]


def read_exact(fd: int, size: int) -> bytes | None:
    """Read exactly `size` bytes; None on EOF before the first byte, EOFError if cut short."""
    chunks, remaining = [], size
    while remaining:
        chunk = os.read(fd, remaining)
        if not chunk:
            if remaining == size:
                return None
            raise EOFError("frame cut short")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int, max_bytes: int = 1 << 30):
    """Blocking read of one frame; None at a clean EOF."""
    header = read_exact(fd, HEADER.size)
    if header is None:
        return None
    (size,) = HEADER.unpack(header)
    if size > max_bytes:
        raise ValueError(f"frame of {size} bytes exceeds the limit of {max_bytes}")
    payload = read_exact(fd, size) if size else b""
    if payload is None:
        raise EOFError("frame cut short")
    return json.loads(payload)


class FrameBuffer:
    """Incremental frame parser for a non-blocking reader (select loops)."""

    def __init__(self, max_bytes: int):
        self.buffer = bytearray()
        self.max_bytes = max_bytes

    def feed(self, data: bytes) -> None:
        self.buffer += data

    def next_frame(self):
        """The next complete frame, or None if more bytes are needed."""
        if len(self.buffer) < HEADER.size:
            return None
        (size,) = HEADER.unpack_from(self.buffer)
        if size > self.max_bytes:
            raise OverflowError(size)
        end = HEADER.size + size
        if len(self.buffer) < end:
            return None
        payload = bytes(self.buffer[HEADER.size:end])
        del self.buffer[:end]
        return json.loads(payload)
