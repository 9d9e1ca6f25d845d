"""Git plumbing the run records and the lineage audit share: run git, find the top level and
HEAD, read a file at a rev, parse the trailers a record commit carries."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

TRAILER = re.compile(r"^(Selfdistill-[A-Za-z0-9-]+): (.*)$")


class GitError(RuntimeError):
    pass


def git(cwd: Path, *args: str, env: dict | None = None, input: str | None = None, check: bool = True) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, env=env, input=input, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise GitError(f"git {' '.join(args[:3])}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip() if proc.returncode == 0 else ""


def git_toplevel(path: Path) -> Path | None:
    proc = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=path, capture_output=True, text=True)
    return Path(proc.stdout.strip()).resolve() if proc.returncode == 0 else None


def head_commit(top: Path) -> str | None:
    return git(top, "rev-parse", "--verify", "-q", "HEAD^{commit}", check=False) or None


def read_at(top: Path, rev: str, path: str) -> str | None:
    """A file's text at a git rev (path relative to the git top level), or None if absent."""
    proc = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=top, capture_output=True)
    return proc.stdout.decode(errors="replace") if proc.returncode == 0 else None


def parse_trailers(message: str) -> dict[str, str]:
    return {m.group(1): m.group(2).strip() for line in message.splitlines() if (m := TRAILER.match(line))}
