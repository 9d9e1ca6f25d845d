"""vLLM sampling backend, for GPU machines (`pip install -e '.[vllm]'`).

Written against vLLM 0.32.0's source (the PyPI sdist vllm-0.32.0.tar.gz): `LLM.__init__` in
vllm/entrypoints/llm.py, `SamplingParams` in vllm/sampling_params.py, the sampler in
vllm/v1/sample/sampler.py, the length checks in vllm/v1/engine/input_processor.py and
vllm/v1/core/sched/utils.py, and docs/features/batch_invariance.md and
docs/usage/reproducibility.md. It has not run on a GPU yet.

`sampling_params_kwargs` and `engine_kwargs` map the params to vLLM's keywords; they are pure
functions, tested without vllm installed. Semantics kept:

- temperature 0 is greedy; top_k 0 means "no top-k" (vLLM 0.32's own value for it);
  max_new_tokens -> max_tokens; EOS ids -> stop_token_ids (vLLM also stops at the tokenizer's
  EOS); the EOS is not returned in the text, but counts in num_tokens like the reference
  backend's;
- order of transforms: vLLM (V1 engine) applies temperature, then min-p (an argmax-invariant
  logits processor), then top-k and top-p. Top-k and min-p commute (both keep a prefix of
  the ranking, and min-p compares ratios to the top probability, which renormalising does
  not change), but top-p and min-p do not: top-p over the min-p survivors can keep fewer
  tokens than min-p over the top-p nucleus. A config with both min_p > 0 and top_p < 1 is
  therefore rejected (naming the keys) rather than sampled in a different order;
- seeds: each prompt of a batch gets its own per-request seed derived from (batch seed, row)
  by `sequence_seed`, as the continuous backends seed theirs (vLLM keeps a generator per
  seeded request);
- a batch whose rows have temperatures of their own (`temperatures`: the evaluate stage's
  T_eval sweep in one pass) gives each request its own SamplingParams; the other settings
  are the batch's.

The engine (params section `vllm`):

- max_model_len is the longest sequence the stage will send: its longest prompt plus
  max_new_tokens (load_backend tells `size_for` before the engine starts; the self-check's
  own needs are the floor). vLLM's default is the model's full context, 262,144 tokens for
  Qwen3-4B-Instruct-2507, with which it refuses to start where the KV cache of one such
  request does not fit. A request longer than the engine was sized for is refused before any
  is sent: vLLM would stop it at max_model_len with finish reason "length", a silent cut.
- tensor_parallel_size and gpu_memory_utilization are params; tensor parallelism changes the
  arithmetic, so it is in the resume key.
- Whole shards: generate_batch hands the whole seeded batch (`batch_size`: thousands of
  prompts for this backend) to one `LLM.generate` call, which schedules it continuously;
  a finished shard is what a resume keeps.
- batch_invariant: VLLM_BATCH_INVARIANT=1, set before vllm is imported (some of its modules
  read it at import). vLLM then computes each request independently of the batch it runs in
  (beta in 0.32; NVIDIA GPUs of compute capability 8.0 or later, AMD Instinct, Intel XPU), so
  a shard rerun after a kill writes the rows the uninterrupted run wrote, on the same hardware
  and vLLM version (the reproducibility guide's condition). Prefix caching is off in this mode:
  a rerun shard meets a cold cache where the uninterrupted run met the previous shard's
  entries, and vLLM's own batch-invariance tests run with it off. With batch_invariant false,
  prefix caching is on, vLLM is faster, and a resumed run's remaining shards are a different,
  equally valid draw: the resume key records `exact_resume: false`.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from tasks.core.config import DecodingConfig, ParamsError
from tasks.sampling.backends import SELF_CHECK_PROMPT, SELF_CHECK_TOKENS, Completion, check_supported, sequence_seed

INVARIANCE_ENV = "VLLM_BATCH_INVARIANT"


def sampling_params_kwargs(cfg: DecodingConfig, eos_ids: list[int], seed: int) -> dict:
    """Keyword arguments for vllm.SamplingParams that sample exactly `cfg` (one completion)."""
    check_supported(cfg, "vllm")
    greedy = cfg.temperature == 0
    return {
        "n": 1,  # generate_jsonl already expands n samples into separate rows
        "temperature": 0.0 if greedy else cfg.temperature,
        "top_k": 0 if greedy else cfg.top_k,  # 0: no top-k
        "top_p": 1.0 if greedy else cfg.top_p,
        "min_p": 0.0 if greedy else cfg.min_p,
        "max_tokens": cfg.max_new_tokens,
        "seed": seed,
        "stop_token_ids": sorted(eos_ids),
        "ignore_eos": False,
        "skip_special_tokens": True,
        "detokenize": True,
        # No penalties: the reference backend has none.
        "repetition_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
    }


def engine_kwargs(model_dir: str, max_model_len: int, tensor_parallel_size: int, gpu_memory_utilization: float,
                  batch_invariant: bool, dtype: str = "bfloat16") -> dict:
    """Keyword arguments for vllm.LLM: an engine sized for max_model_len tokens per sequence."""
    return {
        "model": model_dir,
        "dtype": dtype,
        "max_model_len": max_model_len,
        "tensor_parallel_size": tensor_parallel_size,
        "gpu_memory_utilization": gpu_memory_utilization,
        "seed": 0,  # the engine's global seed; every request carries its own
        "enable_prefix_caching": not batch_invariant,
    }


def set_batch_invariance(on: bool) -> None:
    """VLLM_BATCH_INVARIANT for the vllm this process imports (its engine processes inherit it)."""
    value = "1" if on else "0"
    current = os.environ.get(INVARIANCE_ENV, "0")
    if current != value and any(m == "vllm" or m.startswith("vllm.") for m in sys.modules):
        raise ParamsError(f"vllm.batch_invariant={str(on).lower()}: vllm was already imported in this process "
                          f"with {INVARIANCE_ENV}={current}, which some of its modules read at import; run the "
                          "stage in a fresh process")
    os.environ[INVARIANCE_ENV] = value


def completion_from_output(output, eos_ids: list[int], max_new_tokens: int) -> Completion:
    """A Completion from one vllm CompletionOutput (token_ids, text, finish_reason)."""
    ids = list(output.token_ids)
    stopped = output.finish_reason == "stop"
    if stopped and (not ids or ids[-1] not in eos_ids):
        ids = ids + [eos_ids[0]]  # vLLM may drop the stop token from token_ids
    finish = "eos" if stopped else "length"
    text_ids = [t for t in output.token_ids if t not in eos_ids]
    return Completion(output.text, min(len(ids), max_new_tokens), finish, tuple(text_ids))


class VLLMBackend:
    name = "vllm"
    params_section = "vllm"  # load_backend builds it with params.yaml's `vllm` keys

    def __init__(self, model_dir: str | Path, tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
                 batch_invariant: bool = True, dtype: str = "bfloat16"):
        set_batch_invariance(batch_invariant)
        try:
            import vllm  # noqa: F401
        except ImportError as err:
            raise ParamsError("backend vllm needs the vllm extra on a GPU machine: "
                              "pip install -e '.[vllm]'") from err
        from transformers import AutoTokenizer

        from tasks.core.modeling import eos_token_ids

        self.model_dir = str(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.eos = eos_token_ids(self.model_dir, self.tokenizer)
        self.options = {"tensor_parallel_size": tensor_parallel_size,
                        "gpu_memory_utilization": gpu_memory_utilization, "batch_invariant": batch_invariant}
        self.dtype = dtype
        # The self-check decodes SELF_CHECK_TOKENS after its prompt and then scores the whole
        # sequence with one more token requested: the engine holds at least that.
        self.max_model_len = len(self.encode_chat(SELF_CHECK_PROMPT)) + SELF_CHECK_TOKENS + 1
        self._llm = None

    def size_for(self, tokens: int) -> None:
        """Hold sequences of `tokens` (prompt + new tokens): grows max_model_len until the
        engine starts; after that, more is refused (a restart would reload the model)."""
        if tokens <= self.max_model_len:
            return
        if self._llm is not None:
            raise ParamsError(f"backend vllm: a sequence of {tokens} tokens (prompt + max_new_tokens) is longer "
                              f"than the {self.max_model_len} its engine was started with; the stage must announce "
                              "its longest prompt before the first request (load_backend)")
        self.max_model_len = tokens

    @property
    def llm(self):
        if self._llm is None:
            from vllm import LLM

            self._llm = LLM(**engine_kwargs(self.model_dir, self.max_model_len, dtype=self.dtype, **self.options))
        return self._llm

    def resume_facts(self) -> dict:
        """What of the engine decides the rows beyond the decoding settings: in the resume key."""
        return {"exact_resume": self.options["batch_invariant"],
                "tensor_parallel_size": self.options["tensor_parallel_size"]}

    def encode_chat(self, messages: list) -> list[int]:
        from tasks.core.modeling import chat_token_ids

        return chat_token_ids(self.tokenizer, messages)

    def generate_batch(self, prompts: list[list[int]], cfg: DecodingConfig, seed: int,
                       progress=None, temperatures: list[float] | None = None) -> list[Completion]:
        from vllm import SamplingParams

        self.size_for(max(len(p) for p in prompts) + cfg.max_new_tokens)
        # SamplingParams are per request: a row's own T (`temperatures`) goes in its own.
        configs = [cfg] * len(prompts) if temperatures is None else \
            [cfg.model_copy(update={"temperature": t}) for t in temperatures]
        params = [SamplingParams(**sampling_params_kwargs(row_cfg, self.eos, sequence_seed(seed, i)))
                  for i, row_cfg in enumerate(configs)]
        inputs = [{"prompt_token_ids": p} for p in prompts]
        outputs = self.llm.generate(inputs, params, use_tqdm=False)
        done = [completion_from_output(o.outputs[0], self.eos, cfg.max_new_tokens) for o in outputs]
        if progress:  # no per-step hook in this engine: the shard's tokens once it is done
            progress(sum(c.num_tokens for c in done))
        return done

    def teacher_forced_ranks(self, ids: list[int], start: int) -> list[int]:
        from vllm import SamplingParams

        self.size_for(len(ids) + 1)
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
        output = self.llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
        # prompt_logprobs[i] holds the logprob (and rank) of ids[i] given ids[:i]
        return [output.prompt_logprobs[i][ids[i]].rank for i in range(start, len(ids))]
