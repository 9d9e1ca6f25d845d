"""`selfdistill problems import` for benchmarks users already trust: evalplus's released
HumanEval+ / MBPP+ files (expected values from the canonical solutions, run in the real sandbox;
answers compared as evalplus compares them), LiveCodeBench and rStar-Coder read as the hub repos'
data files through huggingface_hub (offline, from a cache laid out like the real repos), and bad
input that must say what is wrong and write nothing."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from tasks.commands import problems as command
from tasks.commands import score
from tasks.core import files
from tasks.core.problems import KINDS, load_problems, problem_kind
from tasks.core.files import DataError
from tasks.core.jobs import call_tolerance, sandbox_job
from tasks.problemsets import codeio, provenance_path
from tasks.sandbox.jail import compare

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "problemsets"
HUMANEVAL_PLUS = FIXTURES / "HumanEvalPlus-fixture.jsonl.gz"
MBPP_PLUS = FIXTURES / "MbppPlus-fixture.jsonl"
COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


def scored(problems_path: Path, programs: dict[str, str], out: Path) -> dict[str, str]:
    """`selfdistill score` on one program per task: {task_id: result}."""
    samples = out / "samples.jsonl"
    files.write_jsonl(samples, [{"task_id": t, "code": c} for t, c in programs.items()])
    score.score(str(problems_path), samples, out / "scored")
    return {r["task_id"]: r["result"] for r in files.read_jsonl(out / "scored" / "results.jsonl")}


# ------------------------------------------------------------------------------- evalplus


@pytest.fixture(scope="module")
def humaneval_plus(tmp_path_factory):
    out = tmp_path_factory.mktemp("heplus") / "humanevalplus.jsonl"
    code = command.main(["import", "--format", "evalplus", str(HUMANEVAL_PLUS), "-o", str(out), "--timeout", "2"])
    assert code == 0
    return out


def test_humaneval_plus_keeps_what_its_canonical_solutions_support(humaneval_plus):
    problems = {p["task_id"]: p for p in load_problems(str(humaneval_plus), kinds=KINDS)}
    assert sorted(problems) == ["HumanEval/0", "HumanEval/2"]
    add = problems["HumanEval/0"]
    assert add["kind"] == "call" and add["entry_point"] == "add" and add["atol"] == 0
    # base inputs first, then plus inputs; expected values are the canonical solution's
    assert [t["args"] for t in add["tests"]] == [[2, 3], [5, 7], [0, 0], [-1, 1], [10 ** 6, 1]]
    assert [t["expected"] for t in add["tests"]] == [5, 12, 0, 0, 10 ** 6 + 1] and add["base_tests"] == 2
    assert add["question"].startswith("Please provide a self-contained Python script")
    assert "def add(x: int, y: int):" in add["question"] and "return x + y" not in add["question"]
    assert add["canonical_solution"].endswith("    return x + y\n") and add["benchmark"] == "humaneval+"
    assert problems["HumanEval/2"]["atol"] == 1e-6
    assert problems["HumanEval/2"]["tests"][0]["expected"] == 0.1 + 0.2 + 0.3


def test_humaneval_plus_counts_each_drop_with_its_id_and_line(humaneval_plus):
    report = files.read_json(provenance_path(humaneval_plus))
    assert report["read"] == 8 and report["kept"] == 2
    assert report["dropped"] == {"canonical solution fails": 1, "nondeterministic": 1, "timed out": 1,
                                 "special oracle": 1, "bad atol": 1, "missing field": 1}
    drops = {d["task_id"]: d for d in report["drops"]}
    crash = drops["HumanEval/3"]
    assert crash["reason"] == "canonical solution fails" and crash["where"].endswith("HumanEvalPlus-fixture.jsonl.gz:3")
    assert "input 3 (plus)" in crash["detail"] and "ZeroDivisionError" in crash["detail"]
    assert drops["HumanEval/4"]["reason"] == "nondeterministic"
    assert drops["HumanEval/7"]["reason"] == "timed out" and drops["HumanEval/7"]["where"].endswith(":8")
    assert drops["HumanEval/5"]["reason"] == "bad atol" and "'1e-6'" in drops["HumanEval/5"]["detail"]
    assert drops["HumanEval/6"]["reason"] == "missing field" and "plus_input" in drops["HumanEval/6"]["detail"]
    assert drops["HumanEval/32"]["reason"] == "special oracle"
    assert list(report["files"].values()) == [files.file_sha256(HUMANEVAL_PLUS)]


def test_humaneval_plus_answers_are_compared_as_evalplus_compares_them(humaneval_plus, tmp_path):
    """A right answer that sums floats in another order differs from the canonical one in the
    last bits: it passes within the problem's atol; an answer off by 0.01 fails; an exactly
    right answer to the integer problem passes and a wrong one fails."""
    results = scored(humaneval_plus, {
        "HumanEval/0": "def add(x, y):\n    return y + x\n",
        "HumanEval/2": "def total(numbers):\n    return sum(reversed(numbers))\n"}, tmp_path / "right")
    assert results == {"HumanEval/0": "passed", "HumanEval/2": "passed"}
    assert sum(reversed([0.1, 0.2, 0.3])) != 0.1 + 0.2 + 0.3  # the answer is not exactly the expected
    results = scored(humaneval_plus, {
        "HumanEval/0": "def add(x, y):\n    return x - y\n",
        "HumanEval/2": "def total(numbers):\n    return sum(numbers) + 0.01\n"}, tmp_path / "wrong")
    assert results == {"HumanEval/0": "failed: wrong answer on test 1", "HumanEval/2": "failed: wrong answer on test 1"}


def test_mbpp_plus_import_and_its_tuples(tmp_path):
    out = tmp_path / "mbppplus.jsonl"
    assert command.main(["import", "--format", "evalplus", str(MBPP_PLUS), "-o", str(out)]) == 0
    problems = {p["task_id"]: p for p in load_problems(str(out), kinds=KINDS)}
    assert sorted(problems) == ["Mbpp/17", "Mbpp/3"]
    assert problems["Mbpp/17"]["tests"][0] == {"args": [[3, 1, 2]], "expected": [1, 3]}
    assert problems["Mbpp/3"]["benchmark"] == "mbpp+" and problems["Mbpp/3"]["canonical_solution"].startswith('"""')
    report = files.read_json(provenance_path(out))
    assert report["dropped"] == {"special oracle": 1} and report["drops"][0]["task_id"] == "Mbpp/7"
    results = scored(out, {"Mbpp/17": "def min_max(items):\n    return (min(items), max(items))\n",
                           "Mbpp/3": "def is_not_prime(n):\n    return n == 1 or any(n % d == 0 for d in range(2, n))\n"},
                     tmp_path)
    assert results == {"Mbpp/17": "passed", "Mbpp/3": "passed"}


