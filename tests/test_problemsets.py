"""Problem sets at scale (tasks/problemsets, `selfdistill problems`): CodeIO from reasoning-gym
with tests made in the real sandbox, and the rStar-Coder / LiveCodeBench importers on small
fixtures written in their public schemas (tests/fixtures/problemsets/make_fixtures.py)."""
from __future__ import annotations

import base64
import importlib.util
import json
import pickle
import zlib
from pathlib import Path

import pytest

from tasks.commands import problems as command
from tasks.commands import score
from tasks.core import files
from tasks.core.problems import KINDS, load_problems
from tasks.problemsets import Report, codeio, livecodebench, provenance_path, read_local

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "problemsets"


def load(path: Path) -> list[dict]:
    return load_problems(str(path), kinds=KINDS)


def score_programs(problems_path: Path, programs: dict[str, str], out: Path) -> list[dict]:
    """Run `selfdistill score` on one program per task: the rows of its results.jsonl."""
    samples = out / "samples.jsonl"
    files.write_jsonl(samples, [{"task_id": t, "code": c} for t, c in programs.items()])
    score.score(str(problems_path), samples, out / "scored")
    return files.read_jsonl(out / "scored" / "results.jsonl")


# ------------------------------------------------------------------------------- CodeIO


@pytest.fixture(scope="module")
def fixture_conversion():
    return codeio.convert(tests=3, paths=[FIXTURES / "codeio.jsonl", FIXTURES / "codeio-hq.json"],
                          timeout_s=2.0)


def test_codeio_fixture_keeps_the_good_and_counts_each_drop(fixture_conversion):
    problems, report = fixture_conversion
    good = codeio.problem_id("def main_solution(a, b):\n    return a + b\n")
    assert [p["task_id"] for p in problems] == [
        good, codeio.problem_id("import math\n\ndef main_solution(values, factor=2):\n"
                                "    return [math.floor(v * factor) for v in values]\n"),
        codeio.problem_id("def main_solution(a, b):\n    return a * b\n")]
    assert report.read == 14 and report.notes["duplicates"] == 1  # the sum is in both files
    assert dict(report.dropped) == {
        "missing field": 2, "reference fails": 1, "nondeterministic": 1, "missing module": 1,
        "generator fails": 1, "not JSON-comparable": 2, "timed out": 1,
        "inputs do not match signature": 1}
    by_reason = {d["reason"]: d for d in report.drops}
    crash = by_reason["reference fails"]
    assert crash["task_id"] == codeio.problem_id("def main_solution(a, b):\n    return a / 0\n")
    assert crash["where"] == "codeio.jsonl:3" and "ZeroDivisionError" in crash["detail"]
    assert by_reason["missing module"]["where"] == "codeio.jsonl:5"
    missing = [d for d in report.drops if d["reason"] == "missing field"]
    assert [d["where"] for d in missing] == ["codeio.jsonl:11", "codeio.jsonl:12"]
    assert "code_sample" in missing[0]["detail"] and "input_output_spec" in missing[1]["detail"]
    assert missing[1]["task_id"] == codeio.problem_id("def main_solution(a):\n    return a\n")


def test_codeio_problem_rows(fixture_conversion):
    problems, _ = fixture_conversion
    add, scale, multiply = problems
    assert add["kind"] == "call" and add["entry_point"] == "main_solution" and add["source"] == "codeio"
    assert add["difficulty"] == 3 and "difficulty" not in scale and multiply["difficulty"] == 8
    assert len(add["tests"]) == 3 and all(t["expected"] == sum(t["args"]) for t in add["tests"])
    # the question asks for the reference's exact signature without showing the reference
    assert "def main_solution(values, factor=2):" in scale["question"]
    assert "math.floor" not in scale["question"] and "Scale a list" in scale["question"]
    assert scale["canonical_solution"].startswith("import math")
    # the generator leaves out the defaulted parameter: args stop before it
    assert all(len(t["args"]) == 1 for t in scale["tests"])


def test_codeio_tests_are_seeded(fixture_conversion):
    problems, _ = fixture_conversion
    again, _ = codeio.convert(tests=3, paths=[FIXTURES / "codeio.jsonl"], limit=1)
    assert again[0]["tests"] == problems[0]["tests"]
    other, _ = codeio.convert(tests=3, paths=[FIXTURES / "codeio.jsonl"], limit=1, seed=1)
    assert other[0]["tests"] != problems[0]["tests"]


