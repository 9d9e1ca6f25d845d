"""The record a flow run leaves: a git commit on a branch of its own, and its outputs on a DVC remote.

A run's dvc.lock, params and outputs live in the worker's checkout, and the next run overwrites
them. So every flow run ends (flows/pipeline.py) by recording what it produced:

- a git commit on `selfdistill/runs/<UTC time>-<flow run name>`, whose parent is the checkout's
  HEAD, holding the files that say what ran: every dvc.yaml and dvc.lock (and .dvc file), the
  params files the stages read, the .gitignore files DVC writes next to its outputs, the outputs
  DVC leaves to git (`cache: false`: metrics, plots, the report), and the stages' plain code
  dependencies as they were when the run used them (an uncommitted edit to tasks/ included);
- then `dvc push` of the outputs to the workspace's default DVC remote, so the commit's dvc.lock
  can be checked out again after the workspace and its cache have moved on.

Why a branch and a commit rather than a DVC experiment (`dvc exp save`): an experiment is a
hidden ref (refs/exps/...) that plain git does not list, clone or push by default, and `dvc exp
save` works through the checked-out branch's workspace; a branch is audited with plain git
(`git log`, `git show BRANCH:dvc.lock`, `git diff A B -- params.yaml`), pushed like any branch,
and built here with git plumbing on a temporary index, so the user's checked-out branch, index
and working tree are never touched.

A run whose dvc.lock files are identical to the last recorded run's records nothing (and pushes
nothing): it produced nothing new. The commit message names the Prefect flow run and the params
that differ from HEAD; its trailers (Selfdistill-*) are what `selfdistill runs` reads.

No DVC remote configured at all: a local directory next to the workspace,
`<workspace>/../<workspace name>-dvc-remote`, is added as the default remote in
`.dvc/config.local` (this machine only; never inside the repo, where `git clean` or deleting the
workspace would take it along), with a warning to configure a real one (`dvc remote add -d`).
Remotes configured but none of them the default: an error naming them, since picking one would
be a guess.

Two flow runs in one workspace would mix their params, dvc.lock and records, so whole runs are
serialized per workspace: `workspace_lock` holds an flock on `.dvc/tmp/selfdistill-flow.lock`
for the whole run; a second run logs that it waits, and for whom.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml

RUNS_PREFIX = "selfdistill/runs/"
DEFAULT_REMOTE = "selfdistill-local"
LOCK_NAME = "selfdistill-flow.lock"
# The trailers of a record commit, read back by `selfdistill runs` and `selfdistill lineage --rev`.
T_ID, T_NAME, T_STATUS, T_AT = ("Selfdistill-Flow-Run-Id", "Selfdistill-Flow-Run-Name", "Selfdistill-Status",
                                "Selfdistill-Recorded-At")
T_PARAMS, T_METRICS, T_REMOTE = "Selfdistill-Params-Files", "Selfdistill-Metrics-Files", "Selfdistill-DVC-Remote"
# The report's DVC metrics file (tasks/report.py): `selfdistill runs` shows its pass@1 per model.
REPORT_SUMMARY = "report/summary.json"
TRAILER = re.compile(r"^(Selfdistill-[A-Za-z-]+): (.*)$")
# How often a run waiting for the workspace lock says it still waits.
LOCK_WAIT_LOG_INTERVAL_S = 300.0

log_default = logging.getLogger("selfdistill.records")


class RecordError(RuntimeError):
    pass


@dataclass
class RunRecord:
    """One recorded run: its branch, commit and trailers."""
    branch: str
    commit: str
    trailers: dict[str, str]
    subject: str = ""

    @property
    def flow_run_id(self) -> str:
        return self.trailers.get(T_ID, "")

    @property
    def flow_run_name(self) -> str:
        return self.trailers.get(T_NAME, "")

    @property
    def status(self) -> str:
        return self.trailers.get(T_STATUS, "")

    @property
    def recorded_at(self) -> datetime:
        try:
            return datetime.fromisoformat(self.trailers[T_AT])
        except (KeyError, ValueError):
            return datetime.fromtimestamp(0, timezone.utc)

    def files(self, trailer: str) -> list[str]:
        return [f for f in self.trailers.get(trailer, "").split(", ") if f]


@dataclass
class RecordResult:
    """What recording a run did: `record` is the new record, or None when nothing was recorded;
    `same_as` the earlier record this run's dvc.lock matches (nothing changed)."""
    record: RunRecord | None = None
    same_as: RunRecord | None = None
    remote: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def rev(self) -> str | None:
        """The branch holding this run's outputs: its own, or the identical earlier run's."""
        found = self.record or self.same_as
        return found.branch if found else None


