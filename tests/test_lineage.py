"""`selfdistill lineage` on real DVC records: the project's own dvc.yaml and tiny profile with
each stage's command swapped for a fast fake that writes the same outputs, and a different
dvc.yaml with `dvc add`-ed data and a pipeline in a subdirectory."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from conftest import init_repo, make_workspace, stage_env
from flows.lineage import lineage, main, render_text
from tasks.core.profiles import update_params_file

# Writes every output the stage declares; a directory (a model) gets weights.bin, and
# models/base the origin note tasks/model.py leaves.
FAKE_STAGE = textwrap.dedent("""
    import json, pathlib, sys
    for out in sys.argv[1:]:
        path = pathlib.Path(out)
        if path.suffix:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"made_for": out}) + "\\n")
        else:
            path.mkdir(parents=True, exist_ok=True)
            (path / "weights.bin").write_text(out)
            if out == "models/base":
                origin = {"base": "embedded:smollm2-135m-instruct", "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
                          "sha256": "ab" * 32}
                (path / "source.json").write_text(json.dumps(origin))
""")


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout.strip()


def dvc(root: Path, *args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=stage_env(root),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def declared_paths(body: dict) -> list[str]:
    return [next(iter(o)) if isinstance(o, dict) else o for key in ("outs", "metrics", "plots") for o in body.get(key, [])]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The project's dvc.yaml, tasks/ and tiny profile, reproduced with fake commands and committed."""
    root = make_workspace(tmp_path_factory.mktemp("lineage") / "ws", Path("embedded-model-not-loaded"))
    pipeline = yaml.safe_load((root / "dvc.yaml").read_text())
    for stage in pipeline["stages"].values():
        body = stage.get("do", stage)
        body["cmd"] = "python fake_stage.py " + " ".join(declared_paths(body))
    (root / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    (root / "fake_stage.py").write_text(FAKE_STAGE)
    dvc(root, "repro")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "reproduced")
    return root


def inputs(stage: dict) -> dict:
    return {node["path"]: node for node in stage["inputs"]}