def test_an_evalplus_problem_is_usable_as_an_eval_set_by_path(humaneval_plus, tmp_path, monkeypatch):
    from conftest import write_params
    from tasks.core.config import load_params
    from tasks.prepare import prepare_data

    (tmp_path / "problems").mkdir()
    (tmp_path / "problems/humanevalplus.jsonl").write_bytes(humaneval_plus.read_bytes())
    path = write_params(tmp_path, overrides={"data": {
        "train": {"source": "humaneval", "max_problems": 5}, "validation": {"source": "humaneval", "max_problems": 2},
        "eval": [{"name": "humanevalplus", "source": "problems/humanevalplus.jsonl", "max_problems": 0}]},
        "diagnose": {"eval_set": "humanevalplus"}})
    monkeypatch.chdir(tmp_path)
    prepare_data(load_params(path))
    rows = files.read_jsonl(tmp_path / "data/eval/humanevalplus.jsonl")
    assert [r["task_id"] for r in rows] == ["HumanEval/0", "HumanEval/2"] and rows[1]["atol"] == 1e-6


def test_atol_must_be_a_nonnegative_number_in_a_problem_file():
    row = {"task_id": "t", "question": "q", "entry_point": "f", "tests": [{"args": [1], "expected": 1.0}]}
    assert problem_kind(dict(row, atol=1e-6), "f:1") == "call"
    for bad in ("1e-6", -1.0, float("nan"), True):
        with pytest.raises(DataError, match="f:1: 'atol'"):
            problem_kind(dict(row, atol=bad), "f:1")


