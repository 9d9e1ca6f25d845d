"""vLLM sampling backend, for GPU machines (`pip install -e '.[vllm]'`).

`sampling_params_kwargs` maps a DecodingConfig to vLLM's SamplingParams keywords; it is a
pure function, tested without vllm installed. Semantics kept:

- temperature 0 is greedy; top_k 0 means "no top-k" (vLLM's -1); max_new_tokens ->
  max_tokens; EOS ids -> stop_token_ids (vLLM also stops at the tokenizer's EOS); the EOS is
  not returned in the text, but counts in num_tokens like the reference backend's;
- order of transforms: vLLM (V1 engine) applies temperature, then min-p (an argmax-invariant
  logits processor), then top-k and top-p. Top-k and min-p commute (both keep a prefix of
  the ranking, and min-p compares ratios to the top probability, which renormalising does
  not change), but top-p and min-p do not: top-p over the min-p survivors can keep fewer
  tokens than min-p over the top-p nucleus. A config with both min_p > 0 and top_p < 1 is
  therefore rejected (naming the keys) rather than sampled in a different order;
- seeds: each prompt of a batch gets its own per-request seed derived from (batch seed,
  row) by `sequence_seed`, as the continuous backends seed theirs, so a batch's samples depend only on its prompts, config and seed (vLLM's
  per-request generators), which keeps generate_jsonl's resume exact.
"""
from __future__ import annotations

from pathlib import Path

from tasks.core.config import DecodingConfig, ParamsError
from tasks.sampling.backends import Completion, check_supported, sequence_seed


def sampling_params_kwargs(cfg: DecodingConfig, eos_ids: list[int], seed: int) -> dict:
    """Keyword arguments for vllm.SamplingParams that sample exactly `cfg` (one completion)."""
    check_supported(cfg, "vllm")
    greedy = cfg.temperature == 0
    return {
        "n": 1,  # generate_jsonl already expands n samples into separate rows
        "temperature": 0.0 if greedy else cfg.temperature,
        "top_k": -1 if greedy or cfg.top_k == 0 else cfg.top_k,
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

    def __init__(self, model_dir: str | Path, dtype: str = "bfloat16", gpu_memory_utilization: float = 0.85):
        try:
            from vllm import LLM
        except ImportError as err:
            raise ParamsError("backend vllm needs the vllm extra on a GPU machine: "
                              "pip install -e '.[vllm]'") from err
        from transformers import AutoTokenizer

        from tasks.core.modeling import eos_token_ids

        self.model_dir = str(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.eos = eos_token_ids(self.model_dir, self.tokenizer)
        self.llm = LLM(model=self.model_dir, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                       seed=0, enable_prefix_caching=True)

    def encode_chat(self, messages: list) -> list[int]:
        from tasks.core.modeling import chat_token_ids

        return chat_token_ids(self.tokenizer, messages)

    def generate_batch(self, prompts: list[list[int]], cfg: DecodingConfig, seed: int,
                       progress=None) -> list[Completion]:  # no per-step hook in this engine
        from vllm import SamplingParams

        params = [SamplingParams(**sampling_params_kwargs(cfg, self.eos, sequence_seed(seed, i)))
                  for i in range(len(prompts))]
        inputs = [{"prompt_token_ids": p} for p in prompts]
        outputs = self.llm.generate(inputs, params, use_tqdm=False)
        return [completion_from_output(o.outputs[0], self.eos, cfg.max_new_tokens) for o in outputs]

    def teacher_forced_ranks(self, ids: list[int], start: int) -> list[int]:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
        output = self.llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
        # prompt_logprobs[i] holds the logprob (and rank) of ids[i] given ids[:i]
        return [output.prompt_logprobs[i][ids[i]].rank for i in range(start, len(ids))]
