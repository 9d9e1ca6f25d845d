"""The record a flow run leaves: a DVC experiment named after the flow run, and its data on a DVC remote.

A run's dvc.lock, params and outputs live in the worker's checkout, and the next run overwrites
them. So every flow run ends (flows/pipeline.py) by saving the workspace as a DVC experiment
(`dvc exp save`): a commit under refs/exps/ whose parent is the checkout's HEAD, holding the
files git tracks as the run left them (dvc.lock, params, the metrics DVC leaves to git, an edited
tasks/ file) plus the untracked files that say what ran (dvc.lock, DVC's .gitignore files,
`cache: false` outputs, untracked code dependencies). Untracked files under problems/ are left
out: problem sets are data, for DVC (`dvc add`) or git by the user's choice, never committed by a
record. The user's branch, index and working tree are not touched. `dvc exp show` lists the runs
with their params and metrics; `selfdistill lineage PATH --rev NAME` audits one.

The message names the Prefect flow run, its status, the stages that ran, the params that differ
from HEAD and the stack's lock file; its trailers (Selfdistill-*) are what `selfdistill runs`
and the lineage audit read.

Then the record is pushed, data first: the experiment's outputs to the default DVC remote, then,
where git has a remote, the experiment's ref (`dvc exp push --no-cache`), so a ref on the git
remote always names data the DVC remote has. A record whose push fails is noted in
`.dvc/tmp/selfdistill-unpushed.json` and pushed again by the next run.

No DVC remote configured at all: a local directory next to the workspace,
`<workspace>/../<workspace name>-dvc-remote`, is added as the default remote in
`.dvc/config.local` (this machine only; never inside the repo, where `git clean` or deleting the
workspace would take it along); every push to it logs its size and how to point records
elsewhere (`dvc remote add -d`). Remotes configured but none of them the default: an error
naming them, since picking one would be a guess.

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
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from flows.dvcfiles import load_params
from flows.gitrepo import GitError, git, git_toplevel, head_commit, parse_trailers, read_at
from tasks.core.config import PROBLEMS_DIR  # imported problem sets: data, never committed by a record
from tasks.core.stack import LOCK as STACK_LOCK, describe as describe_stack

DEFAULT_REMOTE = "selfdistill-local"
LOCK_NAME = "selfdistill-flow.lock"
# Records saved but not yet pushed (a push failed): the next run pushes them first.
UNPUSHED_NAME = "selfdistill-unpushed.json"
# The trailers of a record's message, read back by `selfdistill runs` and `selfdistill lineage --rev`.
T_ID, T_NAME, T_STATUS, T_AT = ("Selfdistill-Flow-Run-Id", "Selfdistill-Flow-Run-Name", "Selfdistill-Status",
                                "Selfdistill-Recorded-At")
T_PARAMS, T_METRICS, T_REMOTE = "Selfdistill-Params-Files", "Selfdistill-Metrics-Files", "Selfdistill-DVC-Remote"
T_LOCK = "Selfdistill-Lock-Sha256"  # requirements/lock.txt, the stack the run was meant to run on
# How often a run waiting for the workspace lock says it still waits.
LOCK_WAIT_LOG_INTERVAL_S = 300.0

log_default = logging.getLogger("selfdistill.records")


class RecordError(GitError):
    pass


@dataclass
class RunRecord:
    """One recorded run: its experiment (name and commit) and its message's trailers."""
    name: str
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


@dataclass
class RecordResult:
    """What recording a run did: `record` is the experiment saved, or None when nothing was
    recorded; `pushed` whether it reached the remote(s) named; `remote` the DVC remote,
    `git_remote` the git remote its ref went to (None: no git remote configured)."""
    record: RunRecord | None = None
    remote: str | None = None
    git_remote: str | None = None
    pushed: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def rev(self) -> str | None:
        """The experiment holding this run's outputs."""
        return self.record.name if self.record else None


def experiment_refs(top: Path) -> dict[str, str]:
    """{experiment name: commit} for every DVC experiment in the git repo at `top`."""
    out = git(top, "for-each-ref", "--format=%(refname) %(objectname)", "refs/exps/", check=False)
    found = {}
    for line in out.splitlines():
        ref, commit = line.rsplit(" ", 1)
        if not ref.startswith("refs/exps/exec/"):  # DVC's own working refs, not experiments
            found[ref.rsplit("/", 1)[1]] = commit
    return found


