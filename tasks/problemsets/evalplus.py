"""evalplus's HumanEval+ and MBPP+ (its released HumanEvalPlus-*.jsonl.gz / MbppPlus-*.jsonl.gz)
-> call-based problems whose expected values come from the canonical solution, run in the sandbox.

A released row (evalplus/data/humaneval.py and mbpp.py, `completeness_check` in
evalplus/data/utils.py, tools/humaneval|mbpp/init_plus.py):
  task_id             "HumanEval/0" / "Mbpp/2"
  prompt              HumanEval+: the signature and docstring; MBPP+: a docstring holding the task
                      and one of MBPP's assertions
  entry_point         the function's name
  canonical_solution  HumanEval+: the body completing `prompt`; MBPP+: a whole program
  base_input          the original benchmark's inputs: a list of argument lists
  plus_input          evalplus's added inputs, the same shape
  atol                the float tolerance (0 for most problems)
  contract, test (HumanEval+), assertion (MBPP+)  not used: evalplus prompts without the
                      contract and grades on the inputs, not on the original asserts
No expected value is stored: evalplus computes each by running prompt + canonical_solution on
the input (evaluate.get_groundtruth). So does this importer, in the sandbox:
  pass 1  the canonical program is called on every input in one sandboxed run (sandbox.ValuesJob);
          a call that raises, a run that times out, or a value JSON cannot carry drops the problem
  pass 2  a fresh sandbox checks the canonical program against those tests as evaluation will
          (sandbox.CallJob with the problem's atol): a canonical solution that disagrees there is
          nondeterministic and dropped
Answers are compared as evalplus compares them (tasks/sandbox/jail/compare.py): exact, else
within `atol` (atol 0 with a float expected: 1e-6). What is not reproduced, and so dropped and
counted as "special oracle": the problems evalplus grades with its own code
(evalplus/eval/_special_oracle.py and `unsafe_execute`): HumanEval/32 (find_zero: any root
passes) and MBPP+'s set-equality, not-None and per-task oracles. Inputs cross the sandbox as JSON:
where evalplus turns 40-odd MBPP+ tasks' list inputs back into tuples, sets or complex numbers
(`mbpp_deserialize_inputs`), they stay lists and strings here; a canonical solution that needs
the tuples fails on them and is dropped, counted.

The model is asked as evalplus asks chat models (evalplus/codegen.py's instruction prefix), and
its answer is the whole program.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Any, Iterable

from tasks import sandbox
from tasks.problemsets import BadRow, Report, collect, json_roundtrip
from tasks.sandbox.jail import compare

REQUIRED = ("task_id", "prompt", "entry_point", "canonical_solution", "base_input", "plus_input", "atol")
QUESTION = ("Please provide a self-contained Python script that solves the following problem in a "
            "markdown code block:\n```\n{prompt}\n```")
# Graded by evalplus with code of its own rather than by comparing values (see the module doc).
SPECIAL_ORACLES = {
    "HumanEval/32": "find_zero: any root of the polynomial passes",
    "Mbpp/164": "are_equivalent: every answer passes", "Mbpp/295": "sum_div: 0 also passes",
    "Mbpp/581": "surface_Area: compared with evalplus's own formula",
    "Mbpp/558": "digit_distance_nums: compared with evalplus's own function",
}
SET_EQUAL_FUNCTIONS = ("similar_elements", "find_char_long", "common_in_nested_lists", "extract_singly",
                       "larg_nnum", "intersection_array", "find_dissimilar", "Diff")
NOT_NONE_FUNCTIONS = ("check_str", "text_match_three", "text_starta_endb")


def benchmark(task_id: str) -> str:
    return "mbpp+" if task_id.startswith("Mbpp/") else "humaneval+"


def special_oracle(row: dict) -> str | None:
    task_id, entry = row["task_id"], row["entry_point"]
    if task_id in SPECIAL_ORACLES:
        return SPECIAL_ORACLES[task_id]
    if benchmark(task_id) == "mbpp+" and entry in SET_EQUAL_FUNCTIONS:
        return f"{entry}: compared as sets"
    if benchmark(task_id) == "mbpp+" and entry in NOT_NONE_FUNCTIONS:
        return f"{entry}: only whether the answer is None is compared"
    return None


def _inputs(row: dict, field: str) -> list[list]:
    value = row[field]
    if not isinstance(value, list) or not all(isinstance(args, list) for args in value):
        raise BadRow("malformed inputs", f"{field} is not a list of argument lists")
    return value


def static_problem(row: dict, max_tests: int | None) -> dict:
    """A row -> a problem without its expected values yet (`inputs` holds the argument lists)."""
    missing = [f for f in REQUIRED if f not in row or row[f] is None]
    wrong = [f for f in ("task_id", "prompt", "entry_point", "canonical_solution")
             if f not in missing and (not isinstance(row[f], str) or not row[f].strip())]
    if missing or wrong:
        parts = ([f"missing: {', '.join(missing)}"] if missing else []) + \
                ([f"not a non-empty string: {', '.join(wrong)}"] if wrong else [])
        raise BadRow("missing field", "; ".join(parts))
    atol = row["atol"]
    if not isinstance(atol, (int, float)) or isinstance(atol, bool) or not math.isfinite(atol) or atol < 0:
        raise BadRow("bad atol", f"atol must be a number >= 0, not {atol!r}"[:200])
    if not row["entry_point"].isidentifier():
        raise BadRow("missing field", f"entry_point {row['entry_point']!r} is not a function name")
    oracle = special_oracle(row)
    if oracle:
        raise BadRow("special oracle", oracle)
    base, plus = _inputs(row, "base_input"), _inputs(row, "plus_input")
    inputs = base + plus
    if max_tests:
        inputs = inputs[:max_tests]
    if not inputs:
        raise BadRow("no tests", "base_input and plus_input are empty")
    return {"task_id": row["task_id"], "kind": "call", "question": QUESTION.format(prompt=row["prompt"].strip()),
            "entry_point": row["entry_point"], "atol": atol,
            "canonical_solution": row["prompt"] + row["canonical_solution"],
            "source": "evalplus", "benchmark": benchmark(row["task_id"]),
            "base_tests": min(len(base), len(inputs)), "inputs": inputs}


def run_failure(result: str) -> str:
    """A drop reason from the sandbox's words for a run that did not answer every call."""
    if result in ("timed out", "memory limit", "output limit"):
        return result
    if "sandbox error" in result:
        return "sandbox error"
    return "canonical solution fails"


