"""The Prefect flow that runs dvc.yaml: one Prefect task per DVC stage, built from DVC's own graph.

dvc.yaml stays the only definition of the DAG. At the start of every run the flow asks DVC for
its stage graph (the repo index), makes one task per stage (foreach / matrix items included),
wires each task to the stages it depends on, and runs each stage with
`dvc repro --single-item STAGE`, so DVC decides what is unchanged, DVC's cache holds the data and
dvc.lock stays the record. Adding a stage to dvc.yaml adds a task here with no code change.

    selfdistill flow run [--target STAGE ...] [--set key=value ...] [--force] [--no-record]
    selfdistill flow plan [--target STAGE ...]     # the tasks a run would make, without running

Every run holds the workspace's flow lock from start to end (one run at a time per workspace;
another waits) and ends by recording what it produced, unless `record=False` / `--no-record`:
a DVC experiment named after the flow run, pushed with its data (flows/records.py).

Where CUDA is present, the stages that put a model on the GPU (GPU_STAGES) run one at a time:
each takes the slot of a Prefect global concurrency limit named for the machine
(`selfdistill-gpu:<hostname>`, limit 1), which the flow creates if it is missing.
SELFDISTILL_ASSUME_CUDA=1 (or 0) says whether CUDA is present instead of asking torch.

At most `max_parallel` stage commands run at once (default 2): each holds a slot of a Prefect
global concurrency limit that the flow run creates for itself (`selfdistill-stages:<flow run>`,
max_parallel slots) and deletes when its stages have finished. Prefect's UI shows it, with its
slots in use, while the run lasts.

A stage whose command exits with EXIT_NO_RETRY (bad params or data, a fixed config out of GPU
memory: tasks.core.config.run_stage) is not retried; any other failure is, `retries` times.

With no PREFECT_API_URL set, Prefect runs an ephemeral local API for the run; with it set, the
run is recorded on that server.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, get_current_settings, temporary_settings
from prefect.task_runners import ThreadPoolTaskRunner

from tasks.core.config import EXIT_NO_RETRY, PARAMS_FILE, ParamsError
from tasks.core.files import atomic_path
from tasks.core.profiles import update_params_file

FLOW_NAME = "selfdistill"
# dvc.yaml writes every model under models/ (models/base, models/<arm>); each one gets a lineage
# artifact on the flow run.
MODELS_DIR = "models"
# What DVC did with a stage, read from its dvc.lock entry before and after `dvc repro`.
OUTCOME_SKIPPED = "unchanged: skipped (its dvc.lock entry is as before)"
OUTCOME_RAN = "ran: its dvc.lock entry changed (by its command, or restored from DVC's run-cache)"
OUTCOME_FORCED = "ran (--force): its dvc.lock entry is as before"
# Prefect waits 20 s by default for its ephemeral API to start; a first start on a fresh machine
# can take over a minute. Used only where the user has not set
# PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.
EPHEMERAL_STARTUP_TIMEOUT_S = 180
# A stage command's progress bar redraws its line with '\r' many times a second; log one such
# redraw per this many seconds so long stages show progress without flooding the run's logs.
PROGRESS_LOG_INTERVAL_S = 15.0
# How many stage commands run at once unless the flow's `max_parallel` (or Prefect's
# PREFECT_TASKS_RUNNER_THREAD_POOL_MAX_WORKERS) says otherwise: every stage here already uses all
# of a machine's cores, and two training stages at once already need ~20 GB on the default profile.
DEFAULT_MAX_PARALLEL = 2
# A stage command prints its own reason for failing as a line starting with this
# (tasks.core.config.run_stage); DVC's own lines say "ERROR:".
STAGE_ERROR_PREFIX = "error:"
# DVC's words for a stage command that failed (dvc/stage/exceptions.py, StageCmdFailedError): the
# end of its "ERROR: failed to reproduce ..." message, which may span lines (a multi-line cmd).
DVC_COMMAND_STATUS = re.compile(r", exited with (-?\d+)$")
# Stage groups that put a model on the GPU: their tasks are tagged `gpu` and, where CUDA is
# present, run one at a time (gpu_slot). `model`, `publish`, `sample-merge` and `evaluate-merge`
# (they join files) run on the CPU.
GPU_STAGES = ("sample", "sample-shard", "train", "evaluate", "evaluate-validation", "evaluate-test", "diagnose",
              "diagnose-base")
# "1" / "0": CUDA is present / absent, whatever torch says (tests; a worker that must not import torch).
ASSUME_CUDA_ENV = "SELFDISTILL_ASSUME_CUDA"
# The global concurrency limit that keeps GPU stages apart on this machine, and its slots when
# the flow creates it (the user may change it: `prefect gcl update NAME --limit N`).
GPU_LIMIT_PREFIX = "selfdistill-gpu:"
GPU_LIMIT_SLOTS = 1
# The global concurrency limit of one flow run's stage commands, `max_parallel` slots:
# STAGE_LIMIT_PREFIX + the flow run's name and id.
STAGE_LIMIT_PREFIX = "selfdistill-stages:"


class PipelineError(RuntimeError):
    # False on a stage failure that a rerun would repeat (its command exited with EXIT_NO_RETRY).
    retry = True


# ---------------------------------------------------------------------------------------------
# The DAG, read from DVC


@dataclass(frozen=True)
class StageNode:
    name: str  # DVC's address of the stage: "prepare", "train@none", "sub/dvc.yaml:stage"
    upstream: tuple[str, ...]  # the stages whose outputs it reads
    outs: tuple[str, ...]  # its outputs, relative to the repo root

    @property
    def group(self) -> str:
        """`train` for every `train@<item>`: the tag Prefect concurrency limits key on."""
        return self.name.split("@", 1)[0]


def read_stage_graph(repo_dir: str | os.PathLike, targets: list[str] | None = None) -> list[StageNode]:
    """The pipeline stages of the DVC repo at repo_dir, upstream first. With targets (any name
    `dvc repro` takes: `train@none`, `train`, `dvc.yaml:train`), only those and what they need."""
    import networkx as nx
    from dvc.exceptions import DvcException
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    from flows.lineage import stage_address

    root = Path(repo_dir).resolve()
    with Repo(str(root)) as repo:
        # Edges point from a stage to the stages it depends on (dvc/repo/graph.py).
        graph = repo.index.graph
        if targets:
            chosen = set()
            for target in targets:
                # DVC reads a target's dvc.yaml relative to the current directory: anchor it at root.
                file, _, name = target.rpartition(":")
                try:
                    found = repo.stage.collect(f"{root / (file or 'dvc.yaml')}:{name}")
                except DvcException as err:
                    raise PipelineError(f"--target {target!r}: {err}") from None
                for stage in found:
                    chosen |= {stage} | nx.descendants(graph, stage)
            graph = graph.subgraph(chosen)
        # Stages without a command are data tracked by .dvc files: inputs, not work to schedule.
        address = {stage: stage_address(stage, root) for stage in graph}
        work = [s for s in graph if isinstance(s, PipelineStage)]
        order = nx.lexicographical_topological_sort(graph.reverse(copy=False), key=address.__getitem__)
        index = {s: i for i, s in enumerate(order)}
        nodes = []
        for stage in sorted(work, key=index.__getitem__):
            upstream = sorted(address[u] for u in graph.successors(stage) if isinstance(u, PipelineStage))
            outs = tuple(os.path.relpath(out.fs_path, root) for out in stage.outs)
            nodes.append(StageNode(address[stage], tuple(upstream), outs))
    return nodes


# ---------------------------------------------------------------------------------------------
# Params: the flow's overrides go into the params file, as `dvc exp run -S` does in a workspace


def params_path(repo_dir: str | os.PathLike) -> Path:
    # The file every stage reads (tasks/core/config.py); relative to the repo when not absolute.
    return Path(repo_dir) / PARAMS_FILE


def apply_param_overrides(repo_dir: str | os.PathLike, overrides: list[str], write: bool = True) -> None:
    """Validate the params file with `key=value` overrides applied; write it back if `write`.

    The overrides go into the workspace's params file itself (dvc.yaml's foreach reads it, and
    DVC then sees exactly which stages the change touches and records the values in dvc.lock),
    written atomically, comments and key order kept. Nothing is written unless the result
    passes the schema."""
    update_params_file(params_path(repo_dir), overrides, write=write)


def restore_params(path: Path, before: bytes, written: bytes) -> str:
    """Put the params file back as it was before a failed run's --set, atomically; returns the
    sentence saying so for the run's error. A file changed again during the run is left alone."""
    if not path.is_file() or path.read_bytes() != written:
        return f"{path.name} was edited during the run, so it was left as it is (with or without the --set values)."
    with atomic_path(path) as tmp:
        tmp.write_bytes(before)
    return (f"{path.name} was restored to what it was before --set (stages that ran with the --set values "
            f"are recorded so in dvc.lock and rerun next time).")


