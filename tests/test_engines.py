"""Engines sized for a 4B model: the `transformers` backend's prefill keeps only the last
position's logits and its batches are capped by a token budget with rows unchanged; the `vllm`
backend's engine is sized from the prompts and built from the `vllm` params.

vLLM cannot be installed on these CPU machines (tests/test_extras.py only resolves it), so the
vllm tests here run a stand-in `vllm` package that records what the backend hands to `LLM` and
`SamplingParams`. They check the argument plumbing only (max_model_len derived from the prompts,
the params passed, VLLM_BATCH_INVARIANT set before the import, shards handed whole, the resume
key); nothing here says vLLM samples correctly.
"""
from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch
import yaml

from conftest import REPO, decoding, interrupted_run
from tasks.core.config import ParamsError, VLLMConfig, validate_params
from tasks.sampling.backend_transformers import TransformersBackend
from tasks.sampling.backends import batch_seed, load_backend, sequence_seed, token_budget_groups
from tasks.sampling.generate import Request, generate_jsonl


@pytest.fixture(scope="module")
def backend(tiny_model):
    return TransformersBackend(tiny_model, dtype=torch.float32)


def chats(count: int) -> list[list[dict]]:
    """Prompts of different lengths, longest first (as generate_jsonl's plan orders them)."""
    return [[{"role": "user", "content": "x" * (5 * (count - i))}] for i in range(count)]


def record_forwards(model):
    """(input ids shape, logits shape) of every forward of `model`, in call order."""
    shapes: list[tuple] = []
    handle = model.register_forward_hook(
        lambda module, args, kwargs, out: shapes.append((tuple(kwargs["input_ids"].shape), tuple(out.logits.shape))),
        with_kwargs=True)
    return shapes, handle


# --- transformers: the prefill's logits and the token budget ---------------------------------------

def test_prefill_computes_logits_at_the_last_position_only(backend):
    prompts = [backend.encode_chat(m) for m in chats(3)]
    shapes, handle = record_forwards(backend.model)
    try:
        backend.generate_batch(prompts, decoding(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=4), seed=0)
    finally:
        handle.remove()
    (rows, width), logits = shapes[0]
    assert (rows, width) == (3, max(len(p) for p in prompts))  # the prefill
    assert logits == (3, 1, backend.model.config.vocab_size)  # not [rows, longest prompt, vocab]
    assert all(logits[1] == 1 for _, logits in shapes)


def test_token_budget_groups():
    # rows x (widest prompt in the group + max_new_tokens) <= budget, in the given order.
    assert token_budget_groups([10, 8, 8, 5], 10, 40) == [[0, 1], [2, 3]]
    assert token_budget_groups([10, 8, 8, 5], 10, 80) == [[0, 1, 2, 3]]
    assert token_budget_groups([50, 1, 1], 10, 40) == [[0], [1, 2]]  # over the budget alone: runs alone
    assert token_budget_groups([3, 9, 2], 1, 12) == [[0], [1], [2]]  # a wider row later widens its group
    assert token_budget_groups([10, 8], 10, 0) == [[0, 1]]  # 0: no cap
    assert token_budget_groups([], 10, 40) == []


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_a_capped_batch_writes_the_rows_of_an_uncapped_one(backend, temperature):
    """Each row draws from its own generator, seeded by its index in the seeded batch, so the
    sub-batches of max_batch_tokens change which rows share a forward, not what a row samples
    (float32 on the CPU: bit for bit)."""
    prompts = [backend.encode_chat(m) for m in chats(7)]
    cfg = decoding(temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=24)
    full = backend.generate_batch(prompts, cfg, seed=5)
    widest = max(len(p) for p in prompts) + cfg.max_new_tokens
    for budget, batches in ((1, 7), (2 * widest, 4), (3 * widest, 3)):
        shapes, handle = record_forwards(backend.model)
        try:
            capped = backend.generate_batch(prompts, cfg.model_copy(update={"max_batch_tokens": budget}), seed=5)
        finally:
            handle.remove()
        prefills = [inputs for inputs, _ in shapes if inputs[1] > 1]
        assert len(prefills) == batches, prefills
        assert all(rows == 1 or rows * (width + cfg.max_new_tokens) <= budget for rows, width in prefills)
        assert capped == full, budget
    assert len({c.text for c in full}) > 1