# ---------------------------------------------------------------------------------------------
# git


def git(cwd: Path, *args: str, env: dict | None = None, input: str | None = None, check: bool = True) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, env=env, input=input, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RecordError(f"git {' '.join(args[:3])}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip() if proc.returncode == 0 else ""


def git_toplevel(path: Path) -> Path | None:
    proc = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=path, capture_output=True, text=True)
    return Path(proc.stdout.strip()).resolve() if proc.returncode == 0 else None


def head_commit(top: Path) -> str | None:
    return git(top, "rev-parse", "--verify", "-q", "HEAD^{commit}", check=False) or None


def parse_trailers(message: str) -> dict[str, str]:
    return {m.group(1): m.group(2).strip() for line in message.splitlines() if (m := TRAILER.match(line))}


def recorded_runs(top: Path) -> list[RunRecord]:
    """Every recorded run in the git repo at `top`, oldest first (by the time it was recorded)."""
    out = git(top, "for-each-ref", "--format=%(refname)%00%(objectname)%00%(contents)%1e",
              f"refs/heads/{RUNS_PREFIX}", check=False)
    runs = []
    for entry in out.split("\x1e"):
        if not entry.strip():
            continue
        ref, commit, message = entry.strip("\n").split("\x00", 2)
        trailers = parse_trailers(message)
        if T_ID not in trailers and T_AT not in trailers:
            continue  # a branch under the prefix that is not a record
        runs.append(RunRecord(ref.removeprefix("refs/heads/"), commit, trailers, message.split("\n", 1)[0]))
    return sorted(runs, key=lambda r: (r.recorded_at, r.branch))


def read_at(top: Path, rev: str, path: str) -> str | None:
    """A file's text at a git rev (path relative to the git top level), or None if absent."""
    proc = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=top, capture_output=True)
    return proc.stdout.decode(errors="replace") if proc.returncode == 0 else None


def load_params(text: str | None, name: str) -> dict:
    from flows.lineage import flatten

    if text is None:
        return {}
    if name.endswith(".json"):
        data = json.loads(text)
    else:
        data = yaml.safe_load(text)
    return flatten(data) if isinstance(data, dict) else {}


def params_of(texts: dict[str, str | None]) -> dict[str, object]:
    """{'train.epochs': 1, 'other.yaml:lr': 0.1}: flattened params of each file (path relative to
    the git top level); keys of the top-level params.yaml without its name, as DVC shows them."""
    values = {}
    for name, text in texts.items():
        for key, value in load_params(text, name).items():
            values[key if name == "params.yaml" else f"{name}:{key}"] = value
    return values


def params_at(top: Path, rev: str, files: list[str]) -> dict[str, object]:
    return params_of({name: read_at(top, rev, name) for name in files})


def diff_params(old: dict, new: dict) -> list[str]:
    """['train.epochs: 1 -> 3', ...]: the keys whose values differ."""
    unset = object()
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, unset), new.get(key, unset)
        if a != b:
            show = lambda v: "(unset)" if v is unset else json.dumps(v)  # noqa: E731
            lines.append(f"{key}: {show(a)} -> {show(b)}")
    return lines


# ---------------------------------------------------------------------------------------------
# What a record holds


@dataclass
class RecordFiles:
    paths: list[str]  # relative to the git top level: DVC's records, params, .gitignore, cache: false outs
    code: list[str]  # plain dependencies (no stage makes them, DVC does not track them): git's to record
    lockfiles: list[str]
    params: list[str]
    metrics: list[str]