def recorded_runs(top: Path) -> list[RunRecord]:
    """Every experiment in the git repo at `top` that a flow run saved, oldest first."""
    runs = []
    for name, commit in experiment_refs(top).items():
        message = git(top, "log", "-1", "--format=%B", commit)
        trailers = parse_trailers(message)
        if T_ID in trailers or T_AT in trailers:  # `selfdistill grid` and hand-made experiments are not runs
            runs.append(RunRecord(name, commit, trailers, message.split("\n", 1)[0]))
    return sorted(runs, key=lambda r: (r.recorded_at, r.name))


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


def up_to_date_stages(root: Path) -> tuple[list[str], list[str]]:
    """(stages whose outputs and dvc.lock entry match their deps now, the others). `dvc exp save`
    re-records every stage it is given as if it had just run (DVC's commit, forced): given only
    the up-to-date ones, it rewrites their entries as they are and leaves a stage that failed,
    never ran or has an edited dependency as dvc.lock says, not as the workspace is."""
    from dvc.dvcfile import ProjectFile
    from dvc.repo import Repo

    def address(stage) -> str:  # as `dvc exp save` in root takes it (stage.addressing is cwd's)
        path = os.path.relpath(stage.dvcfile.path, root)
        if not isinstance(stage.dvcfile, ProjectFile):
            return path
        return stage.name if path == "dvc.yaml" else f"{path}:{stage.name}"

    with Repo(str(root)) as repo:
        changed = repo.status()
        stages = [(address(stage), stage.addressing in changed) for stage in repo.index.stages]
    return [s for s, stale in stages if not stale], [s for s, stale in stages if stale]


def untracked_to_save(top: Path, root: Path, files: RecordFiles) -> list[str]:
    """The record's files git does not track yet (paths relative to `root`), for `dvc exp save
    -I`: dvc.lock, .gitignore, metrics, code; not git-ignored files, not problems/ (data)."""
    listed = git(top, "ls-files", "-z", "--others", "--exclude-standard", "--", *files.paths, *files.code,
                 check=False) if files.paths or files.code else ""
    problems = os.path.relpath(root / PROBLEMS_DIR, top)
    return sorted(os.path.relpath(top / p, root) for p in listed.split("\0")
                  if p and not (p == problems or p.startswith(problems + "/")))


# ---------------------------------------------------------------------------------------------
# The experiment


def identity_env(top: Path) -> dict[str, str]:
    """The environment for `dvc exp save`: the user's git identity, or one naming this tool where
    the worker's account has none (a fresh container)."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    name = git(top, "config", "user.name", check=False)
    email = git(top, "config", "user.email", check=False)
    if not name:
        env.setdefault("GIT_AUTHOR_NAME", "selfdistill flow")
        env.setdefault("GIT_COMMITTER_NAME", "selfdistill flow")
    if not email:
        env.setdefault("GIT_AUTHOR_EMAIL", f"selfdistill@{socket.gethostname()}")
        env.setdefault("GIT_COMMITTER_EMAIL", f"selfdistill@{socket.gethostname()}")
    return env


def experiment_name(top: Path, flow_run_name: str, flow_run_id: str) -> str:
    """The flow run's name as an experiment name (a git ref name); Prefect's random names can
    repeat, so a taken one gets the flow run id's first characters, then a number."""
    base = re.sub(r"[^A-Za-z0-9_-]+", "-", flow_run_name or "run").strip("-") or "run"
    taken = experiment_refs(top)
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}-{(flow_run_id or '')[:8] or n}" if n == 2 else f"{base}-{n}"
    return name