def test_codeio_from_reasoning_gym_passes_score(tmp_path):
    """The embedded pool on a small --limit: the file loads, and every canonical solution passes
    `selfdistill score` on its own tests."""
    if importlib.util.find_spec("reasoning_gym") is None:  # its __init__ is never imported
        pytest.skip("pip install --no-deps reasoning-gym")
    out = tmp_path / "problems" / "codeio.jsonl"
    assert command.main(["codeio", "-o", str(out), "--limit", "16", "--tests", "3"]) == 0
    problems = load(out)
    assert problems and all(p["kind"] == "call" and p["source"] == "codeio" for p in problems)
    provenance = files.read_json(provenance_path(out))
    assert provenance["package"] == "reasoning-gym" and provenance["version"]
    assert set(provenance["files"]) == {"codeio.jsonl.gz", "codeio-hq.jsonl.gz"}
    assert all(len(sha) == 64 for sha in provenance["files"].values())
    assert provenance["kept"] == len(problems)
    assert provenance["kept"] + sum(provenance["dropped"].values()) == 16
    assert provenance["distinct"] > 3000
    results = score_programs(out, {p["task_id"]: p["canonical_solution"] for p in problems}, tmp_path)
    assert [r["result"] for r in results] == ["passed"] * len(problems)


def test_codeio_without_the_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(codeio.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(files.DataError, match="pip install --no-deps reasoning-gym"):
        codeio.data_files()


# ------------------------------------------------------------------------------- LiveCodeBench


def test_livecodebench_private_blob_round_trip_and_refusals():
    tests = [{"input": "1\n", "output": "2\n", "testtype": "stdin"}]
    blob = base64.b64encode(zlib.compress(pickle.dumps(json.dumps(tests)))).decode()
    assert livecodebench.decode_private(blob) == tests
    assert livecodebench.decode_private(json.dumps(tests)) == tests  # the older, plain form

    class Boom:
        def __reduce__(self):
            return (print, ("a pickle must not run code here",))

    hostile = base64.b64encode(zlib.compress(pickle.dumps(Boom()))).decode()
    with pytest.raises(livecodebench.BadRow, match="refusing"):
        livecodebench.decode_private(hostile)
    with pytest.raises(livecodebench.BadRow):
        livecodebench.decode_private("not base64 at all!")


def test_livecodebench_import(tmp_path, capsys):
    out = tmp_path / "lcb.jsonl"
    code = command.main(["import", "--format", "livecodebench", str(FIXTURES / "lcb.jsonl"), "-o", str(out),
                         "--since", "2025-02-01", "--until", "2025-05-31"])
    assert code == 0
    problems = {p["task_id"]: p for p in load(out)}
    assert sorted(problems) == ["livecodebench/3500", "livecodebench/abc400_a"]
    stdin, call = problems["livecodebench/abc400_a"], problems["livecodebench/3500"]
    assert stdin["kind"] == "stdin" and stdin["tests"] == [
        {"input": "1 2\n", "output": "3\n"}, {"input": "10 -4\n", "output": "6\n"},
        {"input": "0 0\n", "output": "0\n"}]
    assert stdin["contest_date"] == "2025-03-01" and stdin["difficulty"] == "easy"
    assert call["kind"] == "call" and call["entry_point"] == "Solution.twoSum"
    assert call["tests"][0] == {"args": [[2, 7, 11, 15], 9], "expected": [0, 1]} and len(call["tests"]) == 3
    assert call["starter_code"].startswith("class Solution:")
    report = files.read_json(provenance_path(out))
    assert report["outside_date_window"] == 1 and report["duplicates"] == 1
    assert report["dropped"] == {"missing field": 1, "undecodable private tests": 1}
    broken = next(d for d in report["drops"] if d["reason"] == "undecodable private tests")
    assert broken["task_id"] == "livecodebench/abc401_b" and broken["where"].endswith("lcb.jsonl:4")
    missing = next(d for d in report["drops"] if d["reason"] == "missing field")
    assert missing["task_id"] == "livecodebench/abc402_c" and "question_content" in missing["detail"]
    assert list(report["files"].values()) == [files.file_sha256(FIXTURES / "lcb.jsonl")]
    # the imported tests work in the sandbox: right programs pass, a wrong one fails
    results = score_programs(out, {
        "livecodebench/abc400_a": "a, b = map(int, input().split())\nprint(a + b)\n",
        "livecodebench/3500": ("from typing import List\n\nclass Solution:\n"
                               "    def twoSum(self, nums: List[int], target: int) -> List[int]:\n"
                               "        seen = {}\n        for i, n in enumerate(nums):\n"
                               "            if target - n in seen:\n                return [seen[target - n], i]\n"
                               "            seen[n] = i\n")}, tmp_path)
    assert [r["result"] for r in results] == ["passed", "passed"]


def test_livecodebench_date_window_alone(tmp_path):
    out = tmp_path / "old.jsonl"
    assert command.main(["import", "--format", "livecodebench", str(FIXTURES / "lcb.jsonl"), "-o", str(out),
                         "--until", "2024-12-31"]) == 0
    assert [p["task_id"] for p in load(out)] == ["livecodebench/abc300_a"]


def test_import_with_nothing_left_writes_nothing(tmp_path, capsys):
    out = tmp_path / "none.jsonl"
    assert command.main(["import", "--format", "livecodebench", str(FIXTURES / "lcb.jsonl"), "-o", str(out),
                         "--since", "2030-01-01"]) == 2
    assert not out.exists() and "no problems" in capsys.readouterr().err


# ------------------------------------------------------------------------------- rStar-Coder


def test_rstar_coder_import(tmp_path):
    out = tmp_path / "rstar.jsonl"
    assert command.main(["import", "--format", "rstar-coder", str(FIXTURES / "rstar_seed_testcase.jsonl"),
                         "-o", str(out), "--max-tests", "2"]) == 0
    problems = {p["task_id"]: p for p in load(out)}
    assert sorted(problems) == ["rstar-coder/seed_1", "rstar-coder/seed_2"]
    stdin, call = problems["rstar-coder/seed_1"], problems["rstar-coder/seed_2"]
    # official tests first, then synthesized ones, at most --max-tests
    assert stdin["kind"] == "stdin" and stdin["tests"] == [{"input": "12\n", "output": "144\n"},
                                                           {"input": "3\n", "output": "9\n"}]
    assert stdin["question"] == "Given n, print n squared." and stdin["source"] == "rstar-coder"
    assert call["kind"] == "call" and call["entry_point"] == "Solution.total"
    assert call["tests"] == [{"args": [[1, 2, 3]], "expected": 6}, {"args": [[]], "expected": 0}]
    report = files.read_json(provenance_path(out))
    assert report["dropped"] == {"missing field": 1, "no tests": 1, "malformed row": 1}
    assert report["duplicates"] == 1 and report["read"] == 6
    where = {d["task_id"]: d["where"] for d in report["drops"]}
    assert where["rstar-coder/seed_3"].endswith("rstar_seed_testcase.jsonl:3")
    assert where[None].endswith("rstar_seed_testcase.jsonl:6")
    results = score_programs(out, {
        "rstar-coder/seed_1": "n = int(input())\nprint(n * n)\n",
        "rstar-coder/seed_2": "class Solution:\n    def total(self, nums):\n        return sum(nums)\n"}, tmp_path)
    assert [r["result"] for r in results] == ["passed", "passed"]


def test_rstar_coder_rejects_a_date_window(tmp_path, capsys):
    assert command.main(["import", "--format", "rstar-coder", str(FIXTURES / "rstar_seed_testcase.jsonl"),
                         "-o", str(tmp_path / "x.jsonl"), "--since", "2025-01-01"]) == 2
    assert "contest dates" in capsys.readouterr().err


def test_hub_ids_need_huggingface_hub_only_then_and_never_datasets(tmp_path, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_hub(name, *args, **kwargs):
        if name.startswith(("huggingface_hub", "datasets")):
            raise ImportError(f"no {name} here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_hub)
    assert command.main(["import", "--format", "rstar-coder", str(FIXTURES / "rstar_seed_testcase.jsonl"),
                         "-o", str(tmp_path / "local.jsonl")]) == 0  # a local file never imports it
    assert command.main(["import", "--format", "rstar-coder", "microsoft/rStar-Coder",
                         "-o", str(tmp_path / "hub.jsonl"), "--limit", "3"]) == 2
    assert "pip install huggingface_hub" in capsys.readouterr().err


def test_json_array_and_malformed_lines_are_read_with_their_place(tmp_path):
    array = list(read_local(FIXTURES / "codeio-hq.json"))
    assert [w.rsplit(":", 1)[1] for w, _ in array] == ["item 1", "item 2"]
    lines = list(read_local(FIXTURES / "rstar_seed_testcase.jsonl"))
    assert lines[-1][0].endswith(":6") and "not JSON at line 6" in lines[-1][1]


def test_report_counts_are_json(tmp_path):
    report = Report(source={"source": "x"})
    report.drop("t/1", "f:1", "missing field", "no question")
    assert json.loads(json.dumps(report.as_json()))["dropped"] == {"missing field": 1}
