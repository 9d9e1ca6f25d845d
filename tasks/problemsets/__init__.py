"""Problem sets at scale: public data turned into this project's problem schema
(tasks/core/problems.py), for `selfdistill problems` (tasks/commands/problems.py).

  codeio          CodeIO problems shipped in the PyPI package reasoning-gym: tests made by running
                  each reference on generated inputs in the sandbox (codeio.py)
  rstar_coder     rStar-Coder's seed problems (microsoft/rStar-Coder, seed_testcase) (rstar_coder.py)
  livecodebench   LiveCodeBench code_generation_lite, filtered by contest date (livecodebench.py)
  evalplus        evalplus's released HumanEval+ / MBPP+ files, expected values from the
                  canonical solutions run in the sandbox (evalplus.py)
  hub             a hub dataset's data files through huggingface_hub's cache (hub.py)

What they share lives here: reading source rows from local files (JSONL, JSON array, parquet, or
a folder of them); counting what is dropped and why, naming the problem and its file line;
saying why when nothing is kept; writing a problem file atomically and only once every row
loads as a problem.
"""
from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from tasks.core import files
from tasks.core.files import DataError
from tasks.core.problems import KINDS, load_problems, problem_kind

LOCAL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")


@dataclasses.dataclass
class Report:
    """What a conversion kept and dropped, and where the data came from."""
    source: dict
    kept: int = 0
    read: int = 0
    dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    drops: list = dataclasses.field(default_factory=list)
    notes: dict = dataclasses.field(default_factory=dict)
    first_fields: list | None = None  # the first object row's field names, for a wrong-format error

    def drop(self, task_id: str | None, where: str, reason: str, detail: str = "") -> None:
        self.dropped[reason] += 1
        self.drops.append({"task_id": task_id, "where": where, "reason": reason,
                           "detail": str(detail)[:300]})

    def counts(self) -> dict:
        """The provenance a caller writes (e.g. into data/source.json): no per-problem list."""
        return dict(self.source, read=self.read, kept=self.kept,
                    dropped=dict(sorted(self.dropped.items())), **self.notes)

    def as_json(self) -> dict:
        return dict(self.counts(), drops=self.drops)

    def nothing_kept(self, fmt: str) -> str:
        """Why a conversion kept no problem, in words: the drops by reason, the first of each
        with its place, and what the first row held (a file in another format shows here)."""
        if not self.read:
            return f"no problems to write: the {fmt} source holds no rows"
        text = f"no problems to write: none of the {self.read} rows read became a {fmt} problem"
        if self.dropped:
            text += " (" + ", ".join(f"{r}: {n}" for r, n in self.dropped.most_common()) + ")"
        firsts = {}
        for drop in self.drops:
            firsts.setdefault(drop["reason"], drop)
        for drop in list(firsts.values())[:5]:
            name = f" ({drop['task_id']})" if drop["task_id"] else ""
            text += f"\n  {drop['where']}{name}: {drop['reason']}: {drop['detail']}"
        others = {k: v for k, v in self.notes.items() if isinstance(v, int) and v and k in
                  ("duplicates", "skipped", "outside_date_window")}
        if others:
            text += "\n  also not kept: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in others.items())
        if self.first_fields is not None and self.dropped.get("missing field") == self.read:
            text += f"\n  the first row's fields: {', '.join(self.first_fields[:12])}: is it a {fmt} file?"
        return text


def is_local(src: str) -> bool:
    """A path that exists (file or folder), or one that names a local file format: those are
    read here; anything else is a hub id (tasks/problemsets/hub.py)."""
    return os.path.exists(src) or str(src).endswith(LOCAL_SUFFIXES)


def local_files(src: str | os.PathLike) -> list[Path]:
    path = Path(src)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(LOCAL_SUFFIXES))
        if not found:
            raise DataError(f"{path}: holds no {', '.join(LOCAL_SUFFIXES)} files")
        return found
    return [path]


def source_files_provenance(paths: list[Path]) -> dict:
    return {"files": {str(p): files.file_sha256(p) for p in paths}}


def read_local(src: str | os.PathLike) -> Iterator[tuple[str, Any]]:
    """(where, row) for every row of a local file or folder of files, in order (read_paths)."""
    yield from read_paths(local_files(src))