# ------------------------------------------------------------------------------- float tolerance


def test_values_match_reads_atol_as_evalplus_does():
    match = compare.values_match
    assert not match(0.6, 0.1 + 0.2 + 0.3)                 # no tolerance: exact (LiveCodeBench's grader)
    assert match(0.6, 0.1 + 0.2 + 0.3, 0)                  # atol 0 with floats expected: 1e-6
    assert match([0.6, 1.0], [0.1 + 0.2 + 0.3, 1.0], 0)
    assert not match(0.6001, 0.6, 0) and not match(1, 2, 0)
    assert match(2.00005, 2.0, 1e-4) and not match(2.0002, 2.0, 1e-4)
    assert not match(1, 1.0000001, 1e-6)                   # evalplus: the answer's type must be the expected's
    assert not match(10 ** 9 + 1, 10 ** 9, 1e-6)           # integers stay exact under a tolerance
    assert match((1.0, 2.0), [1.0000001, 2.0], 1e-6)       # a tuple is the list JSON wrote
    assert match({"a": 1.0, "b": "x"}, {"a": 1.0000001, "b": "x"}, 1e-6)
    assert not match({"a": 1.0, "b": "y"}, {"a": 1.0000001, "b": "x"}, 1e-6)
    assert not match([1.0], [1.0, 2.0], 1e-6) and not match(float("nan"), 1.0, 1.0)


def test_each_source_gets_its_graders_tolerance():
    call = {"task_id": "t", "kind": "call", "question": "q", "entry_point": "f", "tests": [{"args": [], "expected": 1.0}]}
    assert call_tolerance(dict(call, source="livecodebench")) is None   # exact, as its grader
    assert call_tolerance(dict(call, source="codeio")) == 1e-6          # the documented CodeIO default
    assert call_tolerance(dict(call, source="evalplus", atol=1e-4)) == 1e-4
    assert call_tolerance(call) is None                                 # a user's file without atol
    assert sandbox_job(dict(call, source="codeio"), "def f(): return 1.0").atol == 1e-6


def test_codeio_keeps_a_reference_whose_floats_differ_below_the_tolerance(tmp_path):
    """Pass 2 reruns each reference and compares with CodeIO's tolerance: float noise far below
    1e-6 (another summation order) is not nondeterminism; noise above it is."""
    generator = "def generate_inputs(rng):\n    return {'a': rng.randint(1, 9)}\n"
    spec = "Input:\n  `a` (int): a number.\n\nOutput:\n  `return` (float): the answer."
    rows = [{"task_description": f"Return a plus {kind} noise.", "input_output_spec": spec, "input_generator": generator,
             "code_sample": f"import random\n\ndef main_solution(a):\n    return a + random.random() * {scale}\n"}
            for kind, scale in (("tiny", "1e-12"), ("large", "1e-3"))]
    src = tmp_path / "codeio.jsonl"
    files.write_jsonl(src, rows)
    problems, report = codeio.convert(tests=2, paths=[src], timeout_s=5.0)
    assert [p["question"].split(".")[0] for p in problems] == ["Return a plus tiny noise"]
    assert dict(report.dropped) == {"nondeterministic": 1}


