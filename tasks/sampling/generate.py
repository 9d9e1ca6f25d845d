"""The batch loop every sampling stage runs: n completions per prompt from any backend
(tasks.sampling.backends), written as JSONL rows with the prompt's key, the chat messages,
the raw text, the token count and the finish reason ("eos" / "length").

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

from tqdm import tqdm

from tasks.core.config import DecodingConfig
from tasks.core.files import write_jsonl
from tasks.sampling.backends import batch_seed, load_backend


@dataclass(frozen=True)
class Request:
    key: dict  # identifies the prompt in output rows, e.g. {"prompt_id": "HumanEval/0"}
    messages: list


def plan_batches(prompt_lengths: list[int], n: int, batch_size: int) -> list[list[tuple[int, int]]]:
    """The fixed plan of (request, sample index) units per batch: longest prompts first, so a
    batch holds prompts of similar length; the plan is the unit of seeding and resume."""
    units = sorted(((r, s) for r in range(len(prompt_lengths)) for s in range(n)),
                   key=lambda u: (-prompt_lengths[u[0]], u))
    return [units[i:i + batch_size] for i in range(0, len(units), batch_size)]


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
    plan = plan_batches([len(p) for p in prompts], cfg.n, cfg.batch_size)
    units = [unit for batch in plan for unit in batch]
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
            outs = backend.generate_batch([prompts[r] for r, _ in batch], cfg, seed=batch_seed(cfg.seed, b))
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

