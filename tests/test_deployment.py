"""prefect.yaml's process deployment against a real `prefect server start` (SQLite in a temp
PREFECT_HOME on 127.0.0.1): deploy, trigger a run, a worker runs it to completion on a temp
DVC repo; then `selfdistill flow run` with PREFECT_API_URL records its run on the same server."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import init_repo, write_params
from flows.pipeline import FLOW_NAME

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
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def run(cmd: list[str], env: dict, cwd: Path, timeout: float = 300) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def make_repo(root: Path) -> Path:
    write_params(root, overrides={"train": {"epochs": 1}})  # must pass the project's schema
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "prepare": {"cmd": "python -c \"open('data.txt', 'w').write('rows')\"", "outs": ["data.txt"]},
        "train": {"cmd": "python -c \"open('model.txt', 'w').write(open('data.txt').read() + ' trained')\"",
                  "deps": ["data.txt"], "params": ["train.epochs"], "outs": ["model.txt"]},
    }}))
    return init_repo(root)


def flow_runs(env: dict) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
        with get_client(sync_client=True) as client:
            return client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[FLOW_NAME])))


def test_deployment_runs_on_a_process_worker(prefect_server, tmp_path):
    env = prefect_server
    nightly = next(d for d in yaml.safe_load((PROJECT / "prefect.yaml").read_text())["deployments"]
                   if d["name"] == "nightly")
    pool = nightly["work_pool"]["name"]
    root = make_repo(tmp_path / "ws")

    run([PREFECT, "work-pool", "create", pool, "--type", "process"], env, PROJECT)
    run([PREFECT, "--no-prompt", "deploy", "--name", "nightly"], env, PROJECT)
    shown = run([PREFECT, "deployment", "inspect", f"{FLOW_NAME}/nightly"], env, PROJECT)
    assert nightly["schedules"][0]["cron"] in shown

    triggered = run([PREFECT, "deployment", "run", f"{FLOW_NAME}/nightly", "--param", f"repo={root}"], env, PROJECT)
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", triggered).group(1)
    run([PREFECT, "worker", "start", "--pool", pool, "--run-once"], env, PROJECT, timeout=600)

    (deployed_run,) = [r for r in flow_runs(env) if str(r.id) == flow_run_id]
    assert deployed_run.state.is_completed(), deployed_run.state
    assert deployed_run.parameters == {"repo": str(root)}
    assert (root / "model.txt").read_text() == "rows trained"
    assert set(yaml.safe_load((root / "dvc.lock").read_text())["stages"]) == {"prepare", "train"}

    # The CLI with PREFECT_API_URL set records its run on this server; DVC finds nothing to do.
    out = run([sys.executable, "-m", "tasks.commands.cli", "flow", "run", "--repo", str(root)], env, PROJECT)
    assert env["PREFECT_API_URL"] in out and "Running stage" not in out
    assert out.count("unchanged: skipped") >= 2
    runs = flow_runs(env)
    (cli_run,) = [r for r in runs if r.deployment_id is None]
    assert cli_run.state.is_completed() and cli_run.parameters["repo"] == str(root)
    # The server's scheduler has queued the next nightly runs from prefect.yaml's cron (03:00 UTC).
    scheduled = [r for r in runs if r.state.is_scheduled()]
    assert scheduled and {(r.expected_start_time.hour, r.expected_start_time.minute) for r in scheduled} == {(3, 0)}