def test_lineage_of_a_trained_model_names_samples_params_and_origins(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    locked = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    arm = next(iter(params["arms"]))
    config = params["arms"][arm]["sample"]
    report = lineage(project / f"models/{arm}" / "weights.bin", project)
    assert report["output"] == f"models/{arm}" and report["problems"] == []
    assert report["records"]["dvc.lock"] == {"commit": git(project, "rev-parse", "HEAD"), "uncommitted_changes": False}

    train = report["lineage"]["stage"]
    assert train["name"] == f"train@{arm}" and train["cmd"] == locked[f"train@{arm}"]["cmd"]
    assert train["params"]["params.yaml"]["train.epochs"] == params["train"]["epochs"]
    filtered = inputs(train)[f"filtered/{arm}/train.jsonl"]
    recorded = {d["path"]: d["md5"] for d in locked[f"train@{arm}"]["deps"]}
    assert filtered["hash"] == "md5:" + recorded[f"filtered/{arm}/train.jsonl"] and filtered["state"] == "ok"

    filter_stage = filtered["stage"]
    assert filter_stage["name"] == f"filter@{arm}"
    assert filter_stage["params"]["params.yaml"]["filter.shortest_fraction"] == params["filter"]["shortest_fraction"]
    sample = inputs(filter_stage)[f"samples/{config}/samples.jsonl"]["stage"]
    assert sample["name"] == f"sample@{config}"
    for key, value in params["sample"]["configs"][config].items():  # the config's keys, one by one
        assert sample["params"]["params.yaml"][f"sample.configs.{config}.{key}"] == value

    model = inputs(sample)["models/base"]["stage"]
    assert model["name"] == "model" and model["params"]["params.yaml"]["model.base"] == params["model"]["base"]
    assert model["origin"]["models/base/source.json"]["sha256"] == "ab" * 32
    prepare = inputs(sample)["data/train.jsonl"]["stage"]
    assert prepare["name"] == "prepare"
    assert prepare["params"]["params.yaml"]["data.train.max_problems"] == params["data"]["train"]["max_problems"]
    assert prepare["origin"]["data/source.json"] == {"made_for": "data/source.json"}
    leaves = inputs(prepare)
    assert "stage" not in leaves["problems"] and leaves["tasks/prepare.py"]["state"] == "ok"

    text = render_text(report)
    assert f"<- stage filter@{arm}" in text and "<- stage prepare" in text and "<- stage model" in text
    assert "(see above)" in text and "requirements/lock.txt" in text  # the locked stack, by hash
    assert f"sample.configs.{config}.temperature = {params['sample']['configs'][config]['temperature']!r}" in text


def test_lineage_of_the_report_reaches_every_evaluation(project):
    arms = yaml.safe_load((project / "params.yaml").read_text())["arms"]
    report = lineage(project / "report/summary.md", project)
    evals = inputs(report["lineage"]["stage"])["eval"]  # a directory several stages write into
    assert {part["stage"]["name"] for part in evals["parts"]} == {"evaluate@base"} | {f"evaluate@{a}" for a in arms}


def test_lineage_flags_hand_edits_and_changed_params(project, tmp_path, monkeypatch, capsys):
    root = tmp_path / "ws"
    shutil.copytree(project, root, symlinks=True)
    params = yaml.safe_load((root / "params.yaml").read_text())
    arm = next(iter(params["arms"]))
    samples = f"samples/{params['arms'][arm]['sample']}/samples.jsonl"
    monkeypatch.chdir(root)
    assert main([f"models/{arm}/weights.bin"]) == 0
    assert f"inside the tracked output models/{arm}" in capsys.readouterr().out

    with open(root / samples, "a") as f:
        f.write('{"text": "edited by hand"}\n')
    (root / "models/base/weights.bin").write_text("edited by hand")
    update_params_file(root / "params.yaml", ["train.lr=0.001"])

    assert main([f"models/{arm}", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert set(report["problems"]) == {
        f"{samples}: modified since sample@{params['arms'][arm]['sample']} made it",
        f"{samples}: modified since filter@{arm} used it",
        "models/base: modified since model made it [weights.bin modified]",
        f"models/base: modified since sample@{params['arms'][arm]['sample']} used it [weights.bin modified]",
        f"models/base: modified since train@{arm} used it [weights.bin modified]",
        f"train@{arm}: param train.lr is 0.001 in params.yaml now, 5e-05 when it ran",
    }
    train = report["lineage"]["stage"]
    assert train["params"]["params.yaml"]["train.lr"] == {"recorded": 5e-05, "now": 0.001}
    assert inputs(train)["models/base"]["changed_files"] == ["weights.bin modified"]

    assert main(["params.yaml"]) == 2
    assert main(["eval"]) == 2
    err = capsys.readouterr().err
    assert "params.yaml: not an output of any stage" in err
    assert "eval: not an output of any stage" in err and "tracked outputs inside it: eval/base/metrics.json" in err


def test_lineage_of_any_dvc_yaml_with_added_data_and_a_subdirectory_pipeline(tmp_path):
    root = init_repo(tmp_path / "ws")
    (root / "raw").mkdir(parents=True)
    (root / "raw/rows.txt").write_text("1\n2\n3\n")
    (root / "sub").mkdir()
    (root / "sub/dvc.yaml").write_text(yaml.safe_dump({"stages": {"count": {
        "cmd": "wc -l < ../raw/rows.txt > count.txt", "deps": ["../raw"], "outs": ["count.txt"]}}}))
    dvc(root, "add", "-q", "raw")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "data")
    dvc(root, "repro", "sub/dvc.yaml")  # dvc.lock left uncommitted

    report = lineage(root / "sub/count.txt", root)
    assert report["problems"] == []
    count = report["lineage"]["stage"]
    assert count["name"] == "sub/dvc.yaml:count" and count["record"] == "sub/dvc.lock"
    assert report["records"]["sub/dvc.lock"] == {"commit": None, "uncommitted_changes": True}
    raw = inputs(count)["raw"]
    assert raw["stage"] == {"name": "raw.dvc", "record": "raw.dvc", "cmd": None, "params": {}, "origin": {},
                            "inputs": []}
    assert report["records"]["raw.dvc"]["commit"] == git(root, "rev-parse", "HEAD")
    assert "<- dvc add  [raw.dvc @" in render_text(report)

    (root / "raw/rows.txt").write_text("1\n")
    (root / "sub/count.txt").unlink()
    (root / "sub/dvc.yaml").write_text((root / "sub/dvc.yaml").read_text().replace("wc -l", "wc -w"))
    assert lineage(root / "sub/count.txt", root)["problems"] == [
        "sub/count.txt: missing, though sub/dvc.yaml:count made it",
        "sub/dvc.yaml:count: its command in dvc.yaml changed since it ran",
        "raw: modified since sub/dvc.yaml:count used it [rows.txt modified]",
        "raw: modified since raw.dvc recorded it [rows.txt modified]"]

    # A stage added to dvc.yaml and never run has no record to show.
    pipeline = yaml.safe_load((root / "sub/dvc.yaml").read_text())
    pipeline["stages"]["twice"] = {"cmd": "cat count.txt count.txt > twice.txt", "deps": ["count.txt"],
                                   "outs": ["twice.txt"]}
    (root / "sub/dvc.yaml").write_text(yaml.safe_dump(pipeline))
    problems = lineage(root / "sub/twice.txt", root)["problems"]
    assert problems[:3] == ["sub/twice.txt: sub/dvc.yaml:twice has no hash recorded for it (not run with it yet)",
                            "sub/dvc.yaml:twice: never run (no entry in sub/dvc.lock)",
                            "sub/count.txt: sub/dvc.yaml:twice has no hash recorded for it (not run with it yet)"]


def cli_env(root: Path) -> dict:
    # The workspace's copy of tasks/, then this checkout's flows/ (the code under test).
    env = stage_env(root)
    env["PYTHONPATH"] += os.pathsep + str(Path(__file__).resolve().parents[1])
    return env


def test_lineage_into_a_pipe_closed_early_ends_quietly(project):
    # The reader is gone before the report is written (`| head -c0`, or `| head -1` on a report
    # larger than the pipe's buffer): the write fails with EPIPE.
    proc = subprocess.Popen([sys.executable, "-m", "tasks.commands.cli", "lineage", "report/summary.md"],
                            cwd=project, env=cli_env(project), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait() == 141, err  # 128 + SIGPIPE, as for any filter whose reader left
    assert err == ""

    # A reader that takes only the first line.
    head = subprocess.run(f"{sys.executable} -m tasks.commands.cli lineage report/summary.md --json | head -1",
                          shell=True, cwd=project, env=cli_env(project), capture_output=True, text=True)
    assert head.stdout == "{\n" and head.stderr == ""


def test_lineage_at_a_recorded_run_after_the_workspace_moved_on(tmp_path, monkeypatch, capsys):
    from flows.records import record_run
    from test_runs import make_repo, set_epochs

    root = make_repo(tmp_path / "ws")
    dvc(root, "repro")
    first = record_run(root, "id-1", "first-run").record
    first_lock = yaml.safe_load(git(root, "show", f"{first.commit}:dvc.lock"))["stages"]["train"]
    md5 = {entry["path"]: entry["md5"] for entry in first_lock["outs"] + first_lock["deps"]}
    set_epochs(root, 2)
    dvc(root, "repro")
    record_run(root, "id-2", "second-run")
    # The workspace has moved on, and its cache no longer has the first run's outputs.
    shutil.rmtree(root / ".dvc/cache")
    assert "trained 2 epochs" in (root / "model.txt").read_text()

    monkeypatch.chdir(root)
    assert main(["model.txt", "--rev", first.name, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["problems"] == [] and report["lineage"]["state"] == "ok"
    assert report["lineage"]["hash"] == "md5:" + md5["model.txt"]
    train = report["lineage"]["stage"]
    assert train["params"]["params.yaml"] == {"train.epochs": 1}
    assert inputs(train)["data.txt"]["hash"] == "md5:" + md5["data.txt"]
    assert report["records"]["dvc.lock"]["commit"] == first.commit
    assert report["rev"]["commit"] == first.commit and report["rev"]["run"]["Selfdistill-Flow-Run-Id"] == "id-1"
    assert any("2 files fetched" in note for note in report["rev"]["notes"]), report["rev"]["notes"]
    model = md5["model.txt"]
    assert (root / ".dvc/cache/files/md5" / model[:2] / model[2:]).is_file()  # fetched back from the remote
    # The workspace is as it was: its own model, no worktree left behind.
    assert "trained 2 epochs" in (root / "model.txt").read_text()
    assert len(git(root, "worktree", "list").splitlines()) == 1

    assert main(["model.txt", "--rev", first.name]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"as recorded at {first.name} (commit {first.commit[:12]}; flow run first-run (id-1), ")
    assert "train.epochs = 1" in text and "OK: every file matches" in text

    # Gone from the remote too: the audit says what is missing (exit 1); a bad rev is an error (2).
    shutil.rmtree(root / ".dvc/cache")
    shutil.rmtree(tmp_path / "ws-dvc-remote")
    assert main(["model.txt", "--rev", first.name]) == 1
    assert "model.txt: missing, though train made it" in capsys.readouterr().out
    assert main(["model.txt", "--rev", "no-such-branch"]) == 2
    assert "--rev no-such-branch: not a commit, branch or DVC experiment" in capsys.readouterr().err


def test_the_dvc_internals_lineage_reads_are_the_tested_ones():
    """flows/lineage.py reads DVC internals that no DVC interface documents (dvc.lock's parsed
    contents per stage, an output's recorded object, dvc-data's tree build and diff). They were
    verified on the minor versions pyproject pins; an upgrade past them fails here, loudly, before
    an audit can read something else silently."""
    import re
    import tomllib
    from importlib.metadata import version

    from dvc.dependency.param import ParamsDependency
    from dvc.dvcfile import ProjectFile
    from dvc.output import Output
    from dvc.utils.fs import path_isin
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.diff import diff

    from conftest import REPO

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for package in ("dvc", "dvc-data"):
        (pin,) = [re.fullmatch(rf"{package}==(\d+\.\d+)\.\*", d.split(";")[0].strip()) for d in deps
                  if re.match(rf"{package}==", d)]
        assert pin, f"pyproject.toml must pin {package} to a tested minor (==X.Y.*)"
        assert version(package).startswith(pin.group(1) + "."), \
            f"{package} {version(package)} is not the tested {pin.group(1)}: re-verify flows/lineage.py's reads"
    # The instance attributes (hash_info, fs_path, cache, ...) are exercised by the audits above.
    assert hasattr(ProjectFile, "lockfile_contents") and callable(Output.get_obj) and callable(Output.get_hash)
    assert callable(ParamsDependency.read_params) and callable(build) and callable(diff) and callable(path_isin)
