"""The sampling backends: what each one is, what it cannot sample, and how it is seeded.

A backend is a class built from an HF model dir with
    name                                          its key in BACKENDS
    encode_chat(messages) -> list[int]            the model's chat template, as token ids
    generate_batch(prompts, cfg, seed, progress=None, temperatures=None) -> [Completion]
                                                  progress(k): k more tokens decoded (optional);
                                                  temperatures: one T per prompt in place of
                                                  cfg.temperature (0: greedy), so one batch holds
                                                  a prompt at several T (evaluate's T_eval sweep)
    teacher_forced_ranks(ids, start) -> [int]     the rank of each ids[i], i >= start, among the
                                                  model's next-token logits after ids[:i], from one
                                                  forward over the whole sequence (no KV cache)
and optionally (vllm has them)
    params_section                                a params.yaml section whose keys build it
    size_for(tokens)                              the longest prompt + max_new_tokens it will be sent,
                                                  before its engine starts (load_backend calls it)
    resume_facts() -> dict                        engine settings that decide the rows, and whether a
                                                  resume is exact: part of the resume key
and keeps these semantics: temperature -> top-k -> top-p -> min-p (vLLM's order),
max_new_tokens, stop at any EOS id (an EOS counts in num_tokens, not in the text), and a
batch's samples depend only on (prompts, cfg, temperatures, seed). Where a backend seeds each
sequence on its own (continuous*, transformers, vllm), a row's sample is the one it would draw
in a batch whose rows all had its T: the other rows' temperatures do not reach it (tested);
ctranslate2 draws a batch from one generator and runs each T of a batch as a call of its own.

Which backends exist and what each cannot sample is tasks/core/backend_registry.py's (the params
schema reads it before any model loads); this module adds loading, seeding and the self-check.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from tasks.core.backend_registry import BACKEND_NAMES, BACKENDS, BackendSpec, unsupported  # noqa: F401

SEED_STRIDE = 1_000_003  # batch b of a run seeded s gets seed s * SEED_STRIDE + b


@dataclass(frozen=True)
class Completion:
    text: str
    num_tokens: int
    finish_reason: str  # "eos" or "length"
    token_ids: tuple[int, ...] = ()  # the generated ids, EOS excluded (the load-time self-check reads them)


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
                         max_new_tokens=SELF_CHECK_TOKENS, seed=0, batch_size=1, slots=1, max_batch_tokens=0)
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


def load_backend(name: str, model_dir: str | Path, engine: dict | None = None, conversations=(),
                 max_new_tokens: int = 0):
    """The backend, after its self-check (see self_check).

    engine: params sections by name ({"vllm": {...}}); a backend class whose `params_section`
    names one is built with its keys. A backend with `size_for(tokens)` (vllm: an engine sized
    at start) is told the longest sequence it will hold: the longest of `conversations` (chat
    messages, as the stage will send them) plus max_new_tokens."""
    cls = backend_class(name)
    backend = cls(model_dir, **(engine or {}).get(getattr(cls, "params_section", None), {}))
    if hasattr(backend, "size_for"):
        longest = max((len(backend.encode_chat(messages)) for messages in conversations), default=0)
        backend.size_for(longest + max_new_tokens)
    self_check(backend)
    return backend


def token_budget_groups(lengths: list[int], max_new_tokens: int, budget: int) -> list[list[int]]:
    """Consecutive runs of row indices (in the given order) whose left-padded batch fits the
    budget: rows x (longest prompt among them + max_new_tokens) <= budget. A row over the budget
    on its own runs alone; budget 0: one group of every row."""
    if budget <= 0 or not lengths:
        return [list(range(len(lengths)))] if lengths else []
    groups: list[list[int]] = []
    widest = 0
    for i, length in enumerate(lengths):
        wider = max(widest, length)
        if groups and (len(groups[-1]) + 1) * (wider + max_new_tokens) <= budget:
            groups[-1].append(i)
            widest = wider
        else:
            groups.append([i])
            widest = length
    return groups


def batch_seed(seed: int, batch: int) -> int:
    return seed * SEED_STRIDE + batch


def sequence_seed(batch_seed: int, index: int) -> int:
    """The seed of sequence `index` of a batch: backends with a generator per sequence draw from
    it, so a sequence's samples do not depend on which others share its steps. Fits int63."""
    import numpy as np

    return int(np.random.SeedSequence([batch_seed % (1 << 63), index]).generate_state(2, np.uint64)[0] >> 1)
