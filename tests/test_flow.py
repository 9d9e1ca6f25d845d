"""The Prefect flow built from DVC's graph, run for real (Prefect's ephemeral API in a temp
PREFECT_HOME, `dvc repro` in temp git + DVC repos whose stages are tiny python commands)."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import yaml

from conftest import filter_named_arms, init_repo, write_params
from flows.lineage import lineage
from flows.pipeline import (OUTCOME_FORCED, OUTCOME_RAN, OUTCOME_SKIPPED, gpu_limit_name, main, read_stage_graph,
                            selfdistill_pipeline)
from flows.records import recorded_runs

REPO = Path(__file__).resolve().parents[1]

# Every stage command is this script: it appends its name to runs.log (not tracked by DVC, so it
# counts how often a command really ran) and writes its outputs. STEP_FAIL=N makes it fail its
# first N runs, saying why on an `error:` line as the project's stage commands do, with exit status
# STEP_EXIT (default 1); STEP_SLEEP=S (STEP_SLEEP_<stage> for one stage)
# makes it take S seconds and log when it ran. A `summary.json` out gets a report's pass@1 per model
# (`none`'s is train.epochs / 10, so it changes with that param).
STEP = textwrap.dedent("""
    import json, os, pathlib, sys, time
    stage, outs = sys.argv[1], sys.argv[2:]
    with open("runs.log", "a") as log:
        log.write(stage + "\\n")
    runs = pathlib.Path("runs.log").read_text().split().count(stage)
    if runs <= int(os.environ.get("STEP_FAIL_" + stage.replace("@", "_"), "0")):
        print(f"error: {stage} failing on purpose (run {runs})", file=sys.stderr)
        sys.exit(int(os.environ.get("STEP_EXIT_" + stage.replace("@", "_"), "1")))
    start = time.time()
    time.sleep(float(os.environ.get("STEP_SLEEP_" + stage.replace("@", "_"), os.environ.get("STEP_SLEEP", "0"))))
    with open("times.log", "a") as log:
        log.write(json.dumps([stage, start, time.time()]) + "\\n")
    for out in outs:
        path = pathlib.Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.name == "summary.json":
            import yaml
            epochs = yaml.safe_load(open("params.yaml"))["train"]["epochs"]
            path.write_text(json.dumps({"models": {"base": {"pass@1": 0.25}, "none": {"pass@1": epochs / 10}}}))
        else:
            path.write_text(stage + " " + open("params.yaml").read())
""")

# params.yaml must pass the project's schema: the flow validates it before any stage runs.
PARAMS_OVERRIDES = {**filter_named_arms(), "train": {"epochs": 1}}

PIPELINE = {
    "prepare": {"cmd": "python step.py prepare data/train.jsonl", "deps": ["step.py"], "outs": ["data/train.jsonl"]},
    "train": {"foreach": "${arms}", "do": {
        "cmd": "python step.py train@${key} models/${key}/weights.bin",
        "deps": ["data/train.jsonl"], "params": ["train.epochs"], "outs": ["models/${key}"]}},
    "report": {"cmd": "python step.py report report/summary.md", "deps": ["models"],
               "outs": [{"report/summary.md": {"cache": False}}]},
}


def make_repo(root: Path, stages: dict) -> Path:
    root.mkdir(parents=True)
    (root / "step.py").write_text(STEP)
    write_params(root, overrides=PARAMS_OVERRIDES)
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    (root / ".gitignore").write_text("runs.log\ntimes.log\n")
    return init_repo(root)


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout.strip()


def runs(root: Path) -> list[str]:
    log = root / "runs.log"
    return log.read_text().split() if log.exists() else []


@pytest.fixture(scope="module", autouse=True)
def prefect_home(tmp_path_factory):
    """Prefect's ephemeral API, with its database in a temp dir; started once for this module."""
    from prefect.settings import (PREFECT_API_URL, PREFECT_HOME, PREFECT_SERVER_ANALYTICS_ENABLED,
                                  PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings)

    # A first start on a fresh PREFECT_HOME on a busy 2-core machine can take over a minute.
    with temporary_settings(updates={PREFECT_HOME: str(tmp_path_factory.mktemp("prefect")),
                                     PREFECT_SERVER_ANALYTICS_ENABLED: False,
                                     PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 180},
                            restore_defaults={PREFECT_API_URL}):
        yield
        # Stop the ephemeral API now, while pytest's output streams are still open: at interpreter
        # exit Prefect would log its shutdown into a closed stream.
        from prefect.logging.handlers import APILogWorker
        from prefect.server.api.server import SubprocessASGIServer

        APILogWorker.drain_all(timeout=5)
        SubprocessASGIServer().stop()


