"""Filter arms on hand-written samples, the `passes` arm through the real sandbox."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO
from tasks.core.config import load_params
from tasks.filter import drop_reasons
from tasks.core.problems import load_problems

PROBLEMS = {p["task_id"]: p for p in load_problems("humaneval")[:2]}
P0 = PROBLEMS["HumanEval/0"]
RIGHT = f"```python\n{P0['prompt']}{P0['canonical_solution']}```"
WRONG = "```python\ndef has_close_elements(numbers, threshold):\n    return False\n```"
BROKEN = "```python\ndef has_close_elements(numbers, threshold):\n    return (\n```"
PROSE = "You could compare every pair of numbers\nand return True when two are close."


def rows(*texts):
    return [{"prompt_id": "HumanEval/0", "sample_index": i, "text": t, "num_tokens": len(t)} for i, t in
            enumerate(texts)]


@pytest.fixture(scope="module")
def params():
    return load_params(REPO / "params.yaml")


def test_none_drops_only_empty_and_one_line(params):
    reasons = drop_reasons("none", rows("", "```python\npass\n```", RIGHT, WRONG, BROKEN, PROSE), params, PROBLEMS)
    assert reasons == ["empty or one-line stub", "empty or one-line stub", None, None, None, None]


def test_extractable_and_syntax(params):
    samples = rows(RIGHT, BROKEN, PROSE)
    assert drop_reasons("extractable", samples, params, PROBLEMS) == [None, None, "no code block"]
    assert drop_reasons("syntax", samples, params, PROBLEMS) == [None, "syntax error", "no code block"]


def test_shortest_drops_that_fraction(params):
    samples = rows(*[("x\n" * (i + 2)) for i in range(10)])
    reasons = drop_reasons("shortest", samples, params, PROBLEMS)
    assert reasons == ["shortest"] + [None] * 9


def test_passes_runs_the_tests(params):
    reasons = drop_reasons("passes", rows(RIGHT, WRONG, BROKEN, PROSE), params, PROBLEMS)
    assert reasons == [None, "fails tests", "fails tests", "fails tests"]


def test_empty_arm_fails_naming_the_arm(tmp_path):
    (tmp_path / "samples/ssd").mkdir(parents=True)
    (tmp_path / "data").mkdir()
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    (tmp_path / "samples/ssd/samples.jsonl").write_text(json.dumps(rows("")[0]) + "\n")
    (tmp_path / "data/train.jsonl").write_text(json.dumps(P0) + "\n")
    proc = subprocess.run([sys.executable, "-m", "tasks.filter", "--arm", "ssd-none"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert "arm 'ssd-none' (filter 'none') kept 0 of 1 samples" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "filtered/ssd-none/train.jsonl").exists()
