"""The flow on a real Dask cluster: a `dask scheduler` and two `dask worker` processes on this
machine, `selfdistill flow run --task-runner dask --address ...`, stages running on the workers."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, filter_named_arms, init_repo, make_workspace, rendered_stages, stage_env, write_params
from test_flow import PIPELINE  # the same DAG: prepare -> train@<arm> -> report

pytestmark = pytest.mark.slow
pytest.importorskip("prefect_dask", reason="the dask extra (pip install 'selfdistill[dask]') is part of dev")

# Each stage records which Dask worker ran it (the worker's own environment reaches its stage
# commands) and writes its outputs; SLEEP makes `train@*` slow enough to kill its worker mid-stage.
STEP = textwrap.dedent("""
    import json, os, pathlib, sys, time
    stage, outs = sys.argv[1], sys.argv[2:]
    with open("workers.log", "a") as log:
        log.write(json.dumps([stage, os.environ.get("SELFDISTILL_TEST_WORKER"), os.getpid()]) + "\\n")
    if stage.startswith("train"):
        time.sleep(float(os.environ.get("STEP_SLEEP", "0")))
    for out in outs:
        path = pathlib.Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(stage + " " + open("params.yaml").read())
""")
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_repo(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "step.py").write_text(STEP)
    write_params(root, overrides={**filter_named_arms(), "train": {"epochs": 1}})
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": PIPELINE}, sort_keys=False))
    (root / ".gitignore").write_text("workers.log\n")
    return init_repo(root)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def cluster(tmp_path):
    """A scheduler and two single-threaded workers, each worker's stage commands tagged w1 / w2
    (SELFDISTILL_TEST_WORKER) and tracing the params they read into traces/<worker>.jsonl."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PYTHONPATH": str(REPO), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    logs, traces = tmp_path / "dask-logs", tmp_path / "traces"
    logs.mkdir()
    traces.mkdir()
    procs = {"scheduler": subprocess.Popen(
        [str(bin_dir / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
        env=env, stdout=open(logs / "scheduler.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)}
    for name in ("w1", "w2"):
        procs[name] = subprocess.Popen(
            [str(bin_dir / "dask"), "worker", address, "--nworkers", "1", "--nthreads", "1", "--name", name,
             "--no-dashboard", "--no-nanny"],
            env={**env, "SELFDISTILL_TEST_WORKER": name, "SELFDISTILL_TRACE_PARAMS": str(traces / f"{name}.jsonl")},
            cwd=REPO,
            stdout=open(logs / f"{name}.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    from distributed import Client

    with Client(address, timeout=60) as client:
        wait_for(lambda: len(client.scheduler_info()["workers"]) == 2, 120, "two dask workers")
    yield {"address": address, "env": env, "procs": procs, "logs": logs, "traces": traces}
    for proc in procs.values():
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs.values():
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def flow_run(root: Path, cluster: dict | None, env: dict, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "tasks.commands.cli", "flow", "run", "--repo", str(root), "--retries", "1", *extra]
    if cluster:
        cmd += ["--task-runner", "dask", "--address", cluster["address"]]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def worker_records(root: Path) -> list:
    return [json.loads(line) for line in (root / "workers.log").read_text().splitlines()]


def lock_outs(root: Path) -> dict:
    stages = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    return {name: [(o["path"], o["md5"]) for o in stage["outs"]] for name, stage in stages.items()}


def test_stages_run_on_dask_workers_and_record_what_a_local_run_records(tmp_path, cluster):
    on_dask, local = make_repo(tmp_path / "dask-ws"), make_repo(tmp_path / "local-ws")
    proc = flow_run(on_dask, cluster, cluster["env"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ran_on = {stage: worker for stage, worker, _ in worker_records(on_dask)}
    assert set(ran_on) == {"prepare", "train@none", "train@passes", "report"}
    assert set(ran_on.values()) <= {"w1", "w2"}, ran_on  # every stage ran on a worker, none in the client

    assert flow_run(local, None, cluster["env"]).returncode == 0
    assert lock_outs(on_dask) == lock_outs(local)  # the same outputs, byte for byte, and the same record
    assert (on_dask / "report/summary.md").read_text() == (local / "report/summary.md").read_text()


def test_a_worker_killed_mid_stage_leads_to_a_retry_with_nothing_half_written(tmp_path, cluster):
    root = make_repo(tmp_path / "ws")
    # Slow train@* down (the workers' environment was fixed when they started: through the repo).
    (root / "step.py").write_text(STEP.replace('float(os.environ.get("STEP_SLEEP", "0"))', "20"))
    subprocess.run(["git", "commit", "-qam", "slow train"], cwd=root, check=True)
    flow = subprocess.Popen([sys.executable, "-m", "tasks.commands.cli", "flow", "run", "--repo", str(root),
                             "--retries", "2", "--task-runner", "dask", "--address", cluster["address"]],
                            cwd=REPO, env=cluster["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def a_train_stage_started():
        return (root / "workers.log").exists() and any(s.startswith("train") for s, _, _ in worker_records(root))

    wait_for(a_train_stage_started, 300, "a train stage to start")
    stage, worker, _ = next(r for r in worker_records(root) if r[0].startswith("train"))
    os.killpg(cluster["procs"][worker].pid, signal.SIGKILL)  # the worker process, mid-stage
    out, _ = flow.communicate(timeout=900)

    from flows.lineage import lineage

    locked = (yaml.safe_load((root / "dvc.lock").read_text()) or {}).get("stages", {})
    if flow.returncode == 0:
        # Dask reschedules the lost task on the surviving worker, which reruns the stage or finds
        # its result in DVC's run-cache (the killed worker's stage command ran to its end): every
        # stage is recorded, and every file matches its record.
        assert set(locked) == {"prepare", "train@none", "train@passes", "report"}, out[-3000:]
        audit = lineage(root / "report/summary.md", root)
        assert audit["problems"] == [], audit["problems"]
        assert f"{stage}" in out
    else:
        # Or a clear failure naming the stage, and no record of it that could be taken as valid.
        assert stage in out, out[-3000:]
        assert stage not in locked


def ran_on_workers(cluster) -> dict[str, list[str]]:
    """Each stage command the workers ran -> the workers that ran it (from their params traces)."""
    ran_on = {}
    for trace in cluster["traces"].glob("*.jsonl"):
        for line in trace.read_text().splitlines():
            ran_on.setdefault(json.loads(line)["cmd"], []).append(trace.stem)
    return ran_on


def test_sample_and_evaluate_shards_run_on_two_workers_and_merge_into_what_one_stage_writes(tmp_path, cluster,
                                                                                           tiny_model, monkeypatch):
    """The real dvc.yaml and stages (tiny profile: 6 train prompts, 4 per batch: two batches; the
    base model's validation sweep 3 batches, each test pass 4) with sample.shards 2 and
    evaluate.shards 2, through the flow on the cluster; then shards 1 and `dvc repro` of the one
    stage that replaces each: the same files, byte for byte."""
    from tasks.core.config import EXIT_NO_RETRY
    from tasks.core.profiles import update_params_file

    root = make_workspace(tmp_path / "ws", tiny_model, {"sample": {"shards": 2}, "evaluate": {"shards": 2, "repeats": 2}})
    proc = flow_run(root, cluster, cluster["env"], "--target", "sample-merge@ssd", "--no-record")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ran_on = ran_on_workers(cluster)
    shards = {f"python -m tasks.sample --config ssd --shard {i}" for i in (0, 1)}
    assert shards <= set(ran_on), ran_on
    assert sorted(w for cmd in shards for w in ran_on[cmd]) == ["w1", "w2"], ran_on  # one shard on each worker
    assert "python -m tasks.sample --config ssd --merge" in ran_on
    shard_rows = [[json.loads(l) for l in (root / f"samples/ssd/shards/{i}.jsonl").read_text().splitlines()]
                  for i in (0, 1)]
    assert [{r["batch"] for r in rows} for rows in shard_rows] == [{0}, {1}]
    merged = {name: (root / "samples/ssd" / name).read_bytes() for name in ("samples.jsonl", "stats.json")}
    assert not list((root / "checkpoints/partial").rglob("*.partial"))  # each shard cleared its partial work

    # The base model's evaluation, its validation and test parts each in two shards, in a second
    # flow run (alone, so that the two shards of a part are the two stages ready at once).
    proc = flow_run(root, cluster, cluster["env"], "--target", "evaluate-merge@base", "--no-record")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ran_on = ran_on_workers(cluster)
    for part in ("validation", "test"):
        shards = {f"python -m tasks.evaluate --model models/base --name base --shard {i} --part {part}" for i in (0, 1)}
        assert shards <= set(ran_on), ran_on
        assert sorted(w for cmd in shards for w in ran_on[cmd]) == ["w1", "w2"], (part, ran_on)
        assert all((root / f"eval/base/shards/{part}/{i}.jsonl").read_text() for i in (0, 1))  # each got batches
    assert "python -m tasks.evaluate --model models/base --name base --merge" in ran_on
    eval_files = sorted(p.relative_to(root) for p in (root / "eval/base").rglob("*") if p.is_file()
                        and "shards" not in p.parts)
    assert len([p for p in eval_files if "validation" in p.parts]) == 2 and len(
        [p for p in eval_files if "repeats" in p.parts]) == 2, eval_files  # 2 T_eval; 2 sets x 1 repeat
    evaluated = {p: (root / p).read_bytes() for p in eval_files}
    assert not list((root / "checkpoints/partial").rglob("*.partial"))

    # The params each shard and merge command read are the ones dvc.yaml declares for it.
    monkeypatch.chdir(root)
    declared = {stage["cmd"]: stage["params"] for stage in rendered_stages(root).values()}
    checked = set()
    for trace in cluster["traces"].glob("*.jsonl"):
        for record in map(json.loads, trace.read_text().splitlines()):
            if record["cmd"] in declared and ("--shard" in record["cmd"] or "--merge" in record["cmd"]):
                keys = declared[record["cmd"]]
                assert all(any(k == d or k.startswith(d + ".") for d in keys) for k in record["keys"]), record
                assert all(any(k == d or k.startswith(d + ".") for k in record["keys"]) for d in keys), record
                checked.add(record["cmd"])
    evaluate = "python -m tasks.evaluate --model models/base --name base"
    assert {f"{evaluate} --merge", f"{evaluate} --shard 0 --part validation", f"{evaluate} --shard 1 --part test",
            "python -m tasks.sample --config ssd --merge", "python -m tasks.sample --config ssd --shard 1"} <= checked

    # A merge refuses shards that do not hold every answer once, naming the stages to rerun.
    test_shard = root / "eval/base/shards/test/1.jsonl"
    kept = test_shard.read_text()
    test_shard.write_text("".join(kept.splitlines(True)[1:]))
    merge = subprocess.run([sys.executable, "-m", "tasks.evaluate", "--model", "models/base", "--name", "base",
                            "--merge"], cwd=root, env=stage_env(root), capture_output=True, text=True)
    assert merge.returncode == EXIT_NO_RETRY and "rerun the evaluate-test@base-* stages" in merge.stderr, merge.stderr[-2000:]
    test_shard.write_text(kept)

    update_params_file(root / "params.yaml", ["sample.shards=1", "evaluate.shards=1"])
    whole = subprocess.run([sys.executable, "-m", "dvc", "repro", "sample@ssd", "evaluate@base"], cwd=root,
                           env=stage_env(root), capture_output=True, text=True)
    assert whole.returncode == 0, whole.stdout[-3000:] + whole.stderr[-3000:]
    assert sorted(re.findall(r"Running stage '([^']+)'", whole.stdout)) == ["evaluate@base", "sample@ssd"]
    assert {name: (root / "samples/ssd" / name).read_bytes() for name in merged} == merged
    assert len(merged["samples.jsonl"].splitlines()) == 6
    assert sorted(p.relative_to(root) for p in (root / "eval/base").rglob("*") if p.is_file()
                  and "shards" not in p.parts) == eval_files
    assert {p: (root / p).read_bytes() for p in eval_files} == evaluated