def flow_run_records(state):
    """The task runs and artifacts the Prefect API holds for a finished flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter,
                                                FlowRunFilterId)

    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {t.name: (t.state.name, set(t.tags)) for t in tasks}, {a.key: a for a in artifacts}


def test_plan_of_the_projects_own_dvc_yaml():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    arms, configs = params["arms"], params["sample"]["configs"]
    sample_stages = {f"sample@{c}" for c in configs}
    plan = {node.name: set(node.upstream) for node in read_stage_graph(REPO)}
    assert set(plan) == {"codeio", "model", "prepare", "evaluate@base", "diagnose-base", "report"} | sample_stages | {
        f"{stage}@{arm}" for stage in ("filter", "train", "evaluate", "publish", "diagnose") for arm in arms}
    # The base model and the problem sets come from stages of their own: data.* never rewrites it.
    assert plan["codeio"] == set() and plan["model"] == set() and plan["prepare"] == {"codeio"}
    assert all(plan[s] == {"model", "prepare"} for s in sample_stages)
    for arm, spec in arms.items():
        assert plan[f"filter@{arm}"] == {"prepare", f"sample@{spec['sample']}"}
        assert plan[f"train@{arm}"] == {"model", f"filter@{arm}"}
        assert plan[f"evaluate@{arm}"] == {"prepare", f"train@{arm}"}
        assert plan[f"publish@{arm}"] == {"model", f"train@{arm}", f"evaluate@{arm}"}
    # prepare: data/source.json's decontamination counts.
    assert plan["report"] == {"prepare", "evaluate@base", "diagnose-base"} | sample_stages | {
        f"{s}@{a}" for s in ("filter", "train", "evaluate", "diagnose") for a in arms}
    for arm in arms:
        assert plan[f"diagnose@{arm}"] == {"prepare", f"train@{arm}", "diagnose-base"}
    order = [node.name for node in read_stage_graph(REPO, ["train"])]
    assert set(order) == {"codeio", "model", "prepare"} | sample_stages | {f"{s}@{a}" for s in ("filter", "train") for a in arms}
    assert order.index("sample@ssd") < min(order.index(f"filter@{a}") for a in arms if arms[a]["sample"] == "ssd")


@pytest.mark.slow  # Prefect's API and several `dvc repro` runs
def test_flow_runs_dvc_yaml_then_skips_what_did_not_change(tmp_path, capsys):
    # A stage added to dvc.yaml (not known to flows/) becomes a task of the flow.
    stages = dict(PIPELINE, lint={"cmd": "python step.py lint lint.txt", "deps": ["data/train.jsonl"],
                                  "outs": ["lint.txt"]})
    root = make_repo(tmp_path / "ws", stages)
    plan = {node.name: node.upstream for node in read_stage_graph(root)}
    assert plan == {"prepare": (), "lint": ("prepare",), "train@none": ("prepare",), "train@passes": ("prepare",),
                    "report": ("train@none", "train@passes")}

    state = selfdistill_pipeline(repo=str(root), retries=0, return_state=True)
    assert state.is_completed(), state.message
    assert state.result() == {name: OUTCOME_RAN for name in plan}
    assert sorted(runs(root)) == sorted(plan)
    task_runs, artifacts = flow_run_records(state)
    assert {name: state for name, (state, _) in task_runs.items()} == {name: "Completed" for name in [*plan, "record"]}
    assert task_runs["train@none"][1] == {"stage:train", "gpu"} and task_runs["lint"][1] == {"stage:lint"}
    assert (root / "report/summary.md").read_text() in artifacts["report-summary-md"].data
    model_lineage = artifacts["lineage-models-none"].data
    assert "<- stage train@none" in model_lineage and "data/train.jsonl" in model_lineage
    assert "train.epochs = 1" in model_lineage and "<- stage prepare" in model_lineage
    locked = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert set(locked) == set(plan)

    # Nothing changed: the second run runs no stage command and says so.
    state = selfdistill_pipeline(repo=str(root), retries=0, return_state=True)
    assert state.is_completed() and sorted(runs(root)) == sorted(plan)
    assert set(state.result().values()) == {OUTCOME_SKIPPED}

    # An override through the CLI: one target, params.yaml edited in place (comments kept), and
    # only the target reruns, not the other arm nor the report.
    assert main(["run", "--repo", str(root), "--target", "train@none", "--set", "train.epochs=3"]) == 0
    assert runs(root).count("train@none") == 2 and len(runs(root)) == len(plan) + 1
    text = (root / "params.yaml").read_text()
    assert "# T_eval, tuned separately from T_train" in text and yaml.safe_load(text)["train"]["epochs"] == 3
    assert yaml.safe_load((root / "dvc.lock").read_text())["stages"]["train@none"]["params"]["params.yaml"] == {
        "train.epochs": 3}

    # --force reruns a stage DVC finds unchanged.
    state = selfdistill_pipeline(repo=str(root), targets=["prepare"], force=True, retries=0, return_state=True)
    assert state.result()["prepare"] in (OUTCOME_RAN, OUTCOME_FORCED) and runs(root).count("prepare") == 2

    # A bad override or target fails before any work, naming the key; nothing is written.
    assert main(["run", "--repo", str(root), "--set", "train.epochs=-1"]) == 2
    assert main(["run", "--repo", str(root), "--target", "nope"]) == 2
    err = capsys.readouterr().err
    assert "train.epochs: Input should be greater than 0" in err and "'nope' not found" in err
    assert (root / "params.yaml").read_text() == text and len(runs(root)) == len(plan) + 2


@pytest.mark.slow  # Prefect's API and several `dvc repro` runs
def test_failing_stage_is_retried_then_stops_downstream(tmp_path, monkeypatch):
    stages = {
        "prepare": PIPELINE["prepare"],
        # fails once, then works: a transient failure the retry absorbs
        "flaky": {"cmd": "python step.py flaky flaky.txt", "deps": ["data/train.jsonl"], "outs": ["flaky.txt"]},
        "broken": {"cmd": "python step.py broken broken.txt", "deps": ["data/train.jsonl"], "outs": ["broken.txt"]},
        "after": {"cmd": "python step.py after after.txt", "deps": ["broken.txt", "flaky.txt"], "outs": ["after.txt"]},
    }
    root = make_repo(tmp_path / "ws", stages)
    monkeypatch.setenv("STEP_FAIL_flaky", "1")
    monkeypatch.setenv("STEP_FAIL_broken", "99")

    state = selfdistill_pipeline(repo=str(root), retries=1, retry_delay_s=0, return_state=True)
    assert state.is_failed()
    assert "failed: broken" in state.message and "upstream stage failed: after" in state.message
    assert sorted(runs(root)) == ["broken", "broken", "flaky", "flaky", "prepare"]
    task_runs, _ = flow_run_records(state)
    assert {name: state for name, (state, _) in task_runs.items()} == {
        "prepare": "Completed", "flaky": "Completed", "broken": "Failed", "after": "NotReady", "record": "Completed"}
    assert not (root / "after.txt").exists()
    # Upstream outputs stay valid: recorded in dvc.lock and matching it.
    locked = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert set(locked) == {"prepare", "flaky"}
    assert lineage(root / "flaky.txt", root)["problems"] == []
    # The failed run is recorded too, as failed: its dvc.lock holds the stages that completed.
    (failed_run,) = recorded_runs(root)
    assert failed_run.status == "failed" and "flaky" in git(root, "show", f"{failed_run.commit}:dvc.lock")

    # Fixed, the next run runs only what did not complete.
    monkeypatch.delenv("STEP_FAIL_broken")
    state = selfdistill_pipeline(repo=str(root), retries=0, return_state=True)
    assert state.is_completed() and state.result()["prepare"].startswith("unchanged")
    assert sorted(runs(root)) == ["after", "broken", "broken", "broken", "flaky", "flaky", "prepare"]


@pytest.mark.slow  # Prefect's API and several `dvc repro` runs
def test_failed_run_restores_params_and_leads_with_the_stages_error(tmp_path, monkeypatch, capsys, caplog):
    root = make_repo(tmp_path / "ws", PIPELINE)
    before = (root / "params.yaml").read_bytes()
    monkeypatch.setenv("STEP_FAIL_train_none", "99")

    assert main(["run", "--repo", str(root), "--set", "train.epochs=3", "--retries", "0"]) == 1
    # The stage's own reason comes first, not DVC's "ERROR: failed to reproduce" or a traceback:
    # in the task's failure, the flow's, and the line `main` ends with.
    assert 'exception: PipelineError("error: train@none failing on purpose (run 1)\\nstage train@none: ' \
        in caplog.text
    assert "exception: PipelineError: error: train@none failing on purpose (run 1); stage(s) failed" in caplog.text
    final = capsys.readouterr().err.rstrip().splitlines()[-1]
    assert final.startswith("error: train@none failing on purpose (run 1); stage(s) failed: train@none; "
                            "not run because an upstream stage failed: report."), final
    # The failed run's --set is taken out again, byte for byte, and the error says so.
    assert "params.yaml was restored to what it was before --set" in final
    assert (root / "params.yaml").read_bytes() == before
    assert sorted(runs(root)) == ["prepare", "train@none", "train@passes"]


@pytest.mark.slow  # Prefect's API and several `dvc repro` runs
def test_tagged_stages_do_not_hold_the_thread_pool(tmp_path, monkeypatch, caplog):
    """Each stage task has two tags (`stage:train`, `gpu`) and waits for its upstream stages.
    With a 2-thread pool, Prefect warned at each submit: "Task train@none has 2 tags but only 2
    workers availableThis may lead to dead-locks"."""
    root = make_repo(tmp_path / "ws", PIPELINE)
    monkeypatch.setenv("STEP_SLEEP", "1")
    with caplog.at_level(logging.WARNING):
        state = selfdistill_pipeline(repo=str(root), retries=0, max_parallel=1, return_state=True)
    assert state.is_completed(), state.message
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [w for w in warnings if "workers available" in w or "dead-lock" in w.lower()], warnings
    task_runs, _ = flow_run_records(state)
    assert task_runs["train@none"][1] == {"stage:train", "gpu"} and task_runs["prepare"][1] == {"stage:prepare"}
    # max_parallel bounds the stage commands instead of the pool: one at a time here.
    spans = sorted(tuple(span) for _, *span in map(json.loads, (root / "times.log").read_text().splitlines()))
    assert len(spans) == 4 and all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))