# ---------------------------------------------------------------------------------------------
# One stage, run through DVC


def _dvc_command(stage: str, force: bool) -> list[str]:
    # --wait-for-lock: DVC holds its repo lock while it checks and records a stage (not while the
    # command runs); a stage that finds the lock taken waits for it instead of failing.
    cmd = [sys.executable, "-m", "dvc", "--wait-for-lock", "repro", "--single-item", stage]
    return cmd + ["--force"] if force else cmd


def lock_entry(repo_dir: str, stage: str) -> object:
    """The stage's entry in its dvc.lock (None if it has none): what DVC recorded it ran with
    and made. A foreach item `name@key` is its own entry; `dir/dvc.yaml:name` reads dir/dvc.lock."""
    import yaml

    path, _, name = stage.rpartition(":")
    lock = Path(repo_dir) / (str(Path(path).with_suffix(".lock")) if path else "dvc.lock")
    try:
        data = yaml.safe_load(lock.read_text()) or {}
    except FileNotFoundError:
        return None
    return (data.get("stages") or {}).get(name)


def _stage_env() -> dict[str, str]:
    env = dict(os.environ)
    # Stage commands say `python -m tasks...`: give them this interpreter's environment even when
    # the worker was started without activating it.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def _output_lines(pipe):
    r"""Yield (line, is_redraw) from a byte stream. A progress bar redraws its line as '\r' + text
    and ends it only at the next redraw, so text after a '\r' is yielded as soon as it arrives."""
    pending, after_cr = b"", False
    while chunk := pipe.read1(65536):
        pending += chunk
        while (match := re.search(rb"\r\n|\r|\n", pending)) is not None:
            line, pending = pending[: match.start()], pending[match.end():]
            after_cr = match.group() == b"\r"
            yield line.decode(errors="replace").rstrip(), after_cr
        if after_cr and pending:
            yield pending.decode(errors="replace").rstrip(), True
            pending = b""
    if pending:
        yield pending.decode(errors="replace").rstrip(), False


