"""Sampling from a model: one backend interface used by `sample` and `evaluate`.

Semantics every backend keeps: the model's chat template, temperature -> top-k -> top-p ->
min-p (vLLM's order), max_new_tokens, stop at EOS, a seed, n samples per prompt, and a
finish reason ("eos" / "length") with the token count of each completion.

Work is cut into a fixed plan of batches, each seeded from (seed, batch number), and each
finished batch is appended to `<out>.partial`. A killed run resumes from the complete
batches it wrote and produces the same rows an uninterrupted run would.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from tasks.config import DecodingConfig
from tasks.files import write_jsonl


@dataclass(frozen=True)
class Request:
    key: dict  # identifies the prompt in output rows, e.g. {"prompt_id": "HumanEval/0"}
    messages: list


@dataclass(frozen=True)
class Completion:
    text: str
    num_tokens: int
    finish_reason: str  # "eos" or "length"


class TransformersBackend:
    """The reference backend: HF model, KV cache, finished sequences leave the batch."""

    name = "transformers"

    def __init__(self, model_dir: str | Path, dtype: torch.dtype = torch.bfloat16):
        from tasks.modeling import device, eos_token_ids, load_pretrained, use_all_cores

        use_all_cores()
        self.device = device()
        self.model, self.tokenizer = load_pretrained(model_dir, dtype=dtype)
        self.model.to(self.device).eval()
        self.eos = eos_token_ids(self.model, self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id

    def encode_chat(self, messages: list) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)

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
    def generate_batch(self, prompts: list[list[int]], cfg: DecodingConfig, seed: int) -> list[Completion]:
        from transformers import DynamicCache

        generator = torch.Generator(self.device).manual_seed(seed)
        warpers = self.warpers(cfg) if cfg.temperature > 0 else None
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts], device=self.device)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = self.model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                            cache=cache, use_cache=True).logits[:, -1, :].float()
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
                                cache=cache, use_cache=True).logits[:, -1, :].float()
        return [
            Completion(self.tokenizer.decode(toks, skip_special_tokens=True), len(toks) + (f == "eos"), f)
            for toks, f in zip(tokens, finish)
        ]


def _lazy(module: str, cls: str):
    """A backend class imported on first use, so optional engines stay optional."""
    def load(model_dir: str | Path):
        import importlib

        return getattr(importlib.import_module(module), cls)(model_dir)
    return load


BACKENDS = {
    "transformers": TransformersBackend,
    "continuous": _lazy("tasks.backend_continuous", "ContinuousBackend"),
    "continuous-int8": _lazy("tasks.backend_continuous", "ContinuousInt8Backend"),
    "ctranslate2": _lazy("tasks.backend_ct2", "CT2Backend"),
    "ctranslate2-float32": _lazy("tasks.backend_ct2", "CT2Float32Backend"),
    "vllm": _lazy("tasks.backend_vllm", "VLLMBackend"),
}


def load_backend(name: str, model_dir: str | Path):
    return BACKENDS[name](model_dir)


def _read_partial(path: Path, batch_sizes: dict[int, int]) -> list[dict]:
    """Rows of the batches that were written completely; a torn last line is dropped."""
    if not path.exists():
        return []
    by_batch: dict[int, list[dict]] = {}
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break
            by_batch.setdefault(row["batch"], []).append(row)
    return [row for b, rows in by_batch.items() if len(rows) == batch_sizes.get(b) for row in rows]


def generate_jsonl(model_dir: str | Path, requests: list[Request], cfg: DecodingConfig,
                   out_path: str | Path, desc: str = "sampling", backend=None) -> list[dict]:
    """n completions per request into `out_path` (JSONL, ordered by request then sample index)."""
    out_path = Path(out_path)
    partial = out_path.with_name(out_path.name + ".partial")
    backend = backend or load_backend(cfg.backend, model_dir)
    prompts = [backend.encode_chat(r.messages) for r in requests]
    units = sorted(((r, s) for r in range(len(requests)) for s in range(cfg.n)),
                   key=lambda u: (-len(prompts[u[0]]), u))
    plan = [units[i:i + cfg.batch_size] for i in range(0, len(units), cfg.batch_size)]
    done = _read_partial(partial, {b: len(batch) for b, batch in enumerate(plan)})
    finished_batches = {row["batch"] for row in done}
    partial.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(partial, done)  # drop a torn tail before appending
    if done:
        print(f"{desc}: resuming, {len(done)} of {len(units)} completions already written")
    start, new_tokens = time.time(), 0
    with open(partial, "a") as f, tqdm(total=len(units), initial=len(done), desc=desc, unit="sample") as bar:
        for b, batch in enumerate(plan):
            if b in finished_batches:
                continue
            outs = backend.generate_batch([prompts[r] for r, _ in batch], cfg, seed=cfg.seed * 1_000_003 + b)
            for (r, s), out in zip(batch, outs):
                row = {**requests[r].key, "sample_index": s, "messages": requests[r].messages,
                       "text": out.text, "num_tokens": out.num_tokens, "finish_reason": out.finish_reason,
                       "batch": b}
                f.write(json.dumps(row) + "\n")
                done.append(row)
                new_tokens += out.num_tokens
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{new_tokens / max(time.time() - start, 1e-9):.0f}")
    order = {tuple(r.key.values()): i for i, r in enumerate(requests)}
    done.sort(key=lambda row: (order[tuple(row[k] for k in requests[0].key)], row["sample_index"]))
    write_jsonl(out_path, done)
    partial.unlink()
    return done