@pytest.mark.slow  # Prefect's API and several `dvc repro` runs
@pytest.mark.parametrize("slots", [1, 2])
def test_max_parallel_is_a_prefect_limit_the_run_creates(tmp_path, monkeypatch, slots):
    """Three independent stages, all ready at once: `slots` of them run at a time, bounded by a
    Prefect global concurrency limit that the run creates with `slots` slots (Prefect's API, and
    so its UI, shows it with its slots in use while the run lasts) and deletes at its end."""
    import contextvars

    from prefect.client.orchestration import get_client

    from flows.pipeline import STAGE_LIMIT_PREFIX

    stages = {name: {"cmd": f"python step.py {name} {name}.txt", "deps": ["step.py"], "outs": [f"{name}.txt"]}
              for name in ("a", "b", "c")}
    root = make_repo(tmp_path / "ws", stages)
    monkeypatch.setenv("STEP_SLEEP", "3")
    seen, errors, done = {}, [], threading.Event()

    def watch():  # the run's limits as Prefect's API shows them: (slots, most slots seen in use)
        try:
            with get_client(sync_client=True) as client:
                while not done.is_set():
                    for limit in client.read_global_concurrency_limits(limit=200):
                        if limit.name.startswith(STAGE_LIMIT_PREFIX):
                            most = max(limit.active_slots, seen.get(limit.name, (0, 0))[1])
                            seen[limit.name] = (limit.limit, most)
                    time.sleep(0.2)
        except Exception as err:  # noqa: BLE001 - reported by the test's own thread
            errors.append(err)

    with get_client(sync_client=True) as client:  # the API is up before the watcher asks it
        client.read_global_concurrency_limits(limit=1)
    # The thread reads the same Prefect API as this test: Prefect's settings live in contextvars.
    watcher = threading.Thread(target=contextvars.copy_context().run, args=(watch,))
    watcher.start()
    try:
        state = selfdistill_pipeline(repo=str(root), retries=0, max_parallel=slots, record=False, return_state=True)
    finally:
        done.set()
        watcher.join()
    assert not errors and state.is_completed(), (errors, state.message)
    spans = [(start, end) for _, start, end in map(json.loads, (root / "times.log").read_text().splitlines())]
    assert len(spans) == 3
    at_once = max(sum(s <= start < e for s, e in spans) for start, _ in spans)
    assert at_once == slots, spans
    flow_run_id = str(state.state_details.flow_run_id)
    ours = {name: value for name, value in seen.items() if name.endswith(flow_run_id)}
    assert list(ours.values()) == [(slots, slots)], seen
    with get_client(sync_client=True) as client:
        assert not [limit.name for limit in client.read_global_concurrency_limits(limit=200)
                    if limit.name in ours]


