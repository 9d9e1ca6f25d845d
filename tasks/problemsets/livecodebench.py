"""LiveCodeBench (`livecodebench/code_generation_lite`) rows -> problems.

A row (the fields LiveCodeBench's own loader, lcb_runner/benchmarks/code_generation.py, reads):
  question_title, question_content, platform, question_id, contest_id,
  contest_date       ISO date-time ("2025-03-01T00:00:00")
  starter_code       "" for stdin problems; `class Solution: def f(self, ...)` for functional ones
  difficulty         easy / medium / hard
  public_test_cases  a JSON string: [{"input", "output", "testtype": "stdin"|"functional"}, ...]
  private_test_cases the same JSON string, or (most rows) that JSON string pickled, compressed
                     with zlib and base64-encoded; LiveCodeBench tries json.loads first, then
                     json.loads(pickle.loads(zlib.decompress(base64.b64decode(s))))
  metadata           a JSON string; {"func_name": ...} for functional problems
Functional tests hold one JSON value per line of `input` (the positional arguments) and one JSON
value in `output` (LiveCodeBench's grade_call_based). stdin problems become kind "stdin" with
tests [{input, output}]; functional ones kind "call", entry_point "Solution.<func_name>",
tests [{args, expected}]. The contest-date window (`since`, `until`, both inclusive, on the
date) is the one apple/ml-ssd evaluates on: 2025-02-01 .. 2025-05-31.

The hub repo is a script dataset (which `datasets` 4 refuses) whose data are one JSONL file per
release at the repo's top: test.jsonl, test2.jsonl, ..., test6.jsonl (the script's
ALLOWED_FILES: release_vN is test.jsonl .. testN.jsonl, vN is release N's file alone, vN_vM the
files of N..M, release_latest all of them). `repo_files` picks them, from a hub snapshot or
from a local directory laid out like the repo.

The private tests are unpickled with an unpickler that loads no classes and calls nothing: a
pickle that is not plain data (a str) is refused, so a crafted file cannot run code here.
"""
from __future__ import annotations

import base64
import binascii
import datetime
import io
import json
import pickle
import re
import zlib
from pathlib import Path
from typing import Any, Iterable

from tasks.core.files import DataError
from tasks.problemsets import BadRow, Report, collect

HUB_ID = "livecodebench/code_generation_lite"
REQUIRED = ("question_id", "question_content", "contest_date", "public_test_cases",
            "private_test_cases")
MAX_PRIVATE_BYTES = 1 << 30


class _PlainDataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not plain data")


def decode_private(text: str) -> list:
    """private_test_cases -> list of test dicts, as LiveCodeBench decodes it (without running any
    code a pickle could name)."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        pass
    try:
        packed = base64.b64decode(text.encode("utf-8"), validate=True)
        inflater = zlib.decompressobj()
        raw = inflater.decompress(packed, MAX_PRIVATE_BYTES)
        if inflater.unconsumed_tail:
            raise BadRow("undecodable private tests", f"over {MAX_PRIVATE_BYTES} bytes uncompressed")
        inner = _PlainDataUnpickler(io.BytesIO(raw)).load()
        if not isinstance(inner, str):
            raise BadRow("undecodable private tests", f"the pickle holds a {type(inner).__name__}, not a str")
        return json.loads(inner)
    except BadRow:
        raise
    except (binascii.Error, ValueError, zlib.error, pickle.UnpicklingError, EOFError,
            AttributeError, TypeError, IndexError, KeyError, json.JSONDecodeError) as err:
        raise BadRow("undecodable private tests", f"{type(err).__name__}: {err}") from None


def encode_private(tests: list[dict]) -> str:
    """The encoding LiveCodeBench's files use (json -> pickle -> zlib -> base64), for fixtures."""
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(tests)))).decode()


def parse_date(value: Any) -> datetime.date:
    if isinstance(value, datetime.datetime):
        return value.date()
    if isinstance(value, datetime.date):
        return value
    try:
        return datetime.datetime.fromisoformat(str(value)).date()
    except ValueError:
        raise BadRow("bad contest_date", repr(value)[:80]) from None


def _as_json(value: Any, field: str):
    if isinstance(value, (list, dict)):
        return value
    if value is None or value == "":
        return [] if field != "metadata" else {}
    try:
        return json.loads(value)
    except (json.JSONDecodeError, TypeError) as err:
        raise BadRow(f"undecodable {field}", str(err)) from None


def call_test(test: dict) -> dict:
    try:
        text = test["input"].strip("\n")
        args = [json.loads(line) for line in text.split("\n")] if text else []
        expected = json.loads(test["output"])
    except (KeyError, AttributeError, TypeError, json.JSONDecodeError) as err:
        raise BadRow("undecodable functional test", f"{type(err).__name__}: {err}") from None
    return {"args": args, "expected": expected}


