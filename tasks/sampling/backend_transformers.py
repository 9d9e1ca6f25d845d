"""The reference sampling backend (`transformers`): the HF model in bf16 with its own KV-cache
loop; finished sequences leave the batch. Every other backend is checked against it.

Memory: the prefill keeps only the last position's logits (`logits_to_keep=1`): the full
[rows, prompt, vocab] tensor is ~47 GB in bf16 at 256 prompts x 600 tokens x Qwen3's 151,936
tokens. `max_batch_tokens` caps rows x (longest prompt + max_new_tokens) per forward batch: a
seeded batch over it runs as consecutive sub-batches (backends.token_budget_groups).

Seeds: row i of a seeded batch draws its uniforms from its own generator (sequence_seed(seed,
i)) and samples by inverse CDF, so its draws do not depend on the sub-batch it runs in or on
which rows are still decoding beside it; its logits match an uncapped run's up to the
arithmetic of a different batch shape (bit for bit in float32 on CPU: tested)."""
from __future__ import annotations

from pathlib import Path

import torch

from tasks.core.config import DecodingConfig
from tasks.core.modeling import chat_token_ids, device, eos_token_ids, load_pretrained, use_all_cores
from tasks.sampling.backends import Completion, sequence_seed, token_budget_groups


def cache_keyword(model) -> str:
    """The keyword a model's forward takes its KV cache by: `past_key_values` up to transformers
    5.2x, `cache` after. A keyword the forward does not know is swallowed by its **kwargs, and
    every token would then decode without its context (seen on transformers 5.17 with `cache=`)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def last_logits_only(model) -> dict:
    """The forward keyword that computes logits at the last position only (transformers 5.0 and
    later: `logits_to_keep`), or none for a model whose forward lacks it."""
    import inspect

    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row of `probs` (rows of non-negative mass), at `uniforms` (one per row, in
    [0, 1)); right=True never lands on a zero-mass token."""
    cdf = probs.cumsum(-1)
    choice = torch.searchsorted(cdf, (uniforms * cdf[:, -1]).unsqueeze(-1), right=True)
    return choice.clamp(max=probs.shape[-1] - 1).squeeze(-1)


class TransformersBackend:
    """The reference backend: HF model, KV cache, finished sequences leave the batch."""

    name = "transformers"

    def __init__(self, model_dir: str | Path, dtype: torch.dtype = torch.bfloat16):
        use_all_cores()
        self.device = device()
        self.model, self.tokenizer = load_pretrained(model_dir, dtype=dtype)
        self.model.to(self.device).eval()
        self.eos = set(eos_token_ids(model_dir, self.tokenizer))
        self.pad_id = self.tokenizer.pad_token_id
        self.cache_kwarg = cache_keyword(self.model)
        self.prefill_kwargs = last_logits_only(self.model)

    def encode_chat(self, messages: list) -> list[int]:
        return chat_token_ids(self.tokenizer, messages)

    def warpers(self, cfg: DecodingConfig):
        from transformers import (LogitsProcessorList, MinPLogitsWarper, TemperatureLogitsWarper,
                                  TopKLogitsWarper, TopPLogitsWarper)

        procs = LogitsProcessorList()
        if cfg.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(cfg.temperature))
        if cfg.top_k:
            procs.append(TopKLogitsWarper(top_k=cfg.top_k))
        if cfg.top_p < 1.0:
            procs.append(TopPLogitsWarper(top_p=cfg.top_p))
        if cfg.min_p > 0.0:
            procs.append(MinPLogitsWarper(min_p=cfg.min_p))
        return procs

    def generate_batch(self, prompts: list[list[int]], cfg: DecodingConfig, seed: int,
                       progress=None, temperatures: list[float] | None = None) -> list[Completion]:
        out: list[Completion] = [None] * len(prompts)  # type: ignore[list-item]
        for rows in token_budget_groups([len(p) for p in prompts], cfg.max_new_tokens, cfg.max_batch_tokens):
            done = self._generate([prompts[i] for i in rows], [sequence_seed(seed, i) for i in rows], cfg, progress,
                                  None if temperatures is None else [temperatures[i] for i in rows])
            for i, completion in zip(rows, done):
                out[i] = completion
        return out

    @torch.inference_mode()
    def _generate(self, prompts: list[list[int]], seeds: list[int], cfg: DecodingConfig,
                  progress=None, temperatures: list[float] | None = None) -> list[Completion]:
        from transformers import DynamicCache

        generators = [torch.Generator().manual_seed(s) for s in seeds]  # on the CPU: a uniform per row and step
        if temperatures is None:
            warpers = self.warpers(cfg) if cfg.temperature > 0 else None
        else:
            # One T per row: the logits are divided row by row, then truncated by the other
            # warpers (each works row by row); rows at T=0 take the argmax.
            warpers = self.warpers(cfg.model_copy(update={"temperature": 1.0}))
            row_t = torch.tensor(temperatures, dtype=torch.float32, device=self.device)
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts], device=self.device)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = self.model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                            **{self.cache_kwarg: cache}, use_cache=True, **self.prefill_kwargs).logits[:, -1, :].float()
        rows = torch.arange(len(prompts), device=self.device)
        tokens: list[list[int]] = [[] for _ in prompts]
        finish = ["length"] * len(prompts)
        for step in range(cfg.max_new_tokens):
            if temperatures is not None:
                t = row_t[rows]
                greedy = t == 0
                probs = torch.softmax(warpers(None, logits / t.masked_fill(greedy, 1.0)[:, None]), dim=-1)
                uniforms = torch.stack([torch.rand((), generator=generators[row]) for row in rows.tolist()])
                next_ids = torch.where(greedy, logits.argmax(-1), inverse_cdf(probs, uniforms.to(self.device)))
            elif cfg.temperature == 0:
                next_ids = logits.argmax(-1)
            else:
                # None for input_ids: temperature/top-k/top-p/min-p never read the history.
                probs = torch.softmax(warpers(None, logits), dim=-1)
                uniforms = torch.stack([torch.rand((), generator=generators[row]) for row in rows.tolist()])
                next_ids = inverse_cdf(probs, uniforms.to(self.device))
            if progress:
                progress(len(next_ids))
            keep = []
            for i, (row, tok) in enumerate(zip(rows.tolist(), next_ids.tolist())):
                if tok in self.eos:
                    finish[row] = "eos"
                else:
                    tokens[row].append(tok)
                    keep.append(i)
            if not keep or step == cfg.max_new_tokens - 1:
                break
            if len(keep) < len(rows):
                # Finished sequences leave the batch: no decoding of padding to the end.
                idx = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(idx)
                rows, next_ids, attention = rows[idx], next_ids[idx], attention[idx]
                positions = positions[idx]
            attention = torch.cat([attention, attention.new_ones(len(rows), 1)], dim=1)
            positions = positions[:, -1:] + 1
            logits = self.model(input_ids=next_ids[:, None], attention_mask=attention, position_ids=positions,
                                **{self.cache_kwarg: cache}, use_cache=True).logits[:, -1, :].float()
        return [
            Completion(self.tokenizer.decode(toks, skip_special_tokens=True), len(toks) + (f == "eos"), f, tuple(toks))
            for toks, f in zip(tokens, finish)
        ]

    @torch.inference_mode()
    def teacher_forced_ranks(self, ids: list[int], start: int) -> list[int]:
        logits = self.model(input_ids=torch.tensor([ids], device=self.device)).logits[0].float()
        predicted = logits[start - 1:-1]
        chosen = torch.tensor(ids[start:], device=self.device)
        return ((predicted > predicted.gather(1, chosen[:, None])).sum(1) + 1).tolist()
