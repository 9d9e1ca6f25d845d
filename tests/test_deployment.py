"""prefect.yaml's process deployment against a real `prefect server start` (SQLite in a temp
PREFECT_HOME on 127.0.0.1): deploy, trigger a run, a worker runs it to completion on a temp
DVC repo and records it (a DVC experiment named after the flow run, pushed with its data); a
second run with a param changed; the first run's model audited by its experiment after the
workspace and its cache moved on; then `selfdistill flow run` with PREFECT_API_URL records its
run on the same server. And two runs at once in one workspace take turns."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import init_repo, stop_process_group, write_params
from flows.pipeline import FLOW_NAME
from flows.records import recorded_runs

pytestmark = pytest.mark.slow

PROJECT = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).parent / "prefect")
SERVER_START_TIMEOUT_S = 300  # a first start on a fresh PREFECT_HOME migrates a new database


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def prefect_server(tmp_path):
    """A real Prefect server; yields the environment that points clients, deploys and workers at it."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_UI_ENABLED="false", PREFECT_API_URL=api)
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            assert server.poll() is None, f"prefect server exited:\n{log_path.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{api}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"prefect server not up in {SERVER_START_TIMEOUT_S}s:\n" + \
                log_path.read_text()[-3000:]
            time.sleep(1)
        yield env
    finally:
        stop_process_group(server, timeout=30)


def run(cmd: list[str], env: dict, cwd: Path, timeout: float = 300) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


# The train stage: its model depends on train.epochs; it logs when it ran (times.log, not tracked)
# and takes SELFDISTILL_TEST_SLEEP seconds.
TRAIN = textwrap.dedent("""
    import json, os, time, yaml
    start = time.time()
    time.sleep(float(os.environ.get("SELFDISTILL_TEST_SLEEP", "0")))
    epochs = yaml.safe_load(open("params.yaml"))["train"]["epochs"]
    open("model.txt", "w").write(open("data.txt").read() + f" trained {epochs} epochs")
    with open("times.log", "a") as log:
        log.write(json.dumps([epochs, start, time.time()]) + "\\n")
""")


def make_repo(root: Path) -> Path:
    write_params(root, overrides={"train": {"epochs": 1}})  # must pass the project's schema
    (root / "train.py").write_text(TRAIN)
    (root / ".gitignore").write_text("times.log\n")
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "prepare": {"cmd": "python -c \"open('data.txt', 'w').write('rows')\"", "outs": ["data.txt"]},
        "train": {"cmd": "python train.py", "deps": ["data.txt", "train.py"], "params": ["train.epochs"],
                  "outs": ["model.txt"]},
    }}))
    return init_repo(root)


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout.strip()


def deploy(env: dict) -> str:
    """The nightly deployment on its process pool; returns the pool's name."""
    nightly = next(d for d in yaml.safe_load((PROJECT / "prefect.yaml").read_text())["deployments"]
                   if d["name"] == "nightly")
    pool = nightly["work_pool"]["name"]
    run([PREFECT, "work-pool", "create", pool, "--type", "process"], env, PROJECT)
    run([PREFECT, "--no-prompt", "deploy", "--name", "nightly"], env, PROJECT)
    return pool


def trigger(env: dict, root: Path, *params: str) -> str:
    """A run of the deployment on the workspace root, now; returns its flow run id."""
    triggered = run([PREFECT, "deployment", "run", f"{FLOW_NAME}/nightly", "--param", f"repo={root}", *params],
                    env, PROJECT)
    return re.search(r"UUID: ([0-9a-f-]{36})", triggered).group(1)


def run_worker_once(env: dict, pool: str) -> None:
    run([PREFECT, "worker", "start", "--pool", pool, "--run-once"], env, PROJECT, timeout=600)


def flow_run_logs(env: dict, flow_run_id: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
        with get_client(sync_client=True) as client:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return "\n".join(log.message for log in logs)


def locked_outs(text: str, stage: str) -> dict[str, str]:
    entry = yaml.safe_load(text)["stages"][stage]
    return {o["path"]: o["md5"] for o in entry["outs"]}


def flow_runs(env: dict) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
        with get_client(sync_client=True) as client:
            return client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[FLOW_NAME])))