def read_paths(paths: Iterable[Path]) -> Iterator[tuple[str, Any]]:
    """(where, row) for every row of the files, in order. `where` is "file:line" for JSONL,
    "file:item N" for a JSON array, "file:row N" for parquet. A row that is not a JSON object is
    yielded as-is, for the caller to count as malformed."""
    for path in paths:
        name = path.name
        if name.endswith(".parquet"):
            yield from _read_parquet(path)
            continue
        opener = gzip.open if name.endswith(".gz") else open
        try:
            with opener(path, "rt", encoding="utf-8") as f:
                head = f.read(4096).lstrip()
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"{path}: cannot read: {err}") from None
        if head.startswith("["):  # a JSON array (reasoning-gym's codeio-hq.jsonl.gz is one)
            try:
                with opener(path, "rt", encoding="utf-8") as f:
                    rows = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise DataError(f"{path}: not a valid JSON array: {err}") from None
            for index, row in enumerate(rows, 1):
                yield f"{path}:item {index}", row
            continue
        yield from _read_lines(path, opener)


def _read_lines(path: Path, opener) -> Iterator[tuple[str, Any]]:
    """Each line decoded on its own, so a line that is not UTF-8 or not JSON is one counted row
    naming its line number, not the end of the file."""
    lineno = 0
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    yield f"{path}:{lineno}", MalformedRow(f"not UTF-8 text at line {lineno}")
                    continue
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{lineno}", json.loads(line)
                except json.JSONDecodeError as err:
                    yield f"{path}:{lineno}", MalformedRow(f"not JSON at line {lineno}: {err.msg}")
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: cannot read it after line {lineno}: {err}") from None


class BadRow(ValueError):
    """A row that cannot become a problem: (reason, detail)."""


def collect(records: Iterable[tuple[str, Any]], report: Report, prefix: str | None, to_problem: Callable[[dict], dict],
            skip: Callable[[dict], bool] = lambda row: False, limit: int | None = None,
            id_field: str = "question_id", places: dict | None = None) -> list[dict]:
    """Rows -> problems with task ids `<prefix>/<id_field>` (the id itself if no prefix). A
    malformed row, or one that `to_problem` refuses (BadRow), is counted in `report` with its id
    and file line; a repeated id is counted as a duplicate; a row `skip` says no to (it may raise
    BadRow too) is counted as skipped. `places` (if given) gets each kept task_id's file line."""
    problems, seen = [], set()
    duplicates = skipped = 0
    for where, row in records:
        report.read += 1
        if isinstance(row, MalformedRow) or not isinstance(row, dict):
            report.drop(None, where, "malformed row", row if isinstance(row, MalformedRow) else "not a JSON object")
            continue
        if report.first_fields is None:
            report.first_fields = sorted(map(str, row))
        raw_id = row.get(id_field)
        task_id = None if raw_id in (None, "") else f"{prefix}/{raw_id}" if prefix else str(raw_id)
        try:
            if skip(row):
                skipped += 1
                continue
            if task_id is not None and task_id in seen:
                duplicates += 1
                continue
            converted = to_problem(row)
        except BadRow as err:
            reason, detail = err.args if len(err.args) == 2 else ("malformed row", str(err))
            report.drop(task_id, where, reason, detail)
            continue
        seen.add(task_id)
        problems.append(converted)
        if places is not None:
            places[converted["task_id"]] = where
        if limit and len(problems) >= limit:
            break
    report.kept = len(problems)
    report.notes.update(duplicates=duplicates, skipped=skipped,
                        kinds={k: sum(p["kind"] == k for p in problems) for k in ("stdin", "call")})
    return problems


class MalformedRow(str):
    """Stands for a row that could not be parsed; its text says why."""


def _read_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.ParquetFile(path)
        number = 0
        for batch in table.iter_batches(batch_size=256):
            for row in batch.to_pylist():
                number += 1
                yield f"{path}:row {number}", row
    except OSError as err:
        raise DataError(f"{path}: cannot read parquet: {err}") from None


def write_problems(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    """Write problems atomically: every row is checked as a problem first, and the finished
    file must load with tasks.core.problems.load_problems, or nothing is written."""
    rows = list(rows)
    if not rows:
        raise DataError(f"{path}: no problems to write (every row was dropped)")
    seen = set()
    for number, row in enumerate(rows, 1):
        problem_kind(row, f"problem {number} ({row.get('task_id')})")
        if row["task_id"] in seen:
            raise DataError(f"duplicate task_id {row['task_id']!r}")
        seen.add(row["task_id"])
    path = Path(path)
    with files.atomic_path(path) as tmp, open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row, allow_nan=False) + "\n")
        f.close()
        load_problems(str(tmp), kinds=KINDS)  # the file a user gets loads, or it is not written
    return len(rows)


def provenance_path(out: str | os.PathLike) -> Path:
    """problems/NAME.jsonl -> problems/NAME.source.json"""
    out = Path(out)
    name = out.name
    for suffix in (".jsonl.gz", ".jsonl", ".json"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return out.with_name(name + ".source.json")


def json_roundtrip(value):
    """The value as a JSON file gives it back; ValueError/TypeError if it cannot be written
    (NaN, infinities, sets, bytes, objects)."""
    return json.loads(json.dumps(value, allow_nan=False))
