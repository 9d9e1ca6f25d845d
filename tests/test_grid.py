"""`selfdistill grid`: the T_train x T_eval grid as real DVC experiments (queued, run, listed by
`dvc exp show`) on the tiny profile, and its heatmap; each experiment's sweep read from its commit."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import default_params, init_repo, make_workspace, stage_env


def test_the_grid_reads_each_experiments_sweep_from_its_commit(tmp_path, monkeypatch):
    """eval/<model>/metrics.json is an out, not DVC metrics: `dvc exp show` does not carry it,
    the experiment's commit does."""
    from tasks.commands import grid

    root = init_repo(tmp_path / "ws")
    git = lambda *args: subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,  # noqa: E731
                                       check=True).stdout.strip()
    revs = {}
    for t_train, arm, base in ((0.6, 0.25, 0.5), (1.2, 0.75, 0.5)):
        for model, value in (("ssd-none", arm), ("base", base)):
            path = root / "eval" / model / "metrics.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"validation": {"pass@1_by_temperature": {"0.5": value, "0.9": value / 2}}}))
        git("add", "-A")
        git("commit", "-qm", f"T_train {t_train}")
        revs[t_train] = git("rev-parse", "HEAD")
    exp_show = [{"rev": revs[0.6], "experiments": [{"revs": [
        {"name": grid.experiment_name("ssd", t), "rev": rev, "data": {
            "params": {"params.yaml": {"data": {"sample": {"configs": {"ssd": {"temperature": t}}}}}},
            "metrics": {}}} for t, rev in revs.items()]}]}]
    monkeypatch.chdir(root)
    cells = grid.cells(grid.experiments(exp_show), "ssd", "ssd-none")
    assert cells == {"ssd-none": {(0.6, 0.5): 0.25, (0.6, 0.9): 0.125, (1.2, 0.5): 0.75, (1.2, 0.9): 0.375},
                     "base": {(0.6, 0.5): 0.5, (0.6, 0.9): 0.25, (1.2, 0.5): 0.5, (1.2, 0.9): 0.25}}


@pytest.mark.slow
def test_grid_runs_dvc_experiments_and_plots_them(tmp_path, tiny_model):
    ssd = default_params().sample.configs["ssd"].model_dump()
    root = make_workspace(tmp_path / "ws", tiny_model, {
        "arms": {"ssd-none": {"sample": "ssd", "filter": "none"}}, "sample": {"configs": {"ssd": ssd}},
        "train": {"max_length": 2048}, "diagnose": {"max_problems": 1}})
    grid = subprocess.run([sys.executable, "-m", "tasks.commands.cli", "grid", "--t-train", "0.6,1.2",
                           "--t-eval", "0.5,0.9"], cwd=root, env=stage_env(root), capture_output=True, text=True)
    assert grid.returncode == 0, grid.stdout[-3000:] + grid.stderr[-3000:]

    table = json.loads((root / "grid/grid.json").read_text())
    assert table["experiments"] == ["grid-ssd-T0.6", "grid-ssd-T1.2"]
    cells = {(c["t_train"], c["t_eval"]): c for c in table["cells"]}
    assert set(cells) == {(0.6, 0.5), (0.6, 0.9), (1.2, 0.5), (1.2, 0.9)}
    assert cells[(1.2, 0.9)]["t_eff"] == pytest.approx(1.08)
    assert all(0 <= c["pass@1"] <= 1 for c in cells.values())
    # The base model is the same in both experiments (its stages restored from DVC's run cache):
    # its validation pass@1 at a T_eval does not depend on the row.
    for t_eval in (0.5, 0.9):
        assert cells[(0.6, t_eval)]["base_pass@1"] == cells[(1.2, t_eval)]["base_pass@1"] is not None
    for name in ("heatmap.png", "t_eff.png"):
        assert (root / "grid" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 0.6 |" in (root / "grid/grid.md").read_text()

    # They are DVC experiments: `dvc exp show` lists them with the T_train each ran at.
    shown = json.loads(subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], cwd=root,
                                      env=stage_env(root), capture_output=True, text=True, check=True).stdout)
    temps = {rev["name"]: rev["data"]["params"]["params.yaml"]["data"]["sample"]["configs"]["ssd"]["temperature"]
             for commit in shown for group in commit.get("experiments") or [] for rev in group["revs"]}
    assert temps == {"grid-ssd-T0.6": 0.6, "grid-ssd-T1.2": 1.2}
    # The sampling temperature reached the samples: the two experiments trained on different data.
    locks = {}
    for name in temps:
        lock = subprocess.run(["git", "show", f"refs/exps/{name}:dvc.lock"], cwd=root, capture_output=True, text=True)
        if lock.returncode:  # refs/exps/<baseline>/<name>: find it
            ref = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], cwd=root,
                                 capture_output=True, text=True, check=True).stdout.split()
            ref = next(r for r in ref if r.endswith("/" + name))
            lock = subprocess.run(["git", "show", f"{ref}:dvc.lock"], cwd=root, capture_output=True, text=True,
                                  check=True)
        import yaml

        stages = yaml.safe_load(lock.stdout)["stages"]
        locks[name] = next(o["md5"] for o in stages["sample@ssd"]["outs"])
    assert locks["grid-ssd-T0.6"] != locks["grid-ssd-T1.2"]


def test_grid_without_experiments_says_what_to_run(tmp_path, tiny_model):
    root = make_workspace(tmp_path / "ws", tiny_model)
    proc = subprocess.run([sys.executable, "-m", "tasks.commands.cli", "grid", "--plot-only"], cwd=root,
                          env=stage_env(root), capture_output=True, text=True)
    assert proc.returncode == 2 and "no finished grid-* experiment" in proc.stderr and "Traceback" not in proc.stderr
