"""The batch loop every sampling stage runs: n completions per prompt from any backend
(tasks.sampling.backends), written as JSONL rows with the prompt's key, the chat messages,
the raw text, the token count and the finish reason ("eos" / "length").

Work is cut into a fixed plan of batches, each seeded from (seed, batch number), and each
finished batch is appended to the output's partial file under checkpoints/partial/ (outside
DVC's outs, so it survives `dvc repro` and the flow). A killed run resumes from the complete
batches it wrote and produces the same rows an uninterrupted run would. The partial file's
first line is its resume key (the model dir's hash, the prompts with each one's own temperature
where it has one, the decoding settings, the backend, the hashes of the sampling modules loaded
and the engines' versions, and for vllm its tensor parallelism and `exact_resume`): a partial
file of any other run is discarded, with a line saying what differs, never mixed in. vllm
outside its batch-invariant mode resumes too, but its remaining batches are a new draw
(`exact_resume: false` in the key, and a line says so).

A request may carry its own temperature: one run then decodes a prompt at several T (evaluate's
T_eval sweep) with batches full where a run per T would leave most of each batch's slots empty.
Requests of one prompt listed next to each other land in one batch (the plan keeps request order
among prompts of equal length), where the continuous backends compute the prompt's prefill once.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from tqdm import tqdm

from tasks.core.config import DecodingConfig
from tasks.core.extract import last_fenced_block
from tasks.core.files import DataError, dir_sha256, key_differences, resume_key, write_jsonl
from tasks.core.paths import PARTIALS, partial_of
from tasks.core.stack import code_fingerprint, versions
from tasks.sampling.backends import batch_seed, load_backend

SAMPLING_CODE = Path(__file__).resolve().parent
ENGINES = ("torch", "transformers", "ctranslate2", "vllm")  # counted in the key where imported


@dataclass(frozen=True)
class Request:
    key: dict  # identifies the request in output rows, e.g. {"prompt_id": "HumanEval/0"}
    messages: list
    temperature: float | None = None  # this request's T, in place of the run's cfg.temperature


def plan_batches(prompt_lengths: list[int], n: int, batch_size: int) -> list[list[tuple[int, int]]]:
    """The fixed plan of (request, sample index) units per batch: longest prompts first, so a
    batch holds prompts of similar length; the plan is the unit of seeding and resume."""
    units = sorted(((r, s) for r in range(len(prompt_lengths)) for s in range(n)),
                   key=lambda u: (-prompt_lengths[u[0]], u))
    return [units[i:i + batch_size] for i in range(0, len(units), batch_size)]


@cache
def code_version() -> dict:
    """What of the code decides the rows: the sampling modules this process loaded (the batch
    loop, the registry, the chosen backend and its kernels; not the other backends) and the
    versions of the engines it imported."""
    return {"files": code_fingerprint(SAMPLING_CODE),
            "engines": {p: v for p, v in versions(*ENGINES).items() if p in sys.modules}}


@cache
def _dir_sha256(path: Path, files: tuple) -> str:
    return dir_sha256(path)


def model_hash(model_dir: Path) -> str:
    """The model dir's sha256, once per process for unchanged files: `evaluate` starts several
    runs (the validation sweep, the test sets per seed), and the default model is 538 MB."""
    stats = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(model_dir.iterdir()) if p.is_file())
    return _dir_sha256(model_dir.resolve(), stats)


def run_key(model_dir: str | Path, requests: list[Request], prompts: list[list[int]], cfg: DecodingConfig,
            backend) -> dict:
    """What decides the rows of a run: the resume key of its partial file."""
    model = Path(model_dir)
    prompts_hash = hashlib.sha256(json.dumps([[r.key, p, r.temperature]
                                              for r, p in zip(requests, prompts)]).encode())
    # `slots` only says how many sequences decode at once: the rows do not depend on it (tested).
    decoding = {name: getattr(cfg, name) for name in DecodingConfig.model_fields if name != "slots"}
    # An engine's own settings that decide the rows, and whether a resumed run writes exactly the
    # rows an uninterrupted one would (vllm: `exact_resume`, true only in batch-invariant mode).
    facts = getattr(backend, "resume_facts", None)
    return resume_key(model=model_hash(model) if model.is_dir() else str(model_dir),
                      prompts=prompts_hash.hexdigest(), decoding=decoding,
                      backend=getattr(backend, "name", type(backend).__name__), code=code_version(),
                      **({"engine": facts()} if facts else {}))


def _read_partial(path: Path, key: dict, batch_sizes: dict[int, int], desc: str) -> list[dict]:
    """Rows of the batches that were written completely by this same run (same resume key); a
    torn last line is dropped, and a partial file of another run is discarded."""
    if not path.exists():
        return []
    by_batch: dict[int, list[dict]] = {}
    with open(path) as f:
        try:
            header = json.loads(f.readline() or "null")
        except json.JSONDecodeError:
            header = None
        recorded = header.get("resume_key") if isinstance(header, dict) else None
        if recorded != key:
            why = "; ".join(key_differences(recorded, key))
            print(f"{desc}: discarding {path}: written by another run ({why})")
            return []
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break
            by_batch.setdefault(row["batch"], []).append(row)
    return [row for b, rows in by_batch.items() if len(rows) == batch_sizes.get(b) for row in rows]


def generate_jsonl(model_dir: str | Path, requests: list[Request], cfg: DecodingConfig,
                   out_path: str | Path, desc: str = "sampling", backend=None, engine: dict | None = None) -> list[dict]:
    """n completions per request into `out_path` (JSONL, ordered by request then sample index).
    engine: the params sections of the engines (load_backend), when no backend is given."""
    done = generate_rows(model_dir, requests, cfg, partial_of(out_path), desc, backend, engine)
    check_not_degenerate(done, out_path)
    write_jsonl(out_path, done)
    return done  # the complete partial stays until the stage ends (discard_partials): a rerun reuses it


def generate_rows(model_dir: str | Path, requests: list[Request], cfg: DecodingConfig, partial: str | Path,
                  desc: str = "sampling", backend=None, engine: dict | None = None,
                  shard: tuple[int, int] | None = None) -> list[dict]:
    """n completions per request, ordered by request then sample index, resumable through the
    `partial` file; nothing else is written (a caller that splits the rows among several
    outputs writes them). shard=(i, N): only the batches b of the plan with b % N == i, each
    exactly the rows the whole run writes for it (a batch's rows depend on its prompts, the
    decoding and batch_seed(seed, b) alone), so N shards' rows together are the whole run's."""
    partial = Path(partial)
    backend = backend or load_backend(cfg.backend, model_dir, engine=engine,
                                      conversations=[r.messages for r in requests], max_new_tokens=cfg.max_new_tokens)
    prompts = [backend.encode_chat(r.messages) for r in requests]
    plan = plan_batches([len(p) for p in prompts], cfg.n, cfg.batch_size)
    mine = [b for b in range(len(plan)) if shard is None or b % shard[1] == shard[0]]
    units = [unit for b in mine for unit in plan[b]]
    key = run_key(model_dir, requests, prompts, cfg, backend)
    done = _read_partial(partial, key, {b: len(plan[b]) for b in mine}, desc)  # rows of other batches dropped
    finished_batches = {row["batch"] for row in done}
    partial.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(partial, [{"resume_key": key}, *done])  # the key first; a torn tail dropped
    if done:
        print(f"{desc}: resuming, {len(done)} of {len(units)} completions already written")
        if key.get("engine", {}).get("exact_resume") is False:
            print(f"{desc}: the batches still to run are a new draw, not the rows an uninterrupted run would "
                  f"write ({key['backend']} is not in its batch-invariant mode)")
    any_own_t = any(r.temperature is not None for r in requests)
    start, new_tokens = time.time(), 0
    with open(partial, "a") as f, tqdm(total=len(units), initial=len(done), desc=desc, unit="sample") as bar:
        decoded, shown = [0], [time.time()]

        def progress(tokens: int) -> None:
            # A batch can take minutes: show tokens as they are decoded (once a second), not only
            # whole batches.
            decoded[0] += tokens
            if time.time() - shown[0] >= 1.0:
                shown[0] = time.time()
                bar.set_postfix(tokens=decoded[0], tok_s=f"{decoded[0] / max(time.time() - start, 1e-9):.0f}")

        for b in mine:
            batch = plan[b]
            if b in finished_batches:
                continue
            own_t = {"temperatures": [cfg.temperature if requests[r].temperature is None else requests[r].temperature
                                      for r, _ in batch]} if any_own_t else {}
            outs = backend.generate_batch([prompts[r] for r, _ in batch], cfg, seed=batch_seed(cfg.seed, b),
                                          progress=progress, **own_t)
            for (r, s), out in zip(batch, outs):
                row = {**requests[r].key, "sample_index": s, "messages": requests[r].messages,
                       "text": out.text, "num_tokens": out.num_tokens, "finish_reason": out.finish_reason,
                       "batch": b}
                f.write(json.dumps(row) + "\n")
                done.append(row)
                new_tokens += out.num_tokens
            f.flush()
            os.fsync(f.fileno())
            decoded[0] = new_tokens
            bar.update(len(batch))
            bar.set_postfix(tokens=new_tokens, tok_s=f"{new_tokens / max(time.time() - start, 1e-9):.0f}")
    order = {tuple(r.key.values()): i for i, r in enumerate(requests)}
    done.sort(key=lambda row: (order[tuple(row[k] for k in requests[0].key)], row["sample_index"]))
    return done


def discard_partials(out: str | Path) -> None:
    """Drop the partial work of an output (a file, or every output under a directory) once the
    stage that made it has finished."""
    partial = partial_of(out)
    partial.unlink(missing_ok=True)
    if partial.is_relative_to(PARTIALS):  # a directory's outputs have theirs in its mirror there
        shutil.rmtree(partial.with_name(Path(out).name), ignore_errors=True)



def check_not_degenerate(rows: list[dict], where: str | Path) -> None:
    """Stop when the output is one no healthy model writes: not one sample ended at EOS and not
    one holds a fenced code block (a decoder that lost its context writes exactly that)."""
    if rows and not any(r["finish_reason"] == "eos" for r in rows) and \
            not any(last_fenced_block(r["text"]) is not None for r in rows):
        example = rows[0]["text"][:80]
        raise DataError(f"{where}: none of the {len(rows)} samples ended at EOS and none holds a fenced code "
                        f"block (the first begins {example!r}): the backend is decoding garbage, or "
                        f"max_new_tokens is far too small; {where} was not written")