def commit_message(name: str, run_id: str, status: str, when: datetime, stages: dict[str, str],
                   head: str | None, params_diff: list[str], files: RecordFiles, remote: str | None,
                   stack: dict | None = None) -> str:
    ran = [s for s, outcome in stages.items() if outcome.startswith("ran")]
    subject = f"selfdistill run {name or run_id}: {status}, {len(ran)} stage(s) ran"
    lines = [subject, "", f"Prefect flow run {name} ({run_id}), {status}, recorded {when.isoformat()}."]
    base = f"HEAD ({head[:12]})"
    if params_diff:
        lines += ["", f"Params that differ from {base}:"] + [f"  {line}" for line in params_diff]
    else:
        lines += ["", f"Params: as in {base}."]
    if stages:
        lines += ["", "Stages:"] + [f"  {stage}: {outcome}" for stage, outcome in stages.items()]
    if stack and stack.get("lock"):
        lines += ["", f"Stack: {stack['lock']} (sha256 {stack['lock_sha256']}), "
                  + (f"{len(stack['differs'])} installed package(s) differ:" if stack["differs"] else "installed exactly")]
        lines += [f"  {line}" for line in stack["differs"]]
    lines += ["", f"{T_ID}: {run_id}", f"{T_NAME}: {name}", f"{T_STATUS}: {status}", f"{T_AT}: {when.isoformat()}",
              f"{T_PARAMS}: {', '.join(files.params)}", f"{T_METRICS}: {', '.join(files.metrics)}"]
    if remote:
        lines.append(f"{T_REMOTE}: {remote}")
    if stack and stack.get("lock"):
        lines.append(f"{T_LOCK}: {stack['lock_sha256']}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# The remotes


def dvc_run(root: Path, *args: str, log=log_default, env: dict | None = None) -> tuple[int, list[str]]:
    """`dvc ARGS` in root, its lines logged; returns the exit status and the lines."""
    if env is None:
        env = dict(os.environ)
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=env, capture_output=True, text=True)
    lines = [line.rstrip() for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    command = " ".join(a for a in args[:3] if not a.startswith("-"))
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
                "only)", DEFAULT_REMOTE, path)
    return DEFAULT_REMOTE


def announce_local_remote(root: Path, remote: str, log=log_default) -> None:
    """The remote this tool made on the user's behalf: where it is, how big, how to move off it."""
    path = default_remote_path(root)
    if remote != DEFAULT_REMOTE or not path.is_dir():
        return
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    log.warning("DVC remote %s (made by selfdistill because none was configured) is %s and holds %s. To keep "
                "records elsewhere: dvc remote add -d NAME URL (then `dvc remote remove %s` and delete %s)",
                DEFAULT_REMOTE, path, f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size} bytes", DEFAULT_REMOTE, path)


def git_remote_of(top: Path) -> str | None:
    """The git remote experiments are pushed to: origin, else the only one; None when none."""
    remotes = git(top, "remote", check=False).split()
    return "origin" if "origin" in remotes else (remotes[0] if len(remotes) == 1 else None)


def unpushed_path(root: Path) -> Path:
    return root / ".dvc" / "tmp" / UNPUSHED_NAME


def read_unpushed(root: Path) -> dict[str, str]:
    try:
        return json.loads(unpushed_path(root).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def write_unpushed(root: Path, entries: dict[str, str]) -> None:
    path = unpushed_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entries, indent=1) + "\n")


def push_experiment(root: Path, top: Path, name: str, commit: str, remote: str, git_remote: str | None,
                    log=log_default) -> None:
    """The experiment's data to the DVC remote, then its ref to the git remote (if any); raises
    RecordError when either fails, leaving the ref off the git remote unless its data got there."""
    from dvc.repo import Repo

    try:
        with Repo(str(root)) as repo:
            pushed = repo.push(remote=remote, revs=[commit], workspace=False)
    except Exception as err:  # noqa: BLE001 - DVC's errors (unreachable, unwritable) and the OS's
        raise RecordError(f"pushing experiment {name}'s data to DVC remote {remote} failed: {err}") from None
    log.info("experiment %s: %d file(s) pushed to DVC remote %s", name, pushed, remote)
    if git_remote:
        code, lines = dvc_run(root, "exp", "push", "--no-cache", git_remote, name, log=log, env=identity_env(top))
        if code != 0:
            raise RecordError(f"dvc exp push --no-cache {git_remote} {name} failed: {' '.join(lines[-3:])}")


def push_pending(root: Path, top: Path, remote: str, git_remote: str | None, current: str = "",
                 log=log_default) -> None:
    """Push every record in the unpushed list (`current`: this run's); the ones that fail stay
    listed, and raise."""
    pending = read_unpushed(root)
    errors = []
    for name, commit in list(pending.items()):
        if experiment_refs(top).get(name) != commit:
            log.warning("unpushed experiment %s is gone (removed with dvc exp remove?): not retried", name)
        else:
            try:
                push_experiment(root, top, name, commit, remote, git_remote, log)
            except RecordError as err:
                errors.append(str(err))
                continue
            if name != current:
                log.info("experiment %s, not pushed by its own run, is pushed now", name)
        del pending[name]
        write_unpushed(root, pending)
    if errors:
        raise RecordError("; ".join(errors) + f" (still listed in {unpushed_path(root)}: the next run retries)")