def stdin_test(test: dict) -> dict:
    if not isinstance(test.get("input"), str) or not isinstance(test.get("output"), str):
        raise BadRow("malformed test", "stdin tests need string input and output")
    return {"input": test["input"], "output": test["output"]}


def problem(row: dict, max_tests: int | None) -> dict:
    missing = [f for f in REQUIRED
               if row.get(f) is None or (f != "private_test_cases" and row.get(f) == "")]
    if missing:
        raise BadRow("missing field", f"missing or empty: {', '.join(missing)}")
    date = parse_date(row["contest_date"])
    public = _as_json(row["public_test_cases"], "public_test_cases")
    private = decode_private(row["private_test_cases"]) if isinstance(row["private_test_cases"], str) \
        and row["private_test_cases"] else _as_json(row["private_test_cases"], "private_test_cases")
    metadata = _as_json(row.get("metadata"), "metadata")
    tests = list(public) + list(private)
    if not all(isinstance(t, dict) for t in tests):
        raise BadRow("malformed test", "a test is not an object")
    if max_tests:
        tests = tests[:max_tests]
    if not tests:
        raise BadRow("no tests", "")
    types = {t.get("testtype", "stdin") for t in tests}
    func_name = metadata.get("func_name") if isinstance(metadata, dict) else None
    if len(types) > 1:
        raise BadRow("mixed test types", ", ".join(sorted(map(str, types))))
    out = {"task_id": f"livecodebench/{row['question_id']}"}
    if types == {"functional"}:
        if not func_name:
            raise BadRow("missing field", "functional tests but metadata has no func_name")
        out.update(kind="call", question=row["question_content"],
                   entry_point=f"Solution.{func_name}", tests=[call_test(t) for t in tests])
    elif types == {"stdin"}:
        out.update(kind="stdin", question=row["question_content"], tests=[stdin_test(t) for t in tests])
    else:
        raise BadRow("malformed test", f"unknown testtype {types}")
    if row.get("question_title"):
        out["title"] = row["question_title"]
    if row.get("starter_code"):
        out["starter_code"] = row["starter_code"]
    if row.get("difficulty"):
        out["difficulty"] = row["difficulty"]
    out["source"] = "livecodebench"
    if row.get("platform"):
        out["platform"] = row["platform"]
    out["contest_date"] = date.isoformat()
    return out


def convert(records: Iterable[tuple[str, Any]], report: Report,
            since: datetime.date | None = None, until: datetime.date | None = None,
            max_tests: int | None = None, limit: int | None = None) -> list[dict]:
    """Rows -> problems inside the contest-date window; the others are counted in `report`."""
    def outside_window(row: dict) -> bool:
        date = parse_date(row.get("contest_date")) if row.get("contest_date") is not None else None
        return date is not None and bool((since and date < since) or (until and date > until))

    problems = collect(records, report, "livecodebench", lambda row: problem(row, max_tests), outside_window, limit)
    report.notes.update(outside_date_window=report.notes.pop("skipped"),
                        since=since.isoformat() if since else None, until=until.isoformat() if until else None)
    return problems


def _file_name(number: int) -> str:
    return "test.jsonl" if number == 1 else f"test{number}.jsonl"


def release_files(version_tag: str | None) -> list[str] | None:
    """The repo's files a release tag names; None for release_latest (every test*.jsonl)."""
    if version_tag in (None, "release_latest"):
        return None
    for pattern, numbers in ((r"release_v(\d+)", lambda a: range(1, a + 1)), (r"v(\d+)", lambda a: [a])):
        match = re.fullmatch(pattern, version_tag)
        if match and int(match[1]) >= 1:
            return [_file_name(n) for n in numbers(int(match[1]))]
    match = re.fullmatch(r"v(\d+)_v(\d+)", version_tag)
    if match and 1 <= int(match[1]) <= int(match[2]):
        return [_file_name(n) for n in range(int(match[1]), int(match[2]) + 1)]
    raise DataError(f"--version-tag {version_tag!r}: not a LiveCodeBench release "
                    "(release_vN, release_latest, vN or vN_vM)")


def hub_patterns(version_tag: str | None) -> list[str]:
    return release_files(version_tag) or ["test*.jsonl"]


def _number(path: Path) -> int:
    match = re.fullmatch(r"test(\d*)\.jsonl", path.name)
    return int(match[1] or 1) if match else 0


def repo_files(root: Path, version_tag: str | None) -> list[Path] | None:
    """The release files of a directory laid out like the hub repo, in release order; None
    when it holds none and no release was asked for (a plain folder of rows)."""
    names = release_files(version_tag)
    if names is None:
        found = sorted((p for p in root.glob("test*.jsonl") if _number(p)), key=_number)
        if found or version_tag is None:
            return found or None
        raise DataError(f"{root}: holds no test*.jsonl (LiveCodeBench's release files)")
    missing = [name for name in names if not (root / name).is_file()]
    if missing:
        raise DataError(f"{root}: release {version_tag} needs {', '.join(missing)}, which it lacks")
    return [root / name for name in names]
