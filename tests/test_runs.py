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
    from tasks.core.profiles import update_params_file

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


def checkout(root: Path) -> dict[str, str]:
    """What recording must leave alone: the checked-out branch and commit, the index, the working tree."""
    return {cmd: git(root, *cmd.split()) for cmd in ("symbolic-ref HEAD", "rev-parse HEAD", "ls-files --stage",
                                                      "diff --cached --name-only", "status --porcelain")}


def test_a_run_is_saved_as_an_experiment_leaving_the_checkout_alone_and_runs_lists_it(tmp_path, capsys,
                                                                                       monkeypatch):
    root = make_repo(tmp_path / "ws")
    # The user's own work in progress: a staged file and an unstaged edit; an imported problem
    # set git does not track; and no git identity (a fresh worker account).
    (root / "notes.txt").write_text("staged by the user\n")
    git(root, "add", "notes.txt")
    (root / "train.py").write_text(TRAIN + "# an uncommitted edit the run uses\n")
    (root / "problems").mkdir()
    (root / "problems" / "imported.jsonl").write_text("{}\n")
    git(root, "config", "--unset", "user.name")
    git(root, "config", "--unset", "user.email")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", os.devnull)
    dvc(root, "repro")
    before = checkout(root)
    result = record_run(root, "id-1", "first-run", stages={"prepare": "ran", "train": "ran"})
    first = result.record
    assert checkout(root) == before
    assert first.name == "first-run" and result.pushed and git(root, "rev-parse", f"{first.commit}^") == \
        before["rev-parse HEAD"]
    assert git(root, "log", "-1", "--format=%an", first.commit) == "selfdistill flow"
    saved = set(git(root, "diff-tree", "-r", "--name-only", before["rev-parse HEAD"], first.commit).splitlines())
    assert {"dvc.lock", ".gitignore", "metrics.json", "train.py"} <= saved and not any(
        p.startswith("problems/") for p in saved)
    assert git(root, "show", f"{first.commit}:train.py").endswith("# an uncommitted edit the run uses")
    assert recorded_runs(root)[0].flow_run_id == "id-1"

    # Every run is a record, changed or not; a repeated flow run name gets the id's first characters.
    set_epochs(root, 4)
    dvc(root, "repro")
    second = record_run(root, "id-3abcdefgh", "first-run").record
    assert second.name == "first-run-id-3abcd"
    assert "  train.epochs: 1 -> 4" in git(root, "log", "-1", "--format=%B", second.commit)
    assert [r.name for r in recorded_runs(root)] == [first.name, second.name]

    assert runs_command.main(["--repo", str(root)]) == 0
    newest, oldest = capsys.readouterr().out.split("\n\n")
    assert newest.startswith(second.name) and oldest.startswith(first.name + "  ")
    assert "flow run first-run (id-3abcdefgh)   completed" in newest
    assert f"audit:   selfdistill lineage PATH --rev {second.name}" in newest
    assert runs_command.main(["--repo", str(root), "--json", "-n", "1"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["flow_run_id"] == "id-3abcdefgh" and row["commit"] == second.commit


def test_a_record_holds_dvc_lock_as_the_run_left_it_not_as_a_later_edit_would_have_it(tmp_path):
    # `dvc exp save` alone would re-record train as if it had run with the edited train.py.
    root = make_repo(tmp_path / "ws")
    dvc(root, "repro")
    (root / "train.py").write_text(TRAIN + "# edited after the run\n")
    lock = (root / "dvc.lock").read_text()
    record = record_run(root, "id-1", "first-run", push_outputs=False).record
    assert (root / "dvc.lock").read_text() == lock
    assert git(root, "show", f"{record.commit}:dvc.lock") == lock.strip()


def test_runs_shows_pass_at_1_per_model_from_the_report():
    summary = {"report/summary.json": {"data": {"models": {"base": {"pass@1": 0.25}, "none": {"pass@1": 0.1}}}}}
    assert runs_command.pass_at_1(summary) == {"base": 0.25, "none": 0.1}
    headline = {"report/headline.json": {"data": {"humaneval.base.pass@1": 0.3, "humaneval.none.pass@1": 0.2,
                                                   "t_eval.base": 0.7}}}
    assert runs_command.pass_at_1({**summary, **headline}) == {"humaneval.base": 0.3, "humaneval.none": 0.2}


def test_a_failed_push_leaves_no_ref_on_the_git_remote_and_the_next_run_pushes_it(tmp_path):
    root = make_repo(tmp_path / "ws")
    origin = tmp_path / "origin.git"
    git(tmp_path, "init", "-q", "--bare", str(origin))
    git(root, "remote", "add", "origin", str(origin))
    git(root, "push", "-q", "origin", "HEAD")
    # An unreachable DVC remote: a path under a file, which no one can make.
    (tmp_path / "blocker").write_text("")
    dvc(root, "remote", "add", "--local", "-d", "store", str(tmp_path / "blocker" / "store"))
    dvc(root, "repro")
    with pytest.raises(RecordError, match="the next run retries"):
        record_run(root, "id-1", "first-run")
    remote_refs = lambda: git(origin, "for-each-ref", "--format=%(refname)", "refs/exps/")  # noqa: E731
    assert remote_refs() == "" and "first-run" in (root / ".dvc/tmp/selfdistill-unpushed.json").read_text()

    # The remote is reachable again: the next run pushes its own record and the one left behind.
    dvc(root, "remote", "modify", "--local", "store", "url", str(tmp_path / "store"))
    set_epochs(root, 2)
    dvc(root, "repro")
    result = record_run(root, "id-2", "second-run")
    assert result.pushed and result.git_remote == "origin"
    assert sorted(r.rsplit("/", 1)[1] for r in remote_refs().splitlines()) == ["first-run", "second-run"]
    assert json.loads((root / ".dvc/tmp/selfdistill-unpushed.json").read_text()) == {}
    # Both runs' data is on the DVC remote: the first model's object too.
    first_model = [o for o in yaml.safe_load(git(root, "show", f"{recorded_runs(root)[0].commit}:dvc.lock"))
                   ["stages"]["train"]["outs"] if o["path"] == "model.txt"][0]["md5"]
    assert (tmp_path / "store/files/md5" / first_model[:2] / first_model[2:]).is_file()


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