def save_experiment(root: Path, top: Path, name: str, message: str, files: RecordFiles, log=log_default) -> str | None:
    """`dvc exp save` of the workspace as experiment `name`; its commit, or None when no stage is
    up to date (nothing a record could hold). Leaves the user's index and dvc.lock as they were."""
    include = [arg for path in untracked_to_save(top, root, files) for arg in ("-I", path)]
    current, stale = up_to_date_stages(root)
    if not current:
        log.warning("no stage is up to date (%s): nothing for a record to hold, the run is not recorded",
                    ", ".join(stale))
        return None
    locks = {path: (top / path).read_bytes() for path in files.lockfiles}
    # `dvc exp save` resets git's index to HEAD when it is done, unstaging what the user staged:
    # the index is put back as it was, byte for byte.
    index = top / git(top, "rev-parse", "--git-path", "index")
    staged = index.read_bytes() if index.is_file() else None
    try:
        code, lines = dvc_run(root, "--wait-for-lock", "exp", "save", "-n", name, "-m", message, *include,
                              *current, log=log, env=identity_env(top))
    finally:
        if staged is not None:
            index.write_bytes(staged)
    commit = experiment_refs(top).get(name)
    if code != 0 or not commit:
        raise RecordError(f"dvc exp save -n {name} failed: {' '.join(lines[-3:])}")
    rewritten = [path for path, text in locks.items() if (top / path).read_bytes() != text]
    if rewritten:  # a record must hold dvc.lock as the run left it: undone, and refused
        for path in rewritten:
            (top / path).write_bytes(locks[path])
        dvc_run(root, "exp", "remove", name, log=log)
        raise RecordError(f"dvc exp save rewrote {', '.join(rewritten)} (put back as it was): not recorded")
    return commit


# ---------------------------------------------------------------------------------------------
# Recording a run


def record_run(repo_dir: str | os.PathLike, flow_run_id: str = "", flow_run_name: str = "", status: str = "completed",
               stages: dict[str, str] | None = None, push_outputs: bool = True, log=log_default,
               now: datetime | None = None) -> RecordResult:
    """Save what the last run produced in the workspace at repo_dir as a DVC experiment, then
    push it and any earlier record not yet pushed (see the module doc)."""
    from dvc.repo import Repo

    root = Path(Repo.find_root(str(repo_dir))).resolve()
    top = git_toplevel(root)
    if top is None:
        log.warning("%s is not in a git repository: the run is not recorded", root)
        return RecordResult(notes=["not a git repository: not recorded"])
    head = head_commit(top)
    if head is None:
        log.warning("%s has no commit yet: a DVC experiment needs one (git commit), the run is not recorded", top)
        return RecordResult(notes=["no git commit yet: not recorded"])
    files = record_files(root, top)
    if not files.lockfiles:
        log.info("no dvc.lock: no stage has run yet, nothing to record")
        return RecordResult(notes=["no dvc.lock: nothing recorded"])
    remote = ensure_remote(root, log) if push_outputs else None
    git_remote = git_remote_of(top) if push_outputs else None
    when = now or datetime.now(timezone.utc)
    old = params_at(top, head, files.params)
    new = params_of({name: (top / name).read_text() for name in files.params})
    params_diff = diff_params(old, new)
    message = commit_message(flow_run_name, flow_run_id, status, when, stages or {}, head, params_diff, files,
                             remote, describe_stack(root / STACK_LOCK))
    name = experiment_name(top, flow_run_name, flow_run_id)
    commit = save_experiment(root, top, name, message, files, log)
    if commit is None:
        return RecordResult(notes=["no stage up to date: not recorded"])
    record = RunRecord(name, commit, parse_trailers(message), message.split("\n", 1)[0])
    log.info("recorded flow run %s as DVC experiment %s (commit %s)%s", flow_run_name or flow_run_id, name,
             commit[:12], "; params differ from HEAD: " + "; ".join(params_diff) if params_diff else "")
    result = RecordResult(record=record, remote=remote, git_remote=git_remote)
    if push_outputs:
        write_unpushed(root, {**read_unpushed(root), name: commit})
        push_pending(root, top, remote, git_remote, name, log)
        result.pushed = True
        log.info("experiment %s pushed: data to DVC remote %s%s", name, remote,
                 f", ref to git remote {git_remote}" if git_remote else " (no git remote: the ref stays local)")
        announce_local_remote(root, remote, log)
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