def expected_values(problem: dict, values: sandbox.Values) -> list:
    """The expected value of each input from pass 1; BadRow naming the input that failed."""
    if not values.ok:
        raise BadRow(run_failure(values.result), values.result)
    if len(values.outcomes) != len(problem["inputs"]):
        raise BadRow("canonical solution fails", f"{len(values.outcomes)} of {len(problem['inputs'])} calls answered")
    expected = []
    for number, outcome in enumerate(values.outcomes, 1):
        where = "base" if number <= problem["base_tests"] else "plus"
        if not outcome.returned:
            reason = "not JSON-comparable" if outcome.error.startswith("unsupported") else "canonical solution fails"
            raise BadRow(reason, f"input {number} ({where}): {outcome.error}")
        try:
            value = json_roundtrip(outcome.value)
        except (ValueError, TypeError) as err:
            raise BadRow("not JSON-comparable", f"input {number} ({where}): {err}") from None
        if not compare.values_match(outcome.value, value):  # e.g. int dict keys turned into str
            raise BadRow("not JSON-comparable", f"input {number} ({where}): changes in JSON")
        expected.append(value)
    return expected


def verify_failure(result: str) -> str:
    if result.startswith("failed: wrong answer"):
        return "nondeterministic"
    return run_failure(result)


def convert(records: Iterable[tuple[str, Any]], report: Report, timeout_s: float = 5.0,
            memory_mb: int = 1024, workers: int = 0, max_tests: int | None = None,
            limit: int | None = None, progress: bool = False) -> list[dict]:
    """Released rows -> problems; every drop is counted in `report` with its id and file line.
    `timeout_s` bounds one problem's run over all its inputs (as `score` bounds an answer's)."""
    started = time.monotonic()
    log = (lambda text: print(f"evalplus: {text}", file=sys.stderr, flush=True)) if progress else (lambda text: None)
    places: dict[str, str] = {}
    candidates = collect(records, report, None, lambda row: static_problem(row, max_tests), limit=limit,
                         id_field="task_id", places=places)
    report.notes.pop("skipped", None)
    log(f"{len(candidates)} problems to run (pass 1: the canonical solutions on every input)")
    kept: list[dict] = []
    if candidates:
        jobs = [sandbox.ValuesJob(p["canonical_solution"], p["entry_point"], p["inputs"]) for p in candidates]
        with sandbox.Sandbox(workers=workers) as box:
            results = box.call_values(jobs, timeout_s=timeout_s, memory_mb=memory_mb,
                                      output_limit_kb=1 << 16, progress=progress)
            report.source["isolation"] = box.level
        ready = []
        for problem, values in zip(candidates, results):
            try:
                problem["tests"] = [{"args": args, "expected": value}
                                    for args, value in zip(problem["inputs"], expected_values(problem, values))]
            except BadRow as err:
                report.drop(problem["task_id"], places[problem["task_id"]], *err.args)
                continue
            ready.append(problem)
        log(f"pass 2: check {len(ready)} canonical solutions against their tests in a fresh sandbox")
        checks = [sandbox.CallJob(p["canonical_solution"], p["entry_point"],
                                  [sandbox.CallCase(t["args"], t["expected"]) for t in p["tests"]], atol=p["atol"])
                  for p in ready]
        with sandbox.Sandbox(workers=workers) as box:
            verdicts = box.check(checks, timeout_s=timeout_s, memory_mb=memory_mb, output_limit_kb=1 << 16)
        for problem, verdict in zip(ready, verdicts):
            if verdict.passed:
                del problem["inputs"]
                kept.append(problem)
            else:
                report.drop(problem["task_id"], places[problem["task_id"]], verify_failure(verdict.result),
                            verdict.result)
    report.kept = len(kept)
    report.notes.update(kinds={"call": len(kept)}, timeout_s=timeout_s, memory_mb=memory_mb,
                        max_tests=max_tests, seconds=round(time.monotonic() - started, 1),
                        benchmarks={b: sum(p["benchmark"] == b for p in kept) for b in ("humaneval+", "mbpp+")})
    log(f"kept {report.kept}; dropped {dict(report.dropped)}")
    return kept
