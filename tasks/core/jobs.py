"""The sandbox job that checks a program, or a model's answer, against a problem's tests."""
from __future__ import annotations

from tasks import sandbox
from tasks.core.extract import program_from_answer
from tasks.core.problems import problem_kind


def sandbox_job(problem: dict, program: str | None):
    """The sandbox job that runs `program` (None: no code) against the problem's tests."""
    kind = problem.get("kind") or problem_kind(problem, problem["task_id"])
    if kind == "humaneval":
        return sandbox.Job(program, problem["test"], problem["entry_point"])
    if kind == "stdin":
        return sandbox.IOJob(program, [sandbox.IOCase(t["input"], t["output"]) for t in problem["tests"]])
    return sandbox.CallJob(program, problem["entry_point"],
                           [sandbox.CallCase(t["args"], t["expected"]) for t in problem["tests"]])


def answer_job(problem: dict, answer: str):
    """The sandbox job for a model's chat answer to a HumanEval-kind problem: its code taken out
    as a careful user would (tasks.core.extract), completing the prompt."""
    return sandbox_job(problem, program_from_answer(problem["prompt"], problem["entry_point"], answer))
