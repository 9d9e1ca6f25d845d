"""The Prefect flow built from DVC's graph, run for real (Prefect's ephemeral API in a temp
PREFECT_HOME, `dvc repro` in temp git + DVC repos whose stages are tiny python commands)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import yaml

from conftest import init_repo, write_params
from flows.lineage import lineage
from flows.pipeline import main, read_stage_graph, selfdistill_pipeline

REPO = Path(__file__).resolve().parents[1]

# Every stage command is this script: it appends its name to runs.log (not tracked by DVC, so it
# counts how often a command really ran) and writes its outputs. STEP_FAIL=N makes it fail its
# first N runs; STEP_SLEEP=S makes it take S seconds and log when it ran.
STEP = textwrap.dedent("""
    import json, os, pathlib, sys, time
    stage, outs = sys.argv[1], sys.argv[2:]
    with open("runs.log", "a") as log:
        log.write(stage + "\\n")
    runs = pathlib.Path("runs.log").read_text().split().count(stage)
    if runs <= int(os.environ.get("STEP_FAIL_" + stage.replace("@", "_"), "0")):
        sys.exit(f"{stage}: failing on purpose (run {runs})")
    start = time.time()
    time.sleep(float(os.environ.get("STEP_SLEEP", "0")))
    with open("times.log", "a") as log:
        log.write(json.dumps([stage, start, time.time()]) + "\\n")
    for out in outs:
        path = pathlib.Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(stage + " " + open("params.yaml").read())
""")

# params.yaml must pass the project's schema: the flow validates it before any stage runs.
PARAMS_OVERRIDES = {"filter": {"arms": ["none", "passes"]}, "train": {"epochs": 1}}

PIPELINE = {
    "prepare": {"cmd": "python step.py prepare data/train.jsonl", "deps": ["step.py"], "outs": ["data/train.jsonl"]},
    "train": {"foreach": "${filter.arms}", "do": {
        "cmd": "python step.py train@${item} models/${item}/weights.bin",
        "deps": ["data/train.jsonl"], "params": ["train.epochs"], "outs": ["models/${item}"]}},
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
    arms = yaml.safe_load((REPO / "params.yaml").read_text())["filter"]["arms"]
    plan = {node.name: set(node.upstream) for node in read_stage_graph(REPO)}
    assert set(plan) == {"prepare", "sample", "evaluate-base", "report"} | {
        f"{stage}@{arm}" for stage in ("filter", "train", "evaluate") for arm in arms}
    assert plan["prepare"] == set() and plan["sample"] == {"prepare"}
    for arm in arms:
        assert plan[f"filter@{arm}"] == {"prepare", "sample"}
        assert plan[f"train@{arm}"] == {"prepare", f"filter@{arm}"}
        assert plan[f"evaluate@{arm}"] == {"prepare", f"train@{arm}"}
    assert plan["report"] == {"sample", "evaluate-base"} | {f"{s}@{a}" for s in ("filter", "evaluate") for a in arms}
    order = [node.name for node in read_stage_graph(REPO, ["train"])]
    assert set(order) == {"prepare", "sample"} | {f"{s}@{a}" for s in ("filter", "train") for a in arms}
    assert order.index("sample") < min(order.index(f"filter@{a}") for a in arms)


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
    assert state.result() == {name: "ran" for name in plan}
    assert sorted(runs(root)) == sorted(plan)
    task_runs, artifacts = flow_run_records(state)
    assert {name: state for name, (state, _) in task_runs.items()} == {name: "Completed" for name in plan}
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
    assert set(state.result().values()) == {"unchanged: skipped (outputs match dvc.lock)"}

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
    assert state.result() == {"prepare": "ran"} and runs(root).count("prepare") == 2

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
        "prepare": "Completed", "flaky": "Completed", "broken": "Failed", "after": "NotReady"}
    assert not (root / "after.txt").exists()
    # Upstream outputs stay valid: recorded in dvc.lock and matching it.
    locked = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert set(locked) == {"prepare", "flaky"}
    assert lineage(root / "flaky.txt", root)["problems"] == []

    # Fixed, the next run runs only what did not complete.
    monkeypatch.delenv("STEP_FAIL_broken")
    state = selfdistill_pipeline(repo=str(root), retries=0, return_state=True)
    assert state.is_completed() and state.result()["prepare"].startswith("unchanged")
    assert sorted(runs(root)) == ["after", "broken", "broken", "broken", "flaky", "flaky", "prepare"]


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
