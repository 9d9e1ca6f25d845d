"""The sandbox job that checks a program, or a model's answer, against a problem's tests."""
from __future__ import annotations

from tasks import sandbox
from tasks.core.extract import last_fenced_block, parses, program_from_answer
from tasks.core.problems import problem_kind


# LiveCodeBench's grader (lcb_runner/evaluation/testing_util.py, `import_string`) runs every
# answer after these imports, so an answer that uses `List[int]` from the starter code without importing it passes
# there; it must pass here too.
LIVECODEBENCH_PREAMBLE = (
    "from string import *\nfrom re import *\nfrom datetime import *\nfrom collections import *\n"
    "from heapq import *\nfrom bisect import *\nfrom copy import *\nfrom math import *\n"
    "from random import *\nfrom statistics import *\nfrom itertools import *\nfrom functools import *\n"
    "from operator import *\nfrom io import *\nfrom sys import *\nfrom json import *\n"
    "from builtins import *\nfrom typing import *\nimport string\nimport re\nimport datetime\n"
    "import collections\nimport heapq\nimport bisect\nimport copy\nimport math\nimport random\n"
    "import statistics\nimport itertools\nimport functools\nimport operator\nimport io\nimport sys\n"
    "import json\nsys.setrecursionlimit(6 * 10**5)\n")


# Call-based answers are compared exactly unless the problem carries `atol` (evalplus's problems
# do) or its source has a default here. CodeIO's expected values are whatever its reference
# computed in floating point, so an answer that sums in another order must still pass: 1e-6
# absolute (+1e-7 relative) on every float in the value, integers and strings exact.
# LiveCodeBench's grader compares exactly, so its problems get no tolerance.
DEFAULT_ATOL = {"codeio": 1e-6}


def call_tolerance(problem: dict) -> float | None:
    """The float tolerance a call-based problem's answers are compared with (None: exact)."""
    if problem.get("atol") is not None:
        return float(problem["atol"])
    return DEFAULT_ATOL.get(problem.get("source"))


def sandbox_job(problem: dict, program: str | None):
    """The sandbox job that runs `program` (None: no code) against the problem's tests."""
    kind = problem.get("kind") or problem_kind(problem, problem["task_id"])
    if program is not None and problem.get("source") == "livecodebench":
        program = LIVECODEBENCH_PREAMBLE + program
    if kind == "humaneval":
        return sandbox.Job(program, problem["test"], problem["entry_point"])
    if kind == "stdin":
        return sandbox.IOJob(program, [sandbox.IOCase(t["input"], t["output"]) for t in problem["tests"]])
    return sandbox.CallJob(program, problem["entry_point"],
                           [sandbox.CallCase(t["args"], t["expected"]) for t in problem["tests"]],
                           atol=call_tolerance(problem))


def answer_job(problem: dict, answer: str):
    """The sandbox job for a model's chat answer: its code taken out as a careful user would
    (tasks.core.extract): completing the prompt for HumanEval, the last fenced block (or a bare
    answer that parses) as the whole program for the other kinds."""
    kind = problem.get("kind") or problem_kind(problem, problem["task_id"])
    if kind == "humaneval":
        program = program_from_answer(problem["prompt"], problem["entry_point"], answer)
    else:
        program = last_fenced_block(answer)
        if program is None and answer.strip() and parses(answer):
            program = answer
    return sandbox_job(problem, program)