def test_the_budget_is_in_the_resume_key(tmp_path, backend, tiny_model, capsys):
    requests = [Request({"prompt_id": f"p{i}"}, m) for i, m in enumerate(chats(4))]
    cfg = decoding(n=1, max_new_tokens=8, batch_size=2)
    interrupted_run(tiny_model, requests, cfg, tmp_path / "out.jsonl", backend, batches=1)
    generate_jsonl(tiny_model, requests, cfg.model_copy(update={"max_batch_tokens": 500}), tmp_path / "out.jsonl",
                   backend=backend)
    assert "decoding.max_batch_tokens 0 -> 500" in capsys.readouterr().out


# --- the params ------------------------------------------------------------------------------------

def raw_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


@pytest.mark.parametrize("section, key, value, message", [
    ("vllm", "tensor_parallel_size", 0, "greater than or equal to 1"),
    ("vllm", "gpu_memory_utilization", 1.5, "less than or equal to 1"),
    ("vllm", "batch_invariant", "yes", "valid boolean"),
    ("sample", "max_batch_tokens", -1, "greater than or equal to 0"),
    ("evaluate", "max_batch_tokens", "4096", "valid integer"),
])
def test_engine_params_are_typed(section, key, value, message):
    raw = raw_params()
    raw[section][key] = value
    with pytest.raises(ParamsError, match=f"{section}.{key}: .*{message}"):
        validate_params(raw)


def test_stages_that_sample_declare_the_engine_params():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, section in (("sample", "sample"), ("sample-shard", "sample"), ("evaluate", "evaluate"),
                          ("evaluate-validation", "evaluate"), ("evaluate-test", "evaluate")):
        body = stages[name].get("do", stages[name])
        wanted = {f"vllm.{key}" for key in VLLMConfig.model_fields} | {f"{section}.max_batch_tokens"}
        assert wanted <= set(body["params"]), (name, wanted - set(body["params"]))


# --- vllm: the argument plumbing, against a stand-in package ----------------------------------------

FAKE_VLLM = '''
import os
from types import SimpleNamespace

BATCH_INVARIANT_AT_IMPORT = os.environ.get("VLLM_BATCH_INVARIANT")
ENGINES = []


class SamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


class LLM:
    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.calls = []
        ENGINES.append(self)

    def generate(self, inputs, params, use_tqdm=True):
        self.calls.append((inputs, params))
        # Every answer an immediate EOS, dropped from token_ids (the self-check then has nothing to score).
        return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=[], text="", finish_reason="stop")])
                for _ in inputs]
'''


@pytest.fixture
def fake_vllm(tmp_path, monkeypatch, tiny_model):
    """A stand-in `vllm` importable (not yet imported) with VLLM_BATCH_INVARIANT unset; removed after."""
    (tmp_path / "fake" / "vllm").mkdir(parents=True)
    (tmp_path / "fake" / "vllm" / "__init__.py").write_text(textwrap.dedent(FAKE_VLLM))
    monkeypatch.syspath_prepend(str(tmp_path / "fake"))
    monkeypatch.delenv("VLLM_BATCH_INVARIANT", raising=False)
    sys.modules.pop("vllm", None)
    yield lambda: sys.modules["vllm"]
    sys.modules.pop("vllm", None)


def engine_params(**overrides) -> dict:
    return {"vllm": {**raw_params()["vllm"], **overrides}}


@pytest.mark.parametrize("invariant", [True, False])
def test_vllm_engine_is_built_from_the_params_and_sized_for_the_longest_prompt(fake_vllm, tiny_model, invariant):
    conversations = chats(5)
    backend = load_backend("vllm", tiny_model, engine=engine_params(tensor_parallel_size=2, gpu_memory_utilization=0.8,
                                                                    batch_invariant=invariant),
                           conversations=conversations, max_new_tokens=300)
    vllm = fake_vllm()
    assert vllm.BATCH_INVARIANT_AT_IMPORT == ("1" if invariant else "0")
    [engine] = vllm.ENGINES  # one engine, started by the self-check
    longest = max(len(backend.encode_chat(m)) for m in conversations)
    assert engine.kwargs == {"model": str(tiny_model), "dtype": "bfloat16", "max_model_len": longest + 300,
                             "tensor_parallel_size": 2, "gpu_memory_utilization": 0.8, "seed": 0,
                             "enable_prefix_caching": not invariant}
    assert backend.resume_facts() == {"exact_resume": invariant, "tensor_parallel_size": 2}