def stage_failure(stage: str, returncode: int, tail: list[str]) -> PipelineError:
    """The error of a failed stage, led by the stage command's own last `error:` line when it
    printed one (DVC's "ERROR: failed to reproduce" and any traceback come after it). Its
    `retry` is False where the command exited with EXIT_NO_RETRY."""
    errors = [line for line in tail if line.startswith(STAGE_ERROR_PREFIX)]
    status = f"stage {stage}: `dvc repro` exited with status {returncode}; its last output:"
    statuses = [int(m.group(1)) for line in tail if (m := DVC_COMMAND_STATUS.search(line))]
    final = statuses[-1:] == [EXIT_NO_RETRY]
    if final:
        status = (f"stage {stage}: its command exited with {EXIT_NO_RETRY}: a rerun would fail the same way, "
                  f"so it is not retried. `dvc repro` exited with status {returncode}; its last output:")
    error = PipelineError("\n".join(errors[-1:] + [status] + tail))
    error.retry = not final
    return error


def worth_retrying(task, task_run, state) -> bool:
    """Prefect's retry condition (retry_condition_fn) of every stage task: not a stage whose
    failure would repeat (PipelineError.retry)."""
    return getattr(state.data, "retry", True)


def cuda_present() -> bool:
    forced = os.environ.get(ASSUME_CUDA_ENV)
    if forced is not None:
        if forced not in ("0", "1"):
            error = PipelineError(f"{ASSUME_CUDA_ENV}={forced!r}: 1 (CUDA present) or 0 (absent)")
            error.retry = False
            raise error
        return forced == "1"
    return _torch_sees_cuda()


