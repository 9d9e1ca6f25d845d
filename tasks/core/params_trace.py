"""The params tracer: with SELFDISTILL_TRACE_PARAMS=FILE set, the params a stage loads
(tasks.core.config.load_params) are a read-only view that records each key the stage reads and
appends {"cmd", "keys"} to FILE when the stage exits. The tests compare what every stage reads
with the params dvc.yaml declares for it (tests/test_pipeline.py)."""
from __future__ import annotations

import atexit
import json
import os
import sys
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel

P = TypeVar("P", bound=BaseModel)


class _TracedParams:
    """A read-only view of the params that records each key read (SELFDISTILL_TRACE_PARAMS=FILE):
    the tests compare what every stage reads with the params dvc.yaml declares for it."""

    def __init__(self, model: BaseModel, prefix: str, seen: set[str]):
        self._model, self._prefix, self._seen = model, prefix, seen

    def __getattr__(self, name: str):
        value = getattr(self._model, name)
        if name in type(self._model).model_fields:
            if isinstance(value, BaseModel):
                return _TracedParams(value, f"{self._prefix}{name}.", self._seen)
            if isinstance(value, dict) and all(isinstance(v, BaseModel) for v in value.values()):
                return _TracedMapping(value, f"{self._prefix}{name}", self._seen)
            self._seen.add(self._prefix + name)
        elif name in ("model_dump", "model_dump_json", "model_copy"):  # counted as reading every key
            def read_all(*args, **kwargs):
                self._seen.update(self._prefix + key for key in _flat_keys(self._model.model_dump()))
                return value(*args, **kwargs)
            return read_all
        return value


class _TracedMapping:
    """A named section (sample.configs, arms): one entry read is that entry's keys read; the
    names themselves (iterating, `in`, len) are the whole section read."""

    def __init__(self, mapping: dict, prefix: str, seen: set[str]):
        self._mapping, self._prefix, self._seen = mapping, prefix, seen

    def __getitem__(self, name: str):
        return _TracedParams(self._mapping[name], f"{self._prefix}.{name}.", self._seen)

    def _names(self) -> list[str]:
        self._seen.add(self._prefix)
        return list(self._mapping)

    def __iter__(self):
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def keys(self):
        return self._names()

    def items(self):
        return [(name, self[name]) for name in self._names()]

    def values(self):
        return [self[name] for name in self._names()]


def _flat_keys(values: dict, prefix: str = "") -> list[str]:
    return [key for name, value in values.items()
            for key in (_flat_keys(value, f"{prefix}{name}.") if isinstance(value, dict) else [prefix + name])]


def traced(params: P) -> P:
    trace = os.environ.get("SELFDISTILL_TRACE_PARAMS")
    if not trace:
        return params
    seen: set[str] = set()
    command = " ".join(["python -m tasks." + Path(sys.argv[0]).stem, *sys.argv[1:]])

    def record() -> None:
        with open(trace, "a") as f:
            f.write(json.dumps({"cmd": command, "keys": sorted(seen)}) + "\n")

    atexit.register(record)
    return _TracedParams(params, "", seen)  # type: ignore[return-value]
