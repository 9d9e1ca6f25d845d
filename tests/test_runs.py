"""Run records (flows/records.py) and `selfdistill runs` (flows/runs.py) on real git + DVC repos,
without Prefect: the flow's own use of them is tested in test_flow.py and test_deployment.py."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from conftest import init_repo, write_params
from flows import runs as runs_command
from flows.records import RecordError, ensure_remote, record_run, recorded_runs, workspace_lock

# train.py: model.txt from data.txt and train.epochs; metrics.json (DVC metrics, cache: false).
TRAIN = textwrap.dedent("""
    import json, yaml
    epochs = yaml.safe_load(open("params.yaml"))["train"]["epochs"]
    open("model.txt", "w").write(open("data.txt").read() + f" trained {epochs} epochs")
    json.dump({"loss": 1.0 / epochs, "epochs": epochs, "note": "text is not shown"}, open("metrics.json", "w"))
""")


def git(root: Path, *args: str, env: dict | None = None) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True, env=env).stdout.strip()


def dvc(root: Path, *args: str) -> None:
    env = dict(os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def set_epochs(root: Path, epochs: int) -> None:
    from tasks.core.config import update_params_file

    update_params_file(root / "params.yaml", [f"train.epochs={epochs}"])


def make_repo(root: Path) -> Path:
    write_params(root, overrides={"train": {"epochs": 1}})
    (root / "train.py").write_text(TRAIN)
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "prepare": {"cmd": "python -c \"open('data.txt', 'w').write('rows')\"", "outs": ["data.txt"]},
        "train": {"cmd": "python train.py", "deps": ["data.txt", "train.py"], "params": ["train.epochs"],
                  "outs": ["model.txt"], "metrics": [{"metrics.json": {"cache": False}}]},
    }}))
    return init_repo(root)


def test_record_leaves_the_checkout_alone_records_changes_only_and_runs_lists_them(tmp_path, capsys, monkeypatch):
    root = make_repo(tmp_path / "ws")
    # The user's own work in progress: a staged file and an unstaged edit; and no git identity
    # (a fresh worker account), so the record names this tool as its author.
    (root / "notes.txt").write_text("staged by the user\n")
    git(root, "add", "notes.txt")
    (root / "train.py").write_text(TRAIN + "# an uncommitted edit the run uses\n")
    git(root, "config", "--unset", "user.name")
    git(root, "config", "--unset", "user.email")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", os.devnull)
    before = {cmd: git(root, *cmd.split()) for cmd in ("symbolic-ref HEAD", "rev-parse HEAD", "ls-files --stage",
                                                         "diff --cached --name-only")}
    dvc(root, "repro")
    first = record_run(root, "id-1", "first-run", stages={"prepare": "ran", "train": "ran"}).record
    assert {cmd: git(root, *cmd.split()) for cmd in before} == before
    assert git(root, "log", "-1", "--format=%an", first.branch) == "selfdistill flow"
    # The code as the run used it (the uncommitted edit), not the user's staged file.
    shown = set(git(root, "diff-tree", "-r", "--name-only", before["rev-parse HEAD"], first.branch).splitlines())
    assert shown == {"dvc.lock", ".gitignore", "metrics.json", "train.py"}
    assert git(root, "show", f"{first.branch}:train.py").endswith("# an uncommitted edit the run uses")

    # Nothing changed (dvc.lock as recorded): nothing recorded.
    dvc(root, "repro")
    again = record_run(root, "id-2", "second-run")
    assert again.record is None and again.same_as.branch == first.branch and again.rev == first.branch
    assert len(recorded_runs(root)) == 1

    set_epochs(root, 4)
    dvc(root, "repro")
    second = record_run(root, "id-3", "third-run").record
    assert "  train.epochs: 1 -> 4" in git(root, "log", "-1", "--format=%B", second.branch)
    assert [r.branch for r in recorded_runs(root)] == [first.branch, second.branch]

    assert runs_command.main(["--repo", str(root)]) == 0
    text = capsys.readouterr().out
    newest, oldest = text.split("\n\n")
    assert newest.startswith(second.branch) and oldest.startswith(first.branch)
    assert "flow run third-run (id-3)   completed" in newest
    assert "params:   vs the previous run: train.epochs: 1 -> 4" in newest
    # No report/summary.json: the numbers of the metrics files instead.
    assert "metrics:  metrics.json: loss=0.25, epochs=4" in newest
    assert "params:   (the first recorded run)" in oldest and "metrics.json: loss=1, epochs=1" in oldest

    assert runs_command.main(["--repo", str(root), "--json", "-n", "1"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["flow_run_id"] == "id-3" and row["params_changed"] == ["train.epochs: 1 -> 4"]
    assert row["metrics"] == {"metrics.json": {"loss": 0.25, "epochs": 4}}


def test_runs_without_records_says_where_they_come_from(tmp_path, capsys):
    root = make_repo(tmp_path / "ws")
    assert runs_command.main(["--repo", str(root)]) == 0
    assert "No recorded runs" in capsys.readouterr().out


def test_a_remote_that_is_not_the_default_is_not_guessed(tmp_path):
    root = make_repo(tmp_path / "ws")
    dvc(root, "remote", "add", "elsewhere", str(tmp_path / "elsewhere"))
    with pytest.raises(RecordError, match=r"remotes are configured \(elsewhere\) but none is the default"):
        ensure_remote(root)
    dvc(root, "remote", "default", "elsewhere")
    assert ensure_remote(root) == "elsewhere"
    assert not (tmp_path / "ws-dvc-remote").exists()


HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from flows.records import workspace_lock
    with workspace_lock(sys.argv[1], "flow run first-run (id-1)"):
        print("locked", flush=True)
        time.sleep(float(sys.argv[2]))
""")


def test_workspace_lock_makes_a_second_run_wait_and_say_for_whom(tmp_path, caplog):
    root = make_repo(tmp_path / "ws")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(root), "3"], env=env, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        start = time.monotonic()
        with caplog.at_level(logging.INFO, logger="selfdistill.records"):
            with workspace_lock(root, "flow run second-run (id-2)"):
                waited = time.monotonic() - start
                held_by = (root / ".dvc/tmp/selfdistill-flow.lock").read_text()
    finally:
        holder.wait(timeout=30)
    assert waited > 2  # the first one held it for 3 s after saying so
    assert held_by.startswith("flow run second-run (id-2), pid ")
    assert "waiting for the workspace lock" in caplog.text and "held by flow run first-run (id-1), pid" in caplog.text
    # Free again: taken at once.
    with workspace_lock(root, "flow run third-run (id-3)"):
        pass
