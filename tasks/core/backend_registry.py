"""The sampling backends by name: the module and class of each, and what each cannot sample
exactly. A leaf (it imports no engine and nothing of the project): the params schema
(tasks/core/config.py) validates `backend` and the decoding settings against it before any
model loads, and tasks/sampling/backends.py loads the classes it names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


def _no_min_p(name: str) -> Callable:
    def unsupported(cfg) -> str | None:
        if cfg.min_p > 0 and cfg.temperature > 0:
            return (f"min_p={cfg.min_p}: backend {name} has no min-p truncation; set min_p: 0 "
                    "or backend: transformers")
        return None
    return unsupported


def _vllm_min_p(cfg) -> str | None:
    # vLLM applies min-p before top-p; the two commute only when one of them is off.
    if cfg.temperature > 0 and cfg.min_p > 0 and cfg.top_p < 1:
        return (f"min_p={cfg.min_p} with top_p={cfg.top_p}: vLLM applies min-p before top-p, "
                "not after; set min_p: 0 or top_p: 1 for backend vllm")
    return None


@dataclass(frozen=True)
class BackendSpec:
    module: str
    cls: str
    unsupported: Callable | None = None  # cfg -> why this backend cannot sample it exactly, or None


BACKENDS = {
    "continuous-int8": BackendSpec("tasks.sampling.backend_continuous", "ContinuousInt8Backend"),
    "continuous": BackendSpec("tasks.sampling.backend_continuous", "ContinuousBackend"),
    "transformers": BackendSpec("tasks.sampling.backend_transformers", "TransformersBackend"),
    "ctranslate2": BackendSpec("tasks.sampling.backend_ctranslate2", "CT2Backend", _no_min_p("ctranslate2")),
    "ctranslate2-float32": BackendSpec("tasks.sampling.backend_ctranslate2", "CT2Float32Backend",
                                       _no_min_p("ctranslate2-float32")),
    "vllm": BackendSpec("tasks.sampling.backend_vllm", "VLLMBackend", _vllm_min_p),
}
BACKEND_NAMES = tuple(BACKENDS)


def unsupported(cfg, backend: str | None = None) -> str | None:
    """Why `backend` (default: cfg.backend) cannot sample cfg's decoding settings exactly, or None."""
    rule = BACKENDS[backend or cfg.backend].unsupported
    return rule(cfg) if rule else None
