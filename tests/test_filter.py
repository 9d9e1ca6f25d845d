"""Filter arms on hand-written samples, the `passes` arm through the real sandbox."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO
from tasks.core.config import EXIT_NO_RETRY, load_params
from tasks.filter import TRUNCATED, drop_reasons
from tasks.core.problems import load_problems

PROBLEMS = {p["task_id"]: p for p in load_problems("humaneval")[:2]}
P0 = PROBLEMS["HumanEval/0"]
RIGHT = f"```python\n{P0['prompt']}{P0['canonical_solution']}```"
WRONG = "```python\ndef has_close_elements(numbers, threshold):\n    return False\n```"
BROKEN = "```python\ndef has_close_elements(numbers, threshold):\n    return (\n```"
PROSE = "You could compare every pair of numbers\nand return True when two are close."


def rows(*texts, cut_off=()):
    """Samples of HumanEval/0; those at the indices in `cut_off` stopped at sample.max_new_tokens."""
    return [{"prompt_id": "HumanEval/0", "sample_index": i, "text": t, "num_tokens": len(t),
             "finish_reason": "length" if i in cut_off else "eos"} for i, t in enumerate(texts)]


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


def with_truncated(params, value):
    return params.model_copy(update={"filter": params.filter.model_copy(update={"truncated": value})})


def test_cut_off_samples_are_kept_open_or_dropped(params):
    samples = rows(RIGHT, WRONG, PROSE, "", cut_off=(1, 2, 3))
    assert params.filter.truncated == "keep-open"  # the paper's: trained, with no end-of-turn label
    assert drop_reasons("none", samples, params, PROBLEMS) == [None, None, None, "empty or one-line stub"]
    drop = with_truncated(params, "drop")
    assert drop_reasons("none", samples, drop, PROBLEMS) == [None, TRUNCATED, TRUNCATED, "empty or one-line stub"]
    assert drop_reasons("extractable", samples, drop, PROBLEMS) == [None, TRUNCATED, TRUNCATED,
                                                                     "empty or one-line stub"]
    # `shortest` ranks what is left after the cut-off samples are gone.
    lengths = rows(*[("x\n" * (i + 2)) for i in range(11)], cut_off=(10,))
    assert drop_reasons("shortest", lengths, drop, PROBLEMS) == ["shortest"] + [None] * 9 + [TRUNCATED]


def test_the_stage_carries_finish_reason_and_counts_cut_off_samples(tmp_path):
    (tmp_path / "samples/ssd").mkdir(parents=True)
    (tmp_path / "data").mkdir()
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    samples = [dict(r, messages=[{"role": "user", "content": "q"}]) for r in rows(RIGHT, WRONG, "", cut_off=(1, 2))]
    (tmp_path / "samples/ssd/samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in samples))
    (tmp_path / "data/train.jsonl").write_text(json.dumps(P0) + "\n")
    subprocess.run([sys.executable, "-m", "tasks.filter", "--arm", "ssd-none"], cwd=tmp_path, check=True,
                   capture_output=True, text=True)
    kept = [json.loads(l) for l in (tmp_path / "filtered/ssd-none/train.jsonl").read_text().splitlines()]
    assert [(r["sample_index"], r["finish_reason"]) for r in kept] == [(0, "eos"), (1, "length")]
    stats = json.loads((tmp_path / "filtered/ssd-none/stats.json").read_text())
    assert stats["truncated"] == {"samples": 2, "kept": 1, "dropped": 0}  # the cut-off stub counts as a stub

    params = (tmp_path / "params.yaml").read_text().replace("truncated: keep-open", "truncated: drop")
    (tmp_path / "params.yaml").write_text(params)
    subprocess.run([sys.executable, "-m", "tasks.filter", "--arm", "ssd-none"], cwd=tmp_path, check=True,
                   capture_output=True, text=True)
    stats = json.loads((tmp_path / "filtered/ssd-none/stats.json").read_text())
    assert stats["truncated"] == {"samples": 2, "kept": 0, "dropped": 1} and stats["dropped"][TRUNCATED] == 1


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
    assert proc.returncode == EXIT_NO_RETRY  # empty data: the flow does not retry it
    assert "arm 'ssd-none' (filter 'none') kept 0 of 1 samples" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "filtered/ssd-none/train.jsonl").exists()