# ------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("content, said", [
    ('{"foo": 1}\n', ["1 rows", "missing field", "question_content", "the first row's fields: foo"]),
    ("this is not json\nnor this\n", ["not JSON at line 1", "malformed row: 2"]),
])
def test_livecodebench_on_the_wrong_file_says_why_and_writes_nothing(tmp_path, capsys, content, said):
    src = tmp_path / "input.json"
    src.write_text(content)
    out = tmp_path / "out.jsonl"
    assert command.main(["import", "--format", "livecodebench", str(src), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    for text in said:
        assert text in err, err
    assert f"{src}:1" in err
    assert not out.exists() and not provenance_path(out).exists()


def test_livecodebench_on_humaneval_names_the_format(tmp_path, capsys):
    from tasks.core.problems import humaneval_path

    out = tmp_path / "out.jsonl"
    assert command.main(["import", "--format", "livecodebench", str(humaneval_path()), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "none of the 164 rows read became a livecodebench problem (missing field: 164)" in err
    assert "HumanEval.jsonl.gz:1: missing field: missing or empty: question_id, question_content" in err
    assert "the first row's fields: canonical_solution, entry_point, prompt, task_id, test: is it a livecodebench file?" in err
    assert not out.exists() and not provenance_path(out).exists()


def test_evalplus_refuses_another_format_and_a_hub_id(tmp_path, capsys):
    parquet = tmp_path / "rows.parquet"
    parquet.write_bytes(b"PAR1")
    assert command.main(["import", "--format", "evalplus", str(parquet), "-o", str(tmp_path / "a.jsonl")]) == 2
    assert "evalplus releases JSONL files" in capsys.readouterr().err
    assert command.main(["import", "--format", "evalplus", "evalplus/humanevalplus", "-o", str(tmp_path / "b.jsonl")]) == 2
    assert "evalplus reads local files" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.jsonl"))


def test_a_line_that_is_not_text_is_a_counted_row_naming_its_line(tmp_path, capsys):
    src = tmp_path / "blob.jsonl"
    src.write_bytes(b'{"question_id": "1"}\n' * 3000 + bytes(range(128, 256)) + b"\n")  # past read-ahead
    assert command.main(["import", "--format", "livecodebench", str(src), "-o", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert f"{src}:3001: malformed row: not UTF-8 text at line 3001" in err
    assert not (tmp_path / "o.jsonl").exists()


# ------------------------------------------------------------------------------- hub files


def lcb_rows() -> list[str]:
    return [line for line in (FIXTURES / "lcb.jsonl").read_text().splitlines() if line.strip()]


def write_parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = sorted({key for row in rows for key in row})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({c: [row.get(c) for row in rows] for c in columns}), path)


def rstar_rows() -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in (FIXTURES / "rstar_seed_testcase.jsonl").read_text().splitlines()[:-1]]
    return [r for r in rows if "response" not in r], [r for r in rows if "response" in r]


def hub_cache(root: Path) -> Path:
    """A huggingface_hub cache holding livecodebench/code_generation_lite (release files
    test.jsonl and test2.jsonl at the top) and microsoft/rStar-Coder (each config a folder of
    parquet shards), laid out as the real repos are, at COMMIT."""
    lcb = root / "datasets--livecodebench--code_generation_lite"
    snapshot = lcb / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    rows = lcb_rows()
    (snapshot / "test.jsonl").write_text("\n".join(rows[:3]) + "\n")   # release_v1
    (snapshot / "test2.jsonl").write_text("\n".join(rows[3:]) + "\n")  # release_v2 adds these
    (snapshot / "code_generation_lite.py").write_text("# the dataset script, never run\n")
    rstar = root / "datasets--microsoft--rStar-Coder"
    testcase, sft = rstar_rows()
    write_parquet(rstar / "snapshots" / COMMIT / "seed_testcase/data-00000-of-00002.parquet", testcase[:2])
    write_parquet(rstar / "snapshots" / COMMIT / "seed_testcase/data-00001-of-00002.parquet", testcase[2:])
    write_parquet(rstar / "snapshots" / COMMIT / "seed_sft/data-00000-of-00001.parquet", sft)
    for repo in (lcb, rstar):
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(COMMIT)
    return root


def offline_import(args: list[str], cache: Path) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    return subprocess.run([sys.executable, "-m", "tasks.commands.cli", "problems", "import", *args],
                          capture_output=True, text=True, env=env, cwd=REPO)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return hub_cache(tmp_path_factory.mktemp("hub"))


def test_livecodebench_hub_id_reads_the_release_files_offline(cache, tmp_path):
    hub_out, local_out = tmp_path / "hub.jsonl", tmp_path / "local.jsonl"
    done = offline_import(["--format", "livecodebench", "livecodebench/code_generation_lite", "-o", str(hub_out),
                           "--since", "2025-02-01", "--until", "2025-05-31"], cache)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p["task_id"] for p in load_problems(str(hub_out), kinds=KINDS)) == [
        "livecodebench/3500", "livecodebench/abc400_a"]
    report = files.read_json(provenance_path(hub_out))
    assert report["hub"] == {"id": "livecodebench/code_generation_lite", "revision": None, "commit": COMMIT}
    assert list(report["files"]) == ["test.jsonl", "test2.jsonl"]
    # the same files as a local directory laid out like the repo: the same problems
    snapshot = cache / "datasets--livecodebench--code_generation_lite/snapshots" / COMMIT
    done = offline_import(["--format", "livecodebench", str(snapshot), "-o", str(local_out),
                           "--since", "2025-02-01", "--until", "2025-05-31"], cache)
    assert done.returncode == 0, done.stderr[-2000:]
    assert local_out.read_text() == hub_out.read_text()
    # release_v1 is test.jsonl alone
    v1 = tmp_path / "v1.jsonl"
    done = offline_import(["--format", "livecodebench", "livecodebench/code_generation_lite", "-o", str(v1),
                           "--version-tag", "release_v1"], cache)
    assert done.returncode == 0, done.stderr[-2000:]
    assert list(files.read_json(provenance_path(v1))["files"]) == ["test.jsonl"]
    assert files.read_json(provenance_path(v1))["read"] == 3


def test_rstar_coder_hub_id_reads_the_config_shards_offline(cache, tmp_path):
    out = tmp_path / "rstar.jsonl"
    done = offline_import(["--format", "rstar-coder", "microsoft/rStar-Coder", "-o", str(out)], cache)
    assert done.returncode == 0, done.stderr[-2000:]
    problems = {p["task_id"]: p for p in load_problems(str(out), kinds=KINDS)}
    assert sorted(problems) == ["rstar-coder/seed_1", "rstar-coder/seed_2"]
    assert problems["rstar-coder/seed_2"]["entry_point"] == "Solution.total"
    report = files.read_json(provenance_path(out))
    assert list(report["files"]) == ["seed_testcase/data-00000-of-00002.parquet",
                                     "seed_testcase/data-00001-of-00002.parquet"]
    assert report["dropped"] == {"missing field": 1} and report["duplicates"] == 1
    assert report["drops"][0]["where"].endswith("data-00001-of-00002.parquet:row 1")
    local = tmp_path / "local.jsonl"
    snapshot = cache / "datasets--microsoft--rStar-Coder/snapshots" / COMMIT
    done = offline_import(["--format", "rstar-coder", str(snapshot), "-o", str(local)], cache)
    assert done.returncode == 0, done.stderr[-2000:]
    assert local.read_text() == out.read_text()


def test_a_hub_id_that_is_not_there_is_named_and_nothing_is_written(cache, tmp_path):
    out = tmp_path / "x.jsonl"
    done = offline_import(["--format", "livecodebench", "nobody/no-such-dataset", "-o", str(out)], cache)
    assert done.returncode == 2
    assert "hub dataset 'nobody/no-such-dataset': not in the local huggingface_hub cache" in done.stderr
    done = offline_import(["--format", "livecodebench", "livecodebench/code_generation_lite", "-o", str(out),
                           "--version-tag", "release_v3"], cache)
    assert done.returncode == 2 and "release release_v3 needs test3.jsonl" in done.stderr
    assert not out.exists() and not provenance_path(out).exists()
