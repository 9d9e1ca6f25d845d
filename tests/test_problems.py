import json

import pytest

from tasks.core.extract import last_fenced_block, one_line_stub, program_from_answer
from tasks.core.files import DataError
from tasks.core.problems import (chat_messages, is_held_out, load_problems, rank_key, seeded_rank, seeded_subset,
                                 split_problems)


def test_humaneval_split_is_disjoint_and_seeded():
    problems = load_problems("humaneval")
    assert len(problems) == 164
    train, held_out = split_problems(problems, 0.4, seed=0)
    assert len(held_out) == 63 and len(train) == 101  # about 0.4 of 164: each problem falls by its own hash
    assert all(is_held_out(p["task_id"], 0.4, 0) for p in held_out)
    assert not any(is_held_out(p["task_id"], 0.4, 0) for p in train)
    assert not {p["task_id"] for p in train} & {p["task_id"] for p in held_out}
    again, _ = split_problems(problems, 0.4, seed=0)
    other, _ = split_problems(problems, 0.4, seed=1)
    assert [p["task_id"] for p in again] == [p["task_id"] for p in train]
    assert [p["task_id"] for p in other] != [p["task_id"] for p in train]


def test_a_problem_more_or_less_changes_a_subset_by_that_one():
    # CodeIO's conversion keeps a problem more or less from run to run: two clones must still
    # train and test on the same problems but that one.
    problems = load_problems("humaneval")
    ids = lambda ps: {p["task_id"] for p in ps}
    subset = ids(seeded_subset(problems, 40, seed=0))
    train, held_out = split_problems(problems, 0.3, seed=0)
    for dropped in (problems[:1], [next(p for p in problems if p["task_id"] in subset)]):
        pool = [p for p in problems if p not in dropped]
        again = ids(seeded_subset(pool, 40, seed=0))
        assert len(again) == 40 and len(subset - again) <= 1 and len(again - subset) <= 1
        train2, held_out2 = split_problems(pool, 0.3, seed=0)
        assert len(ids(held_out) ^ ids(held_out2)) <= 2 and len(ids(train) - ids(train2)) <= 2
    assert ids(seeded_subset(problems, 40, seed=1)) != subset


def test_the_held_out_share_is_the_first_of_the_seeded_order():
    """Held out = the first problems of seeded_rank's order, whatever else the pool holds: the
    `codeio` stage converts only the first ones of each part (tasks/problemsets/codeio.py)."""
    problems = load_problems("humaneval")
    order = [problems[i] for i in seeded_rank(problems, 5)]
    held = [is_held_out(p["task_id"], 0.25, 5) for p in order]
    assert held == sorted(held, reverse=True) and 0 < sum(held) < len(held)
    _, held_out = split_problems(problems[:40], 0.25, seed=5)
    assert held_out == [p for p in problems[:40] if is_held_out(p["task_id"], 0.25, 5)]
    # a pool with no problem below the share holds out its first-ranked one
    low = [p for p in problems if not is_held_out(p["task_id"], 0.25, 5)][:5]
    train, held_out = split_problems(low, 0.25, seed=5)
    assert held_out == [min(low, key=lambda p: rank_key(p["task_id"], 5))] and len(train) == 4
    with pytest.raises(DataError, match="data.eval_fraction=0.25 leaves no train prompts"):
        split_problems(low[:1], 0.25, seed=5)


def test_prompt_carries_no_solution_or_tests():
    problem = load_problems("humaneval")[0]
    text = json.dumps(chat_messages(problem))
    assert problem["canonical_solution"].strip() not in text and "def check" not in text


@pytest.mark.parametrize("content, message", [
    ('{"task_id": "a", "prompt": "p", "test": "t", "entry_point": "f"}\n{not json\n', ":2: not valid JSON"),
    ('{"task_id": "a", "prompt": "p", "test": "t"}\n', ":1: missing or empty string field 'entry_point'"),
    ('{"task_id": "a", "prompt": "p", "test": "t", "entry_point": "f"}\n' * 2, ":2: duplicate task_id"),
])
def test_malformed_problems_name_the_line(tmp_path, content, message):
    path = tmp_path / "mine.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=str(path) + message):
        load_problems(str(path))


PROMPT = 'from typing import List\n\n\ndef helper(x):\n    return x\n\n\ndef add(a: int, b: int) -> int:\n    """Add."""\n'


def test_program_from_full_function_keeps_prompt_imports_and_helpers():
    answer = "Sure!\n```python\ndef add(a: int, b: int) -> int:\n    return helper(a) + b\n```\nDone."
    program = program_from_answer(PROMPT, "add", answer)
    assert program.startswith("from typing import List") and "def helper" in program
    assert program.count("def add") == 1
    ns = {}
    exec(program, ns)
    assert ns["add"](2, 3) == 5


def test_program_from_bare_body_completes_the_prompt():
    program = program_from_answer(PROMPT, "add", "```python\nreturn a + b\n```")
    ns = {}
    exec(program, ns)
    assert ns["add"](2, 3) == 5


def test_last_block_wins_and_unterminated_fence_counts():
    text = "```python\nx = 1\n```\nthen\n```python\ndef add(a, b):\n    return a - b\n"
    assert "return a - b" in last_fenced_block(text)
    assert last_fenced_block("no code here") is None
    assert program_from_answer(PROMPT, "add", "   ") is None


def test_one_line_stubs():
    assert one_line_stub("")
    assert one_line_stub("```python\npass\n```")
    assert not one_line_stub("```python\ndef f():\n    return 1\n```")


def test_livecodebench_answers_run_after_livecodebench_s_own_imports():
    """An answer that uses `deque` without importing it passes LiveCodeBench's grader (its preamble
    imports collections and more); it must pass here too, and only for LiveCodeBench's problems."""
    from tasks import sandbox
    from tasks.core.jobs import answer_job

    problem = {"task_id": "lcb/1", "kind": "call", "question": "Sum a list.", "source": "livecodebench",
               "entry_point": "Solution.total", "tests": [{"args": [[1, 2, 3]], "expected": 6}]}
    answer = "```python\nclass Solution:\n    def total(self, nums):\n        return sum(deque(nums))\n```"
    other = dict(problem, source="elsewhere")
    lcb, plain = sandbox.check_programs([answer_job(problem, answer), answer_job(other, answer)])
    assert lcb.passed and not plain.passed and "NameError" in plain.result