def test_deployment_runs_are_recorded_and_audited_after_the_workspace_moved_on(prefect_server, tmp_path):
    env = prefect_server
    nightly = next(d for d in yaml.safe_load((PROJECT / "prefect.yaml").read_text())["deployments"]
                   if d["name"] == "nightly")
    root = make_repo(tmp_path / "ws")
    head = git(root, "rev-parse", "HEAD")

    pool = deploy(env)
    shown = run([PREFECT, "deployment", "inspect", f"{FLOW_NAME}/nightly"], env, PROJECT)
    assert nightly["schedules"][0]["cron"] in shown

    first_id = trigger(env, root)
    run_worker_once(env, pool)
    (deployed_run,) = [r for r in flow_runs(env) if str(r.id) == first_id]
    assert deployed_run.state.is_completed(), deployed_run.state
    assert deployed_run.parameters == {"repo": str(root)}
    assert (root / "model.txt").read_text() == "rows trained 1 epochs"
    assert set(yaml.safe_load((root / "dvc.lock").read_text())["stages"]) == {"prepare", "train"}
    # Recorded: a DVC experiment named after the flow run, the checkout's HEAD untouched.
    (first,) = recorded_runs(root)
    assert first.flow_run_id == first_id and first.flow_run_name == deployed_run.name
    assert git(root, "rev-parse", "HEAD") == head and git(root, "rev-parse", f"{first.commit}^") == head
    assert first.name == deployed_run.name and f"DVC experiment {first.name}" in flow_run_logs(env, first_id)

    # The next run with a param changed: the workspace moves on; recorded as a second experiment.
    second_id = trigger(env, root, "--param", 'set_params=["train.epochs=2"]')
    run_worker_once(env, pool)
    (second_run,) = [r for r in flow_runs(env) if str(r.id) == second_id]
    assert second_run.state.is_completed(), second_run.state
    assert (root / "model.txt").read_text() == "rows trained 2 epochs"
    first_again, second = recorded_runs(root)
    assert first_again.name == first.name and second.flow_run_id == second_id
    assert "  train.epochs: 1 -> 2" in git(root, "log", "-1", "--format=%B", second.commit)
    first_model = locked_outs(git(root, "show", f"{first.commit}:dvc.lock"), "train")["model.txt"]
    assert first_model == hashlib.md5(b"rows trained 1 epochs").hexdigest()
    assert first_model != locked_outs((root / "dvc.lock").read_text(), "train")["model.txt"]

    # The CLI with PREFECT_API_URL set records its run on this server; DVC finds nothing to do,
    # and the run is recorded all the same (every run is an experiment).
    out = run([sys.executable, "-m", "tasks.commands.cli", "flow", "run", "--repo", str(root)], env, PROJECT)
    assert env["PREFECT_API_URL"] in out and "Running stage" not in out
    assert out.count("unchanged: skipped") >= 2
    assert len(recorded_runs(root)) == 3

    # The first run's model audited by its experiment's name, its outputs gone from the workspace's cache:
    # they come back from the DVC remote, and the audit shows that run's params and hashes.
    shutil.rmtree(root / ".dvc/cache")
    proc = subprocess.run([sys.executable, "-m", "tasks.commands.cli", "lineage", "model.txt", "--rev", first.name,
                           "--json"], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    audit = json.loads(proc.stdout)
    assert audit["problems"] == [] and audit["lineage"]["state"] == "ok"
    assert audit["lineage"]["hash"] == f"md5:{first_model}"
    assert audit["lineage"]["stage"]["params"]["params.yaml"] == {"train.epochs": 1}
    assert audit["rev"]["run"]["Selfdistill-Flow-Run-Id"] == first_id
    assert any("fetched" in note for note in audit["rev"]["notes"]), audit["rev"]["notes"]
    assert (root / ".dvc/cache/files/md5" / first_model[:2] / first_model[2:]).is_file()
    assert (root / "model.txt").read_text() == "rows trained 2 epochs"

    # `selfdistill runs` and `dvc exp show`: every run, newest first, with its params.
    listed = run([sys.executable, "-m", "flows.runs", "--repo", str(root)], env, PROJECT)
    assert listed.index(second.name + "  ") < listed.index(first.name + "  ")
    assert f"({second_id})" in listed and f"({first_id})" in listed
    shown = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], cwd=root, env=env,
                           capture_output=True, text=True, timeout=300, check=True).stdout
    epochs = {rev["name"]: rev["data"]["params"]["params.yaml"]["data"]["train"]["epochs"]
              for baseline in json.loads(shown) for exp in baseline["experiments"] or [] for rev in exp["revs"]}
    assert epochs[first.name] == 1 and epochs[second.name] == 2

    runs = flow_runs(env)
    (cli_run,) = [r for r in runs if r.deployment_id is None]
    assert cli_run.state.is_completed() and cli_run.parameters["repo"] == str(root)
    # The server's scheduler has queued the next nightly runs from prefect.yaml's cron (03:00 UTC).
    scheduled = [r for r in runs if r.state.is_scheduled()]
    assert scheduled and {(r.expected_start_time.hour, r.expected_start_time.minute) for r in scheduled} == {(3, 0)}


def test_two_runs_at_once_in_one_workspace_take_turns(prefect_server, tmp_path):
    env = dict(prefect_server, SELFDISTILL_TEST_SLEEP="4")
    root = make_repo(tmp_path / "ws")
    pool = deploy(env)
    ids = {trigger(env, root, "--param", f'set_params=["train.epochs={epochs}"]'): epochs for epochs in (3, 4)}
    run_worker_once(env, pool)  # the worker starts both runs at once

    finished = {str(r.id): r for r in flow_runs(env) if str(r.id) in ids}
    assert all(r.state.is_completed() for r in finished.values()), [r.state for r in finished.values()]
    waited = [i for i in ids if "waiting for the workspace lock" in flow_run_logs(env, i)]
    assert len(waited) == 1, "one run waits for the other"
    # Whole runs in turn: the train stages did not overlap.
    spans = sorted(tuple(span) for _, *span in map(json.loads, (root / "times.log").read_text().splitlines()))
    assert len(spans) == 2 and spans[0][1] <= spans[1][0]
    # Each record holds its own run's params, dvc.lock and model, none of the other's.
    records = recorded_runs(root)
    assert {r.flow_run_id for r in records} == set(ids)
    for record in records:
        epochs = ids[record.flow_run_id]
        assert yaml.safe_load(git(root, "show", f"{record.commit}:params.yaml"))["train"]["epochs"] == epochs
        lock = git(root, "show", f"{record.commit}:dvc.lock")
        assert yaml.safe_load(lock)["stages"]["train"]["params"]["params.yaml"] == {"train.epochs": epochs}
        assert locked_outs(lock, "train")["model.txt"] == hashlib.md5(f"rows trained {epochs} epochs".encode()).hexdigest()
