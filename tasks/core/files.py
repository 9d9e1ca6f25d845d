"""Reading and writing the pipeline's files so that a crash never leaves a half-written
file that looks valid: everything is written to a temp path beside the target and renamed."""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator


class DataError(ValueError):
    pass


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temp path next to `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, (0o777 if is_dir else 0o666) & ~umask)  # mkstemp's 0600 is not what users expect
    try:
        yield tmp
        if is_dir and path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: object) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    count = 0
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
            count += 1
    return count


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each line of a JSONL(.gz) file; a malformed line fails
    naming the file and line."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: not valid JSON: {err.msg} (column {err.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object")
            yield lineno, row


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    return [row for _, row in iter_jsonl(path)]


def read_json(path: str | os.PathLike) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON: {err}") from None


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def dir_sha256(path: str | os.PathLike) -> str:
    """sha256 over the names and contents of a directory's top-level files (an HF model dir:
    weights, config, tokenizer)."""
    digest = hashlib.sha256()
    for item in sorted(p for p in Path(path).iterdir() if p.is_file()):
        digest.update(item.name.encode() + b"\0")
        digest.update(bytes.fromhex(file_sha256(item)))
    return digest.hexdigest()


def resume_key(**parts) -> dict:
    """What decides the content of a partial output or checkpoint (hashes of the inputs, the
    settings, the code version), as plain JSON data: a resume continues only a run whose
    recorded key equals the current one, so it never mixes two runs."""
    return json.loads(json.dumps(parts, sort_keys=True, default=str))


def key_differences(recorded: dict | None, current: dict) -> list[str]:
    """How a recorded resume key differs from the current one, in words for a log line."""
    if not isinstance(recorded, dict):
        return ["no resume key recorded (written by an older version)"]
    changes = []
    for part in sorted(set(recorded) | set(current)):
        old, new = recorded.get(part), current.get(part)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            changes += [f"{part}.{k} {old.get(k)!r} -> {new.get(k)!r}"
                        for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        else:
            changes.append(f"{part} changed")
    return changes