@functools.cache
def _torch_sees_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def gpu_limit_name() -> str:
    # One limit per machine: GPU stages of flow runs on other machines use other GPUs.
    return GPU_LIMIT_PREFIX + socket.gethostname()


def ensure_gpu_limit(name: str, logger) -> None:
    """Create the global concurrency limit `name` with GPU_LIMIT_SLOTS slots unless it exists
    (as the user may have set it, it is then left as it is)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
            return
        except ObjectNotFound:
            pass
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=GPU_LIMIT_SLOTS))
        except ObjectAlreadyExists:  # another stage created it meanwhile
            return
    logger.info("created Prefect global concurrency limit %s (%d slot): one GPU stage at a time on this machine",
                name, GPU_LIMIT_SLOTS)


def stage_limit_name(run_name: str, run_id: str) -> str:
    # Unique per flow run (the id); the name is there for the reader of Prefect's UI. Prefect
    # refuses some characters in a limit's name.
    readable = re.sub(r"[/%&<>]", "-", run_name)
    return f"{STAGE_LIMIT_PREFIX}{readable}-{run_id or uuid.uuid4()}"


@contextlib.contextmanager
def stage_limit(name: str, slots: int, logger):
    """The global concurrency limit `name` with `slots` slots while the block runs; every stage
    command of the flow run holds one of them (run_dvc_stage). Deleted afterwards: it belongs to
    this run only."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        # Upsert: a retried flow run keeps its id, and so its limit's name.
        client.upsert_global_concurrency_limit_by_name(name, slots)
    logger.info("at most %d stage command(s) at once: Prefect global concurrency limit %s", slots, name)
    try:
        yield
    finally:
        with get_client(sync_client=True) as client:
            try:
                client.delete_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                pass


@contextlib.contextmanager
def held_slot(logger, stage: str, name: str, what: str, always_log: bool):
    """Hold one slot of the global concurrency limit `name` while the block runs, waiting for
    it as long as it takes."""
    from prefect.client.schemas.objects import ConcurrencyLeaseHolder
    from prefect.concurrency.sync import concurrency
    from prefect.runtime import task_run

    holder = ConcurrencyLeaseHolder(type="task_run", id=task_run.id) if task_run.id else None
    asked = time.monotonic()
    # strict: a missing limit is an error, not a stage let through. A lease renewal that fails
    # (the API briefly away) is logged, not fatal: it must not kill a stage hours in.
    with concurrency(name, occupy=1, strict=True, holder=holder, raise_on_lease_renewal_failure=False):
        waited = time.monotonic() - asked
        if always_log or waited >= 1:
            logger.info("%s: holds %s (concurrency limit %s%s)", stage, what, name,
                        f", after waiting {waited:.0f} s" if waited >= 1 else "")
        yield


@contextlib.contextmanager
def gpu_slot(logger, stage: str):
    """Hold a slot of this machine's GPU limit while the block runs, where CUDA is present."""
    if not cuda_present():
        yield
        return
    name = gpu_limit_name()
    ensure_gpu_limit(name, logger)
    with held_slot(logger, stage, name, "the GPU", always_log=True):
        yield


@task(cache_policy=NO_CACHE, retry_condition_fn=worth_retrying)  # DVC is the cache: Prefect never skips a stage
def run_dvc_stage(repo_dir: str, stage: str, limit_name: str, force: bool = False, gpu: bool = False) -> str:
    """`dvc repro --single-item STAGE` in repo_dir, its output streamed to the run's logs, once
    a slot of the run's global concurrency limit `limit_name` is free (and, for a `gpu` stage,
    the GPU: gpu_slot). Returns what DVC did: changed the stage's dvc.lock entry (ran it, or
    restored its outputs from the run-cache) or left it as it was (skipped it)."""
    logger = get_run_logger()
    # The GPU first: a stage waiting for it holds no stage slot, so CPU stages run meanwhile.
    with gpu_slot(logger, stage) if gpu else contextlib.nullcontext():
        with held_slot(logger, stage, limit_name, "a stage slot", always_log=False):
            return _run_dvc_stage(logger, repo_dir, stage, force)


