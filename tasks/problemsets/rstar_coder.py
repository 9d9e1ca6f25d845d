"""rStar-Coder's seed problems (`microsoft/rStar-Coder`, config `seed_testcase`) -> problems.

The dataset card lists these columns (all strings in the released parquet files):
  seed_testcase  question_id, question, starter_code, inputs, outputs, is_synthesized,
                 test_case_type, func_name, class_name
  seed_sft       question_id, question, starter_code, response, verified, is_passed
The paper's SSD runs sample from the seed questions; tests come only with seed_testcase, so that
is the config this importer reads (a seed_sft row, having no tests, is a counted drop).
`inputs` and `outputs` are JSON-encoded lists, one entry per test; `is_synthesized` says per test
whether it was generated rather than official. A row with no `func_name` is a stdin/stdout problem
(kind "stdin": each input is the program's stdin, each output its expected stdout). A row with a
`func_name` becomes kind "call" with entry_point `class_name.func_name` (or `func_name`): an input
that is a list is taken as the positional arguments, a string as one JSON value per line (the
LiveCodeBench convention), and an output string as one JSON value. That reading of the
call-based rows follows the column names; it was not checked against released rows.

On the hub each config is a folder of parquet shards (seed_testcase/data-00000-of-00030.parquet,
...; seed_sft/data-00000-of-00020.parquet, ...): `repo_files` reads the config's folder, of a hub
snapshot or of a local directory laid out like the repo.

Official tests come first; at most `max_tests` (default 20) are kept, since the synthesized ones
can be many and large.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from tasks.core.files import DataError
from tasks.problemsets import BadRow, Report, collect

HUB_ID = "microsoft/rStar-Coder"
HUB_CONFIG = "seed_testcase"
DEFAULT_MAX_TESTS = 20
REQUIRED = ("question_id", "question", "inputs", "outputs")


def _json_list(value: Any, field: str) -> list:
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as err:
            raise BadRow(f"undecodable {field}", str(err)) from None
        if isinstance(parsed, list):
            return parsed
    raise BadRow(f"undecodable {field}", f"not a list: {type(value).__name__}")


def _flags(value: Any, count: int) -> list[bool]:
    """is_synthesized per test; all False (official) when it cannot be read per test."""
    try:
        flags = _json_list(value, "is_synthesized") if value not in (None, "") else []
    except BadRow:
        flags = []
    if len(flags) != count:
        scalar = value if isinstance(value, bool) else str(value).strip().lower() == "true"
        return [bool(scalar)] * count
    return [f is True or str(f).strip().lower() == "true" for f in flags]


def _call_args(value: Any) -> list:
    if isinstance(value, list):
        return value
    if isinstance(value, str):
        text = value.strip("\n")
        try:
            return [json.loads(line) for line in text.split("\n")] if text else []
        except json.JSONDecodeError as err:
            raise BadRow("undecodable call test", f"input: {err}") from None
    raise BadRow("undecodable call test", f"input is a {type(value).__name__}")


def _call_expected(value: Any):
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as err:
            raise BadRow("undecodable call test", f"output: {err}") from None
    return value


def problem(row: dict, max_tests: int | None) -> dict:
    if "inputs" not in row and "response" in row:
        raise BadRow("no tests", "a seed_sft row: its tests are in the seed_testcase config")
    missing = [f for f in REQUIRED if row.get(f) in (None, "")]
    if missing:
        raise BadRow("missing field", f"missing or empty: {', '.join(missing)}")
    inputs = _json_list(row["inputs"], "inputs")
    outputs = _json_list(row["outputs"], "outputs")
    if len(inputs) != len(outputs):
        raise BadRow("malformed tests", f"{len(inputs)} inputs but {len(outputs)} outputs")
    synthesized = _flags(row.get("is_synthesized"), len(inputs))
    order = sorted(range(len(inputs)), key=lambda i: synthesized[i])  # official tests first
    if max_tests:
        order = order[:max_tests]
    func_name = (row.get("func_name") or "").strip()
    class_name = (row.get("class_name") or "").strip()
    out: dict = {"task_id": f"rstar-coder/{row['question_id']}"}
    if func_name:
        tests = [{"args": _call_args(inputs[i]), "expected": _call_expected(outputs[i])} for i in order]
        out.update(kind="call", question=row["question"],
                   entry_point=f"{class_name}.{func_name}" if class_name else func_name, tests=tests)
    else:
        tests = []
        for i in order:
            if not isinstance(inputs[i], str) or not isinstance(outputs[i], str):
                raise BadRow("malformed tests", f"test {i + 1}: stdin input and output must be strings")
            tests.append({"input": inputs[i], "output": outputs[i]})
        out.update(kind="stdin", question=row["question"], tests=tests)
    if not out["tests"]:
        raise BadRow("no tests", "empty inputs")
    if row.get("starter_code"):
        out["starter_code"] = row["starter_code"]
    out["source"] = "rstar-coder"
    out["synthesized_tests"] = sum(synthesized[i] for i in order)
    return out


def convert(records: Iterable[tuple[str, Any]], report: Report,
            max_tests: int | None = DEFAULT_MAX_TESTS, limit: int | None = None) -> list[dict]:
    problems = collect(records, report, "rstar-coder", lambda row: problem(row, max_tests), limit=limit)
    del report.notes["skipped"]
    report.notes["max_tests"] = max_tests
    return problems


def hub_patterns(config: str) -> list[str]:
    return [f"{config}/*.parquet"]


def repo_files(root: Path, config: str | None) -> list[Path] | None:
    """The parquet shards of `config` in a directory laid out like the hub repo; None when it
    has no such folder and no config was asked for (a plain folder of rows)."""
    folder = root / (config or HUB_CONFIG)
    if not folder.is_dir():
        if config is None:
            return None
        raise DataError(f"{root}: has no {config}/ folder (the repo keeps each config's parquet shards in one)")
    found = sorted(folder.glob("*.parquet"))
    if not found:
        raise DataError(f"{folder}: holds no parquet shards")
    return found