def record_files(root: Path, top: Path) -> RecordFiles:
    from dvc.dependency.param import ParamsDependency
    from dvc.dvcfile import ProjectFile
    from dvc.repo import Repo
    from dvc.utils.fs import path_isin

    paths, code, locks, params, metrics = set(), set(), set(), set(), set()
    if (root / "params.yaml").is_file():
        params.add(root / "params.yaml")
    with Repo(str(root)) as repo:
        outs = list(repo.index.outs)
        for stage in repo.index.stages:
            paths.add(Path(stage.dvcfile.path))
            if isinstance(stage.dvcfile, ProjectFile):
                locks.add(Path(os.path.splitext(stage.dvcfile.path)[0] + ".lock"))
            for dep in stage.deps:
                if isinstance(dep, ParamsDependency):
                    params.add(Path(dep.fs_path))
                elif getattr(dep, "is_in_repo", False) and not any(
                        o.fs_path == dep.fs_path or path_isin(dep.fs_path, o.fs_path)
                        or path_isin(o.fs_path, dep.fs_path) for o in outs):
                    code.add(Path(dep.fs_path))
        for out in outs:
            if not out.is_in_repo:
                continue
            path = Path(out.fs_path)
            if out.metric:
                metrics.add(path)
            if out.use_cache:
                paths.add(path.parent / ".gitignore")  # where DVC lists a cached output for git to ignore
            elif path.is_dir():
                paths.update(p for p in path.rglob("*") if p.is_file())
            else:
                paths.add(path)
    rel = lambda items: sorted(os.path.relpath(p, top) for p in items if p.exists())  # noqa: E731
    return RecordFiles(rel(paths | locks | params), rel(code), rel(locks), rel(params), rel(metrics))


# ---------------------------------------------------------------------------------------------
# The commit


def identity_env(top: Path) -> dict[str, str]:
    """The environment for commit-tree: the user's git identity, or one naming this tool where
    the worker's account has none (a fresh container)."""
    env = dict(os.environ)
    name = git(top, "config", "user.name", check=False)
    email = git(top, "config", "user.email", check=False)
    if not name:
        env.setdefault("GIT_AUTHOR_NAME", "selfdistill flow")
        env.setdefault("GIT_COMMITTER_NAME", "selfdistill flow")
    if not email:
        env.setdefault("GIT_AUTHOR_EMAIL", f"selfdistill@{socket.gethostname()}")
        env.setdefault("GIT_COMMITTER_EMAIL", f"selfdistill@{socket.gethostname()}")
    return env


