"""The sampling backends: what each one is, what it cannot sample, and how it is seeded.

A backend is a class built from an HF model dir with
    name                                          its key in BACKENDS
    encode_chat(messages) -> list[int]            the model's chat template, as token ids
    generate_batch(prompts, cfg, seed, progress=None) -> [Completion]
                                                  progress(k): k more tokens decoded (optional)
    teacher_forced_ranks(ids, start) -> [int]     the rank of each ids[i], i >= start, among the
                                                  model's next-token logits after ids[:i], from one
                                                  forward over the whole sequence (no KV cache)
and keeps these semantics: temperature -> top-k -> top-p -> min-p (vLLM's order),
max_new_tokens, stop at any EOS id (an EOS counts in num_tokens, not in the text), and a
batch's samples depend only on (prompts, cfg, seed).

This module imports no engine (no torch): the params schema asks it which backends exist and
what each cannot sample, before any model loads.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

SEED_STRIDE = 1_000_003  # batch b of a run seeded s gets seed s * SEED_STRIDE + b


@dataclass(frozen=True)
class Completion:
    text: str
    num_tokens: int
    finish_reason: str  # "eos" or "length"
    token_ids: tuple[int, ...] = ()  # the generated ids, EOS excluded (the load-time self-check reads them)


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


def check_supported(cfg, backend: str) -> None:
    """Raise ParamsError naming the key when the backend running cannot sample cfg exactly."""
    reason = unsupported(cfg, backend)
    if reason:
        from tasks.core.config import ParamsError

        raise ParamsError(reason)


def backend_class(name: str):
    """The class, imported on first use, so optional engines stay optional."""
    spec = BACKENDS[name]
    return getattr(importlib.import_module(spec.module), spec.cls)


class BackendError(RuntimeError):
    """A backend that computes wrong: it refuses to sample rather than write garbage."""


# The load-time self-check: greedy-decode a short answer, then score each decoded token with one
# forward over the whole sequence. A decode step that loses its context (a KV cache passed by a
# keyword the model ignores, a kernel reading the wrong cache rows) picks tokens that rank far
# down under the model's own forward; int8 / bf16 rounding only swaps near-ties.
SELF_CHECK_PROMPT = [{"role": "user", "content": "Write a Python function that returns the sum of a list."}]
SELF_CHECK_TOKENS = 16
SELF_CHECK_RANK = 5  # a decoded token must rank within the top 5 at all but one position (int8
SELF_CHECK_MISSES = 1  # ranked <= 4 over 4 x 48 tokens of SmolLM2), and never below ...
SELF_CHECK_FAR = 50  # ... the top 50 (a decode without its context: rank 1638)


def self_check(backend) -> None:
    from tasks.core.config import DecodingConfig

    cfg = DecodingConfig(backend=backend.name, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, n=1,
                         max_new_tokens=SELF_CHECK_TOKENS, seed=0, batch_size=1, slots=1)
    prompt = backend.encode_chat(SELF_CHECK_PROMPT)
    out = backend.generate_batch([prompt], cfg, seed=0)[0]
    ids = list(out.token_ids)
    if not ids:
        return  # an immediate EOS: nothing decoded, nothing to check
    ranks = backend.teacher_forced_ranks(prompt + ids, len(prompt))
    misses = [(i, tok, rank) for i, (tok, rank) in enumerate(zip(ids, ranks)) if rank > SELF_CHECK_RANK]
    if len(misses) > SELF_CHECK_MISSES or any(rank > SELF_CHECK_FAR for _, _, rank in misses):
        detail = ", ".join(f"token {i} (id {tok}) ranks {rank}" for i, tok, rank in misses[:4])
        raise BackendError(
            f"backend {backend.name} failed its load-time self-check and refuses to sample: of "
            f"{len(ids)} greedy tokens, {len(misses)} rank below the top {SELF_CHECK_RANK} under the "
            f"model's own forward pass ({detail}); its decoding computes wrong (with this "
            f"transformers/engine version?), so its samples would be garbage")


def load_backend(name: str, model_dir: str | Path):
    """The backend, after its self-check (see self_check)."""
    backend = backend_class(name)(model_dir)
    self_check(backend)
    return backend


def batch_seed(seed: int, batch: int) -> int:
    return seed * SEED_STRIDE + batch


def sequence_seed(batch_seed: int, index: int) -> int:
    """The seed of sequence `index` of a batch: backends with a generator per sequence draw from
    it, so a sequence's samples do not depend on which others share its steps. Fits int63."""
    import numpy as np

    return int(np.random.SeedSequence([batch_seed % (1 << 63), index]).generate_state(2, np.uint64)[0] >> 1)