def _run_dvc_stage(logger, repo_dir: str, stage: str, force: bool) -> str:
    cmd = _dvc_command(stage, force)
    logger.info("%s: $ %s", stage, " ".join(["dvc", *cmd[3:]]))
    before = lock_entry(repo_dir, stage)
    tail: list[str] = []
    last_redraw = 0.0
    # Own session, so that cancelling the task can stop DVC and the stage command it started.
    proc = subprocess.Popen(cmd, cwd=repo_dir, env=_stage_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        for line, is_redraw in _output_lines(proc.stdout):
            if not line:
                continue
            if is_redraw:
                if time.monotonic() - last_redraw >= PROGRESS_LOG_INTERVAL_S:
                    last_redraw = time.monotonic()
                    logger.info("%s: %s", stage, line)
                continue
            logger.info("%s: %s", stage, line)
            tail = (tail + [line])[-20:]
        returncode = proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
    if returncode != 0:
        raise stage_failure(stage, returncode, tail)
    after = lock_entry(repo_dir, stage)
    outcome = OUTCOME_RAN if after != before else OUTCOME_FORCED if force else OUTCOME_SKIPPED
    logger.info("%s: %s", stage, outcome)
    return outcome


# ---------------------------------------------------------------------------------------------
# The flow


def default_task_runner() -> ThreadPoolTaskRunner:
    # A thread for every stage submitted, not one per stage allowed to run. Prefect 3 does a
    # task's waiting in its worker thread: for its upstream stages (wait_for), then for a slot of
    # each tag's concurrency limit (`gpu`, `stage:<group>`). With a pool of 2, a `gpu` stage
    # queued behind another held one of the two threads, and Prefect warned at every such submit
    # that a task with as many tags as workers "may lead to dead-locks". How many stage commands
    # run at once is the flow's `max_parallel`: the slots of the run's stage limit (stage_limit).
    return ThreadPoolTaskRunner(max_workers=sys.maxsize)


def resolve_max_parallel(max_parallel: int | None) -> int:
    # Without max_parallel, Prefect's PREFECT_TASKS_RUNNER_THREAD_POOL_MAX_WORKERS sets how many
    # stages run at once (docs/orchestration.md documents both).
    value = max_parallel
    if value is None:
        value = get_current_settings().tasks.runner.thread_pool_max_workers or DEFAULT_MAX_PARALLEL
    if value < 1:
        raise PipelineError(f"max_parallel must be at least 1, not {value}")
    return value


def artifact_key(*parts: str) -> str:
    # Prefect artifact keys: lowercase letters, digits and dashes.
    return re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")


def record_markdown(recorded, outs: list[str]) -> str:
    """The run-record artifact: the experiment holding this run's outputs and how to audit them there."""
    if recorded is None:
        return "This run was not recorded (`record=False` / `--no-record`): its dvc.lock and outputs stay only in the workspace."
    if recorded.rev is None:
        return "This run was not recorded: " + "; ".join(recorded.notes)
    run = recorded.record
    where = (f"data pushed to DVC remote `{recorded.remote}`"
             + (f", experiment ref to git remote `{recorded.git_remote}`" if recorded.git_remote else "")
             if recorded.pushed else "not pushed")
    lines = [f"Recorded as DVC experiment `{run.name}` (commit `{run.commit[:12]}`): its dvc.lock, params and "
             f"metrics; {where}.", "", "Audit an output as it was in this run, after the workspace has moved on:",
             "", "```bash"]
    lines += [f"selfdistill lineage {out} --rev {run.name}" for out in outs] or [
        f"selfdistill lineage PATH --rev {run.name}"]
    lines += ["dvc exp show --only-changed      # every recorded run, its params and metrics",
              f"git show --stat {run.commit[:12]}", "```"]
    return "\n".join(lines)


def publish_artifacts(repo_dir: Path, stages: list[StageNode], finished: set[str], recorded=None) -> None:
    """Markdown outputs (the report), the lineage of every model the run touched and where the
    run is recorded, as keyed artifacts on the flow run; a key's latest version is the latest run's."""
    from flows.lineage import lineage, render_text

    logger = get_run_logger()
    rev = recorded.rev if recorded is not None else None
    models = []
    for node in stages:
        if node.name not in finished:
            continue
        for out in node.outs:
            path = repo_dir / out
            if out.endswith(".md") and path.is_file():
                create_markdown_artifact(path.read_text(), key=artifact_key(out),
                                         description=f"{out}, written by stage {node.name}")
            elif Path(out).parts[0] == MODELS_DIR and path.exists():
                models.append(out)
                audit = lineage(path, repo_dir)
                command = f"selfdistill lineage {out}" + (f" --rev {rev}" if rev else "")
                where = f"Recorded as DVC experiment `{rev}`: `{command}`\n\n" if rev else ""
                create_markdown_artifact(f"{where}```text\n{render_text(audit)}\n```", key=artifact_key("lineage", out),
                                         description=f"where {out} came from (`{command}`)")
                if audit["problems"]:
                    logger.warning("lineage of %s: %s", out, "; ".join(audit["problems"]))
    create_markdown_artifact(record_markdown(recorded, models), key="run-record",
                             description="where this run's dvc.lock, params and outputs are recorded"
                             + (f": DVC experiment {rev}" if rev else ""))


def stage_error_line(future) -> str | None:
    """A failed stage's own `error:` line: the first line of its PipelineError (stage_failure)."""
    err = future.result(raise_on_failure=False)
    line = str(err).split("\n", 1)[0] if isinstance(err, BaseException) else ""
    return line if line.startswith(STAGE_ERROR_PREFIX) else None


@dataclass
class StagesRun:
    stages: list[StageNode]
    outcomes: dict[str, str]  # the stages that completed: what DVC did
    error: PipelineError | None  # the stages that failed or did not run, if any


def run_stages(repo_dir: Path, targets, force: bool, retries: int, retry_delay_s: float,
               gpu_stages: tuple[str, ...], max_parallel: int, limit_name: str) -> StagesRun:
    logger = get_run_logger()
    stages = read_stage_graph(repo_dir, targets)
    logger.info("dvc.yaml in %s: %d stage(s): %s", repo_dir, len(stages), ", ".join(s.name for s in stages))

    futures = {}
    with stage_limit(limit_name, max_parallel, logger):
        for node in stages:
            gpu = node.group in gpu_stages
            tags = [f"stage:{node.group}"] + (["gpu"] if gpu else [])
            stage_task = run_dvc_stage.with_options(name=node.name, task_run_name=node.name, tags=tags,
                                                    retries=retries, retry_delay_seconds=retry_delay_s)
            futures[node.name] = stage_task.submit(str(repo_dir), node.name, limit_name, force, gpu,
                                                   wait_for=[futures[name] for name in node.upstream])
        for future in futures.values():
            future.wait()

    outcomes, failed, blocked = {}, [], []
    for node in stages:
        state = futures[node.name].state
        if state.is_completed():
            outcomes[node.name] = futures[node.name].result()
        elif state.is_pending():  # Prefect's "NotReady": an upstream stage did not complete
            blocked.append(node.name)
        else:
            failed.append(node.name)

    for name, outcome in outcomes.items():
        logger.info("%-24s %s", name, outcome)
    error = None
    if failed or blocked:
        message = f"stage(s) failed: {', '.join(failed) or '-'}"
        if blocked:
            message += f"; not run because an upstream stage failed: {', '.join(blocked)}"
        message += ". Upstream outputs stay valid in DVC's cache and dvc.lock."
        # The first failed stage's own reason leads: the user's fix starts there (the others'
        # are in their task logs).
        reasons = [line for name in failed if (line := stage_error_line(futures[name]))]
        error = PipelineError(f"{reasons[0]}; {message}" if reasons else message)
    return StagesRun(stages, outcomes, error)


@task(name="record", task_run_name="record", cache_policy=NO_CACHE)
def record_run_task(repo_dir: str, flow_run_id: str, flow_run_name: str, status: str, outcomes: dict[str, str]):
    """The run's record: a DVC experiment, pushed with its data (flows/records.py)."""
    from flows.records import record_run

    return record_run(repo_dir, flow_run_id, flow_run_name, status, outcomes, log=get_run_logger())


@flow(name=FLOW_NAME, task_runner=default_task_runner())
def selfdistill_pipeline(
    repo: str = ".",
    targets: list[str] | None = None,
    set_params: list[str] | None = None,
    force: bool = False,
    retries: int = 2,
    retry_delay_s: float = 30.0,
    gpu_stages: tuple[str, ...] = GPU_STAGES,
    max_parallel: int | None = None,
    record: bool = True,
) -> dict[str, str]:
    """Run the DVC pipeline in `repo` stage by stage, then record what it produced.

    targets: stages to bring up to date (with what they need); all stages when empty.
    set_params: `key=value` overrides written into params.yaml first (like `dvc exp run -S`);
        kept if the run succeeds, taken out again (params.yaml restored) if it fails.
    force: rerun the stages even when DVC finds them unchanged.
    retries / retry_delay_s: retries of a failed stage (transient failures: OOM kills, locks);
        a stage whose command exited with EXIT_NO_RETRY (bad params or data) is not retried.
    gpu_stages: stage groups that use the GPU: tagged `gpu`, and where CUDA is present run one
        at a time through the Prefect global concurrency limit `selfdistill-gpu:<hostname>`,
        created with one slot if it is missing.
    max_parallel: stage commands running at once (default: PREFECT_TASKS_RUNNER_THREAD_POOL_MAX_WORKERS,
        else 2): the slots of the Prefect global concurrency limit `selfdistill-stages:<flow run>`
        that the run creates, and deletes when its stages have finished.
    record: end by saving the workspace (dvc.lock, params, metrics) as a DVC experiment named
        after the flow run and pushing it with its data (flows/records.py).
    """
    from prefect.runtime import flow_run

    from flows.records import workspace_lock

    repo_dir = Path(repo).resolve()
    max_parallel = resolve_max_parallel(max_parallel)
    logger = get_run_logger()
    run_id, run_name = str(flow_run.id or ""), str(flow_run.name or "")
    # One run at a time per workspace, for the whole run: two runs would mix their params.yaml,
    # dvc.lock and records. A second run waits here, and logs whom it waits for.
    with workspace_lock(repo_dir, f"flow run {run_name} ({run_id})", log=logger):
        return _run_and_record(repo_dir, targets, set_params, force, retries, retry_delay_s, gpu_stages,
                               max_parallel, record, run_id, run_name)


def _run_and_record(repo_dir: Path, targets, set_params, force, retries, retry_delay_s, gpu_stages, max_parallel,
                    record: bool, run_id: str, run_name: str) -> dict[str, str]:
    logger = get_run_logger()
    path = params_path(repo_dir)
    before = path.read_bytes() if set_params else None
    # Params first: a typo fails here, before any stage starts and before anything is written.
    apply_param_overrides(repo_dir, set_params or [])
    written = path.read_bytes() if set_params else None

    def restored(err: BaseException) -> PipelineError:
        # A failed run takes its --set values out again: a user who reruns after fixing the cause
        # should not find the experiment's values left in params.yaml as if they were the config.
        return PipelineError(f"{err} {restore_params(path, before, written)}")

    try:
        done = run_stages(repo_dir, targets, force, retries, retry_delay_s, gpu_stages, max_parallel,
                          stage_limit_name(run_name, run_id))
    except PipelineError as err:
        if before is None:
            raise
        raise restored(err) from None
    except Exception as err:
        if before is None:
            raise
        raise restored(err) from err
    except BaseException:  # interrupted: restore, and let the interruption through as it is
        if before is not None:
            restore_params(path, before, written)
        raise

    # The record holds what the stages ran with (the --set values too, even if they are taken
    # out of params.yaml again below because a stage failed).
    recorded, record_error = None, None
    if record:
        status = "completed" if done.error is None else "failed"
        try:
            recorded = record_run_task(str(repo_dir), run_id, run_name, status, done.outcomes)
        except Exception as err:  # noqa: BLE001 - reported with the run's own outcome below
            from flows.records import RecordResult

            record_error = err
            recorded = RecordResult(notes=[f"recording failed: {err}"])
            logger.error("recording the run failed: %s", err)
    publish_artifacts(repo_dir, done.stages, set(done.outcomes), recorded)
    if done.error is not None:
        error = done.error if record_error is None else PipelineError(
            f"{done.error} Recording the run failed too: {record_error}")
        raise error if before is None else restored(error)
    if record_error is not None:
        raise PipelineError(f"the stages completed, but recording the run failed: {record_error}")
    return done.outcomes


# ---------------------------------------------------------------------------------------------
# `selfdistill flow ...`


def make_task_runner(kind: str, address: str | None):
    """threads (default), or Dask / Ray through the prefect-dask / prefect-ray extras. Dask and Ray
    workers run `dvc repro` in `--repo`, so that path must hold the same workspace on them."""
    if kind == "threads":
        return default_task_runner()
    try:
        if kind == "dask":
            from prefect_dask import DaskTaskRunner

            return DaskTaskRunner(address=address) if address else DaskTaskRunner()
        from prefect_ray import RayTaskRunner

        return RayTaskRunner(address=address) if address else RayTaskRunner()
    except ImportError:
        raise PipelineError(f"--task-runner {kind} needs prefect-{kind}: pip install 'selfdistill[{kind}]'") from None


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="selfdistill flow", description="Run dvc.yaml's stages as a Prefect flow.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the pipeline (ephemeral Prefect API unless PREFECT_API_URL is set)")
    plan = sub.add_parser("plan", help="list the tasks a run would make, upstream first")
    for p in (run, plan):
        p.add_argument("--repo", default=".", help="the DVC workspace (default: .)")
        p.add_argument("--target", action="append", dest="targets", metavar="STAGE",
                       help="run only this stage and what it needs (repeatable; `train` means every train@...)")
    run.add_argument("--set", action="append", dest="set_params", default=[], metavar="KEY=VALUE",
                     help="override a param in params.yaml before running, like `dvc exp run -S` (repeatable)")
    run.add_argument("--force", action="store_true", help="rerun stages even if DVC finds them unchanged")
    run.add_argument("--no-record", dest="record", action="store_false",
                     help="do not record the run (no DVC experiment, no push)")
    run.add_argument("--retries", type=int, help="retries of a failed stage (default: the flow's)")
    run.add_argument("--task-runner", choices=("threads", "dask", "ray"), default="threads")
    run.add_argument("--address", help="scheduler address of an existing Dask / Ray cluster")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from dvc.exceptions import DvcException

    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        if args.command == "plan":
            for node in read_stage_graph(args.repo, args.targets):
                print(f"{node.name:<24} after: {', '.join(node.upstream) or '-'}")
            return 0
        # Fail on bad params or targets before Prefect starts; the flow checks again for
        # deployments. (With --set, the targets are checked by the flow: an override may add arms.)
        apply_param_overrides(args.repo, args.set_params, write=False)
        if not args.set_params:
            read_stage_graph(args.repo, args.targets)
        pipeline = selfdistill_pipeline.with_options(task_runner=make_task_runner(args.task_runner, args.address))
    except (ParamsError, PipelineError, DvcException) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    options = {"retries": args.retries} if args.retries is not None else {}
    api = get_current_settings().api.url or "ephemeral (PREFECT_API_URL not set)"
    print(f"selfdistill flow: Prefect API {api}", file=sys.stderr)
    with temporary_settings(set_defaults={PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: EPHEMERAL_STARTUP_TIMEOUT_S}):
        state = pipeline(repo=args.repo, targets=args.targets, set_params=args.set_params, force=args.force,
                         record=args.record, return_state=True, **options)
    if not state.is_completed():
        print(failure_line(state), file=sys.stderr)
        return 1
    return 0


def failure_line(state) -> str:
    """The flow's own error, led by a failed stage's `error:` line, rather than Prefect's
    wrapping of it ("Flow run encountered an exception: PipelineError: ...")."""
    try:
        err = state.result(raise_on_failure=False)
    except Exception:  # no result to read (a crashed run): Prefect's message is all there is
        err = None
    text = str(err) if isinstance(err, BaseException) else f"flow run {state.name}: {state.message}"
    return text if text.startswith(STAGE_ERROR_PREFIX) else f"error: {text}"


if __name__ == "__main__":
    sys.exit(main())