def branch_name(top: Path, when: datetime, flow_run_name: str, flow_run_id: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", flow_run_name or "run").strip("-") or "run"
    base = f"{RUNS_PREFIX}{when.strftime('%Y%m%dT%H%M%SZ')}-{slug}"
    name, n = base, 1
    while git(top, "rev-parse", "--verify", "-q", f"refs/heads/{name}", check=False):
        n += 1
        name = f"{base}-{(flow_run_id or '')[:8] or n}" if n == 2 else f"{base}-{n}"
    return name


def write_tree(top: Path, files: RecordFiles, parent: str | None) -> tuple[str, list[str]]:
    """HEAD's tree plus the record files as they are in the working tree, built in a temporary
    index (the user's index and working tree are only read); returns the tree and the files it
    changes from HEAD (`M path`)."""
    with tempfile.TemporaryDirectory(prefix="selfdistill-record-") as tmp:
        env = dict(os.environ, GIT_INDEX_FILE=str(Path(tmp) / "index"))
        if parent:
            git(top, "read-tree", parent, env=env)
        git(top, "update-index", "--add", "--remove", "-z", "--stdin", env=env, input="\0".join(files.paths) + "\0")
        ignored = set(git(top, "check-ignore", "-z", "--stdin", input="\0".join(files.code) + "\0",
                          check=False).split("\0")) if files.code else set()
        code = [p for p in files.code if p not in ignored]
        if code:
            # As `git add` would: the code as the run used it, files git ignores (__pycache__) left out.
            git(top, "add", "-A", "--", *code, env=env)
        tree = git(top, "write-tree", env=env)
    if parent:
        changed = git(top, "diff-tree", "-r", "--name-status", "--no-renames", parent, tree).splitlines()
    else:
        changed = [f"A\t{p}" for p in git(top, "ls-tree", "-r", "--name-only", tree).splitlines()]
    return tree, [line.replace("\t", " ") for line in changed]


def commit_message(name: str, run_id: str, status: str, when: datetime, stages: dict[str, str],
                   head: str | None, params_diff: list[str], files: RecordFiles, changed: list[str] | None,
                   remote: str | None) -> str:
    ran = [s for s, outcome in stages.items() if outcome == "ran"]
    subject = f"selfdistill run {name or run_id}: {status}, {len(ran)} stage(s) ran"
    lines = [subject, "", f"Prefect flow run {name} ({run_id}), {status}, recorded {when.isoformat()}."]
    base = f"HEAD ({head[:12]})" if head else "HEAD (none: an empty repository)"
    if params_diff:
        lines += ["", f"Params that differ from {base}:"] + [f"  {line}" for line in params_diff]
    else:
        lines += ["", f"Params: as in {base}."]
    if stages:
        lines += ["", "Stages:"] + [f"  {stage}: {outcome}" for stage, outcome in stages.items()]
    if changed:
        lines += ["", "Files that differ from HEAD:"] + [f"  {line}" for line in changed]
    lines += ["", f"{T_ID}: {run_id}", f"{T_NAME}: {name}", f"{T_STATUS}: {status}", f"{T_AT}: {when.isoformat()}",
              f"{T_PARAMS}: {', '.join(files.params)}", f"{T_METRICS}: {', '.join(files.metrics)}"]
    if remote:
        lines.append(f"{T_REMOTE}: {remote}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# The DVC remote


def dvc_run(root: Path, *args: str, log=log_default) -> tuple[int, list[str]]:
    """`dvc ARGS` in root, its lines logged; returns the exit status and the lines."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=env, capture_output=True, text=True)
    lines = [line.rstrip() for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    command = next(a for a in args if not a.startswith("-"))
    for line in lines:
        log.info("dvc %s: %s", command, line)
    return proc.returncode, lines


def default_remote_path(root: Path) -> Path:
    return root.parent / f"{root.name}-dvc-remote"


def ensure_remote(root: Path, log=log_default) -> str:
    """The name of the remote `dvc push` uses here: the configured default, or a local directory
    next to the workspace added as the default when no remote is configured at all."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        default = repo.config["core"].get("remote")
        remotes = sorted(repo.config["remote"])
    if default:
        return default
    if remotes:
        raise RecordError(f"DVC remotes are configured ({', '.join(remotes)}) but none is the default: "
                          f"choose one with `dvc remote default NAME`")
    path = default_remote_path(root)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RecordError(f"no DVC remote configured, and the default one could not be made ({err}): "
                          f"configure one with `dvc remote add -d NAME URL`") from None
    code, lines = dvc_run(root, "remote", "add", "--local", "--default", DEFAULT_REMOTE, str(path), log=log)
    if code != 0:
        raise RecordError(f"dvc remote add {DEFAULT_REMOTE} {path}: {' '.join(lines[-3:])}")
    log.warning("no DVC remote was configured: added %s -> %s as the default (in .dvc/config.local, this machine "
                "only). For records that outlive this disk: dvc remote add -d NAME URL", DEFAULT_REMOTE, path)
    return DEFAULT_REMOTE


def push(root: Path, remote: str, log=log_default) -> None:
    code, lines = dvc_run(root, "--wait-for-lock", "push", "--remote", remote, log=log)
    if code != 0:
        raise RecordError(f"dvc push --remote {remote} failed: {' '.join(lines[-3:])}")


# ---------------------------------------------------------------------------------------------
# Recording a run


def record_run(repo_dir: str | os.PathLike, flow_run_id: str = "", flow_run_name: str = "", status: str = "completed",
               stages: dict[str, str] | None = None, push_outputs: bool = True, log=log_default,
               now: datetime | None = None) -> RecordResult:
    """Record what the last run produced in the workspace at repo_dir (see the module doc)."""
    from dvc.repo import Repo

    root = Path(Repo.find_root(str(repo_dir))).resolve()
    top = git_toplevel(root)
    if top is None:
        log.warning("%s is not in a git repository: the run is not recorded", root)
        return RecordResult(notes=["not a git repository: not recorded"])
    files = record_files(root, top)
    if not files.lockfiles:
        log.info("no dvc.lock: no stage has run yet, nothing to record")
        return RecordResult(notes=["no dvc.lock: nothing recorded"])
    runs = recorded_runs(top)
    if runs:
        last = runs[-1]
        same = all(git(top, "rev-parse", "--verify", "-q", f"{last.commit}:{p}", check=False)
                   == git(top, "hash-object", "--", p) for p in files.lockfiles)
        if same:
            log.info("dvc.lock is as recorded by the last run %s (%s): nothing new to record", last.branch,
                     last.flow_run_name or last.flow_run_id)
            return RecordResult(same_as=last, notes=[f"unchanged since {last.branch}: nothing recorded"])
    remote = ensure_remote(root, log) if push_outputs else None
    when = now or datetime.now(timezone.utc)
    head = head_commit(top)
    old = params_at(top, head, files.params) if head else {}
    new = params_of({name: (top / name).read_text() for name in files.params})
    params_diff = diff_params(old, new)
    tree, changed = write_tree(top, files, head)
    message = commit_message(flow_run_name, flow_run_id, status, when, stages or {}, head, params_diff, files,
                             changed, remote)
    commit = git(top, "commit-tree", tree, *(["-p", head] if head else []), "-F", "-", env=identity_env(top),
                 input=message)
    branch = branch_name(top, when, flow_run_name, flow_run_id)
    git(top, "update-ref", "-m", f"selfdistill: record flow run {flow_run_name or flow_run_id}",
        f"refs/heads/{branch}", commit, "")
    record = RunRecord(branch, commit, parse_trailers(message), message.split("\n", 1)[0])
    log.info("recorded flow run %s as git branch %s (commit %s)%s", flow_run_name or flow_run_id, branch, commit[:12],
             "; params differ from HEAD: " + "; ".join(params_diff) if params_diff else "")
    result = RecordResult(record=record, remote=remote)
    if push_outputs:
        push(root, remote, log)
        log.info("outputs pushed to DVC remote %s", remote)
    return result


# ---------------------------------------------------------------------------------------------
# One run at a time per workspace


def lock_path(repo_dir: str | os.PathLike) -> Path | None:
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        root = Path(Repo.find_root(str(repo_dir)))
    except NotDvcRepoError:
        return None  # the run fails on that at once; nothing to serialize
    return root / ".dvc" / "tmp" / LOCK_NAME


@contextmanager
def workspace_lock(repo_dir: str | os.PathLike, holder: str, log=log_default, poll_s: float = 0.5):
    """Hold the workspace's flow lock (an flock, released by the kernel if the process dies) for
    the body; a run that finds it taken logs whom it waits for, then waits."""
    path = lock_path(repo_dir)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            start = last_log = time.monotonic()
            held_by = path.read_text().strip() or "another process"
            log.info("waiting for the workspace lock %s: held by %s (one flow run at a time per workspace)",
                     path, held_by)
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    time.sleep(poll_s)
                    if time.monotonic() - last_log >= LOCK_WAIT_LOG_INTERVAL_S:
                        last_log = time.monotonic()
                        log.info("still waiting for the workspace lock (%.0f s): held by %s", last_log - start,
                                 path.read_text().strip() or "another process")
            log.info("got the workspace lock after waiting %.1f s", time.monotonic() - start)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{holder}, pid {os.getpid()} on {socket.gethostname()}, since "
                      f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}\n".encode(), 0)
        yield
    finally:
        os.close(fd)