@pytest.mark.slow  # Prefect's API and several `dvc repro` runs
def test_gpu_stages_take_turns_where_cuda_is_present(tmp_path, monkeypatch):
    """Every stage below is ready once `prepare` is done. With CUDA (simulated), the flow creates
    this machine's GPU limit itself and the GPU stages run one at a time; the others still run
    beside them."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    stages = {"prepare": PIPELINE["prepare"], "train": PIPELINE["train"]}  # train@none, train@passes
    for name in ("diagnose-base", "publish", "lint"):
        stages[name] = {"cmd": f"python step.py {name} {name}.txt", "deps": ["data/train.jsonl"], "outs": [f"{name}.txt"]}
    stages["evaluate"] = {"foreach": ["base"], "do": {  # evaluate@base, as dvc.yaml names it
        "cmd": "python step.py evaluate@${item} evaluate-${item}.txt", "deps": ["data/train.jsonl"],
        "outs": ["evaluate-${item}.txt"]}}
    root = make_repo(tmp_path / "ws", stages)
    monkeypatch.setenv("SELFDISTILL_ASSUME_CUDA", "1")
    monkeypatch.setenv("STEP_SLEEP", "2")
    # The CPU stages outlast the first GPU stage's wait for its slot (Prefect polls, ~2 s), so
    # that they overlap a GPU stage however the host schedules the tasks (CI once saw both
    # finish before the first GPU stage started).
    for name in ("publish", "lint"):
        monkeypatch.setenv(f"STEP_SLEEP_{name}", "8")
    with get_client(sync_client=True) as client:
        try:  # an earlier test of this module's Prefect API may have run on a real GPU
            client.delete_global_concurrency_limit_by_name(gpu_limit_name())
        except ObjectNotFound:
            pass
        with pytest.raises(ObjectNotFound):
            client.read_global_concurrency_limit_by_name(gpu_limit_name())

    state = selfdistill_pipeline(repo=str(root), retries=0, max_parallel=6, record=False, return_state=True)
    assert state.is_completed(), state.message
    spans = {stage: (start, end) for stage, start, end in map(json.loads, (root / "times.log").read_text().splitlines())}
    gpu = sorted(spans[name] for name in ("train@none", "train@passes", "evaluate@base", "diagnose-base"))
    assert all(end <= start for (_, end), (start, _) in zip(gpu, gpu[1:])), gpu
    overlap = [(cpu, gpu_span) for cpu in ("publish", "lint") for gpu_span in gpu
               if spans[cpu][0] < gpu_span[1] and gpu_span[0] < spans[cpu][1]]
    assert overlap, spans
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(gpu_limit_name()).limit == 1
    task_runs, _ = flow_run_records(state)
    assert "gpu" in task_runs["diagnose-base"][1] and "gpu" not in task_runs["publish"][1]


@pytest.mark.slow  # Prefect's API and several `dvc repro` runs
def test_a_failure_a_rerun_would_repeat_is_not_retried(tmp_path, monkeypatch, caplog):
    from tasks.core.config import EXIT_NO_RETRY

    stages = {"prepare": PIPELINE["prepare"]}
    for name in ("flaky", "hopeless"):
        stages[name] = {"cmd": f"python step.py {name} {name}.txt", "deps": ["data/train.jsonl"], "outs": [f"{name}.txt"]}
    root = make_repo(tmp_path / "ws", stages)
    monkeypatch.setenv("STEP_FAIL_flaky", "1")  # exit 1 once: may be transient, retried
    monkeypatch.setenv("STEP_FAIL_hopeless", "99")  # as a stage with bad params or data exits
    monkeypatch.setenv("STEP_EXIT_hopeless", str(EXIT_NO_RETRY))

    state = selfdistill_pipeline(repo=str(root), retries=2, retry_delay_s=0, record=False, return_state=True)
    assert state.is_failed()
    assert "error: hopeless failing on purpose (run 1); stage(s) failed: hopeless." in state.message
    assert sorted(runs(root)) == ["flaky", "flaky", "hopeless", "prepare"]
    task_runs, _ = flow_run_records(state)
    assert {name: state for name, (state, _) in task_runs.items()} == {
        "prepare": "Completed", "flaky": "Completed", "hopeless": "Failed"}
    assert f"stage hopeless: its command exited with {EXIT_NO_RETRY}: a rerun would fail the same way, " \
        "so it is not retried" in caplog.text


# PIPELINE with the report's metrics file, as the project's report stage declares it.
RECORDED_PIPELINE = dict(PIPELINE, report={
    "cmd": "python step.py report report/summary.md report/summary.json", "deps": ["models"],
    "params": ["train.epochs"], "outs": [{"report/summary.md": {"cache": False}}],
    "metrics": [{"report/summary.json": {"cache": False}}]})


def checkout_state(root: Path) -> dict:
    """What recording must leave alone: the checked-out branch and commit, the index, the working tree."""
    return {"head": git(root, "symbolic-ref", "HEAD"), "commit": git(root, "rev-parse", "HEAD"),
            "index": git(root, "ls-files", "--stage"), "staged": git(root, "diff", "--cached", "--name-only"),
            "status": git(root, "status", "--porcelain")}


@pytest.mark.slow  # Prefect's API and several `dvc repro` runs
def test_every_recorded_run_is_a_dvc_experiment_and_unrecorded_runs_add_none(tmp_path, capsys):
    from flows import runs as runs_command

    root = make_repo(tmp_path / "ws", RECORDED_PIPELINE)
    checkout = checkout_state(root)
    del checkout["status"]  # the run's own outputs change it; test_runs.py checks it around a record
    state = selfdistill_pipeline(repo=str(root), retries=0, return_state=True)
    assert state.is_completed(), state.message
    assert {k: v for k, v in checkout_state(root).items() if k != "status"} == checkout

    # A DVC experiment named after the flow run, on top of HEAD, holding what the run produced;
    # the user's branch, commit and index as they were.
    (first,) = recorded_runs(root)
    flow_run = state.state_details.flow_run_id
    task_runs, artifacts = flow_run_records(state)
    assert first.flow_run_id == str(flow_run) and first.status == "completed"
    assert first.name == first.flow_run_name and git(root, "rev-parse", f"{first.commit}^") == checkout["commit"]
    message = git(root, "log", "-1", "--format=%B", first.commit)
    assert f"Prefect flow run {first.flow_run_name} ({flow_run}), completed" in message
    assert "Params: as in HEAD" in message and "  train@none: ran" in message
    recorded = set(git(root, "diff-tree", "-r", "--name-only", checkout["commit"], first.commit).splitlines())
    assert {"dvc.lock", "data/.gitignore", "models/.gitignore", "report/summary.md", "report/summary.json"} <= recorded
    for name in recorded & {"dvc.lock", "report/summary.json", "params.yaml"}:
        assert git(root, "show", f"{first.commit}:{name}") == (root / name).read_text().strip(), name
    # The outputs are on the DVC remote made next to the workspace (none was configured).
    remote = tmp_path / "ws-dvc-remote"
    assert str(remote) in (root / ".dvc/config.local").read_text()
    locked = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    md5 = locked["prepare"]["outs"][0]["md5"]
    assert (remote / "files/md5" / md5[:2] / md5[2:]).is_file()
    # The flow run's artifacts name the experiment and the command that audits an output there.
    assert task_runs["record"][0] == "Completed"
    record_text = artifacts["run-record"].data
    assert f"DVC experiment `{first.name}`" in record_text
    assert f"selfdistill lineage models/none --rev {first.name}" in record_text
    assert f"selfdistill lineage models/none --rev {first.name}" in artifacts["lineage-models-none"].data

    # --no-record: the stages run, nothing is recorded or pushed.
    assert main(["run", "--repo", str(root), "--no-record", "--set", "train.epochs=3"]) == 0
    assert runs(root).count("train@none") == 2 and [r.name for r in recorded_runs(root)] == [first.name]
    assert checkout_state(root)["commit"] == checkout["commit"]
    # The next run records itself, nothing to rerun, naming the param that differs from HEAD.
    assert main(["run", "--repo", str(root)]) == 0
    assert runs(root).count("train@none") == 2
    first_again, second = recorded_runs(root)
    assert first_again.name == first.name and second.name != first.name
    assert "  train.epochs: 1 -> 3" in git(root, "log", "-1", "--format=%B", second.commit)
    assert yaml.safe_load(git(root, "show", f"{second.commit}:params.yaml"))["train"]["epochs"] == 3
    assert yaml.safe_load(git(root, "show", f"{first.commit}:params.yaml"))["train"]["epochs"] == 1

    # `selfdistill runs`: newest first, pass@1 per model from each run's report.
    capsys.readouterr()
    assert runs_command.main(["--repo", str(root)]) == 0
    newest, oldest = capsys.readouterr().out.split("\n\n")
    assert newest.startswith(second.name) and oldest.startswith(first.name)
    assert f"flow run {second.flow_run_name} ({second.flow_run_id})   completed" in newest
    assert "pass@1:  base 0.250, none 0.300" in newest and "pass@1:  base 0.250, none 0.100" in oldest
    assert f"selfdistill lineage PATH --rev {first.name}" in oldest


@pytest.mark.slow  # Prefect's API and several `dvc repro` runs
def test_independent_stages_wait_for_dvc_lock_then_overlap(tmp_path, monkeypatch):
    from dvc.repo import Repo

    stages = {name: {"cmd": f"python step.py {name} {name}.txt", "deps": ["step.py"], "outs": [f"{name}.txt"]}
              for name in ("left", "right")}
    root = make_repo(tmp_path / "ws", stages)
    monkeypatch.setenv("STEP_SLEEP", "3")
    # Someone else holds DVC's repo lock for longer than DVC would wait by itself (~3 s).
    with Repo(str(root)) as repo:
        repo.lock.lock()
        released = {}

        def release():
            released["at"] = time.time()
            repo.lock.unlock()

        timer = threading.Timer(8, release)
        timer.start()
        try:
            state = selfdistill_pipeline(repo=str(root), retries=0, return_state=True)
        finally:
            timer.join()
    assert state.is_completed(), state.message
    times = {stage: (start, end) for stage, start, end in map(json.loads, (root / "times.log").read_text().splitlines())}
    assert min(start for start, _ in times.values()) > released["at"]
    # DVC releases its lock while a stage's command runs, so independent stages overlap.
    (l_start, l_end), (r_start, r_end) = times["left"], times["right"]
    assert l_start < r_end and r_start < l_end


@pytest.mark.parametrize("kind", ["dask", "ray"])
def test_task_runner_extra_missing_is_named(kind, capsys):
    import importlib.util

    if importlib.util.find_spec(f"prefect_{kind}"):
        pytest.skip(f"prefect-{kind} is installed")
    assert main(["run", "--repo", str(REPO), "--task-runner", kind]) == 2
    assert f"pip install 'selfdistill[{kind}]'" in capsys.readouterr().err


def test_stage_output_lines_show_progress_bars_as_they_redraw():
    from flows.pipeline import _output_lines

    script = ("import sys, time\n"
              "print('loading', flush=True)\n"
              "sys.stderr.write('\\r  0%|'); sys.stderr.flush(); time.sleep(2)\n"
              "sys.stderr.write('\\r100%|\\n'); print('done')\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen = [(line, is_redraw, time.monotonic()) for line, is_redraw in _output_lines(proc.stdout) if line]
    proc.wait()
    assert [(line, is_redraw) for line, is_redraw, _ in seen] == [
        ("loading", False), ("  0%|", True), ("100%|", False), ("done", False)]
    # The redraw arrives as it is drawn, not two seconds later with the next one.
    assert seen[1][2] - seen[0][2] < 1.0
