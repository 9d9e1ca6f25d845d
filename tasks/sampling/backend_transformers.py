"""The reference sampling backend (`transformers`): the HF model in bf16 with its own KV-cache
loop; finished sequences leave the batch. Every other backend is checked against it."""
from __future__ import annotations

from pathlib import Path

import torch

from tasks.core.config import DecodingConfig
from tasks.core.modeling import chat_token_ids, device, eos_token_ids, load_pretrained, use_all_cores
from tasks.sampling.backends import Completion


def cache_keyword(model) -> str:
    """The keyword a model's forward takes its KV cache by: `past_key_values` up to transformers
    5.2x, `cache` after. A keyword the forward does not know is swallowed by its **kwargs, and
    every token would then decode without its context (seen on transformers 5.17 with `cache=`)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


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

    @torch.inference_mode()
    def generate_batch(self, prompts: list[list[int]], cfg: DecodingConfig, seed: int,
                       progress=None) -> list[Completion]:
        from transformers import DynamicCache

        generator = torch.Generator(self.device).manual_seed(seed)
        warpers = self.warpers(cfg) if cfg.temperature > 0 else None
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts], device=self.device)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = self.model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                            **{self.cache_kwarg: cache}, use_cache=True).logits[:, -1, :].float()
        rows = torch.arange(len(prompts), device=self.device)
        tokens: list[list[int]] = [[] for _ in prompts]
        finish = ["length"] * len(prompts)
        for step in range(cfg.max_new_tokens):
            if cfg.temperature == 0:
                next_ids = logits.argmax(-1)
            else:
                # None for input_ids: temperature/top-k/top-p/min-p never read the history.
                probs = torch.softmax(warpers(None, logits), dim=-1)
                next_ids = torch.multinomial(probs, 1, generator=generator).squeeze(1)
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