def test_vllm_engine_floor_is_the_self_check(fake_vllm, tiny_model):
    """With no prompts announced, the engine still holds the self-check's sequence."""
    from tasks.sampling.backends import SELF_CHECK_PROMPT, SELF_CHECK_TOKENS

    backend = load_backend("vllm", tiny_model, engine=engine_params())
    [engine] = fake_vllm().ENGINES
    assert engine.kwargs["max_model_len"] == len(backend.encode_chat(SELF_CHECK_PROMPT)) + SELF_CHECK_TOKENS + 1


def test_vllm_refuses_a_sequence_longer_than_its_engine(fake_vllm, tiny_model):
    backend = load_backend("vllm", tiny_model, engine=engine_params(), conversations=chats(2), max_new_tokens=300)
    prompt = backend.encode_chat(chats(2)[0])
    assert fake_vllm().ENGINES[0].kwargs["max_model_len"] == len(prompt) + 300
    calls = len(fake_vllm().ENGINES[0].calls)
    backend.generate_batch([prompt], decoding(backend="vllm", max_new_tokens=300), seed=0)  # fits
    with pytest.raises(ParamsError, match="longer than the .* its engine was started with"):
        backend.generate_batch([prompt], decoding(backend="vllm", max_new_tokens=301), seed=0)
    assert len(fake_vllm().ENGINES[0].calls) == calls + 1  # nothing sent for the refused batch


def test_vllm_gets_whole_shards_with_a_seed_per_request(fake_vllm, tmp_path, tiny_model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    requests = [Request({"prompt_id": f"p{i}"}, m) for i, m in enumerate(chats(5))]
    cfg = decoding(backend="vllm", n=2, max_new_tokens=40, batch_size=4, temperature=0.8, top_k=20, top_p=0.8)
    generate_jsonl(tiny_model, requests, cfg, tmp_path / "out.jsonl", engine=engine_params())
    [engine] = fake_vllm().ENGINES
    shards = engine.calls[1:]  # after the self-check's
    assert [len(inputs) for inputs, _ in shards] == [4, 4, 2]  # each plan batch in one call
    for b, (inputs, params) in enumerate(shards):
        assert [p.kwargs["seed"] for p in params] == [sequence_seed(batch_seed(cfg.seed, b), i)
                                                      for i in range(len(inputs))]
        assert {(p.kwargs["temperature"], p.kwargs["top_k"], p.kwargs["top_p"], p.kwargs["max_tokens"])
                for p in params} == {(0.8, 20, 0.8, 40)}


@pytest.mark.parametrize("invariant", [True, False])
def test_vllm_resume_key_says_whether_a_resume_is_exact(fake_vllm, tmp_path, tiny_model, monkeypatch, capsys,
                                                        invariant):
    from tasks.core.paths import partial_of

    monkeypatch.chdir(tmp_path)
    requests = [Request({"prompt_id": f"p{i}"}, m) for i, m in enumerate(chats(4))]
    cfg = decoding(backend="vllm", n=1, max_new_tokens=20, batch_size=2)
    backend = load_backend("vllm", tiny_model, engine=engine_params(batch_invariant=invariant),
                           conversations=[r.messages for r in requests], max_new_tokens=20)
    interrupted_run(tiny_model, requests, cfg, tmp_path / "out.jsonl", backend, batches=1)
    key = json.loads(partial_of(tmp_path / "out.jsonl").read_text().splitlines()[0])["resume_key"]
    assert key["engine"] == {"exact_resume": invariant, "tensor_parallel_size": 1}
    generate_jsonl(tiny_model, requests, cfg, tmp_path / "out.jsonl", backend=backend)
    out = capsys.readouterr().out
    assert "resuming, 2 of 4" in out
    assert ("a new draw" in out) == (not invariant)


def test_vllm_refuses_a_mode_other_than_the_one_it_was_imported_with(fake_vllm, tiny_model):
    load_backend("vllm", tiny_model, engine=engine_params(batch_invariant=True))
    with pytest.raises(ParamsError, match="already imported in this process with VLLM_BATCH_INVARIANT=1"):
        load_backend("vllm", tiny_model, engine=engine_params(batch_invariant=False))
