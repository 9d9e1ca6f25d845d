"""`selfdistill grid`: the T_train x T_eval grid as DVC experiments, a heatmap of it and pass@1
against T_eff = T_train x T_eval (the paper: performance follows T_eff).

    selfdistill grid --t-train 0.6,0.8,1.0 --t-eval 0.5,0.7,0.9    # queue, run, plot
    selfdistill grid --t-train 0.6,0.8,1.0 --t-eval 0.5,0.7,0.9 --queue-only
    selfdistill grid --plot-only                                    # plot the finished ones

One experiment per T_train (`dvc exp run --queue -S sample.configs.<config>.temperature=T
-S evaluate.sweep=[T_eval...]`, named grid-<config>-T<T>): each model is decoded on the
validation set at every T_eval of the grid by the evaluate stage's sweep, so a T_train costs one
training run, not one per cell. The other arms and the base model are unchanged by the override:
DVC's run cache restores them instead of rerunning. The cells are validation pass@1 (the only
split decoded at every T_eval), read from each experiment's commit (eval/<model>/metrics.json, an
out DVC leaves to git); `dvc exp show` lists the experiments, with their headline metrics.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tasks.core import paths
from tasks.core.config import PARAMS_FILE, ParamsError, load_params, named
from tasks.core.files import DataError, write_json, write_text
from tasks.core.profiles import update_params_file

PREFIX = "grid-"


def temperatures(text: str) -> list[float]:
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated temperatures, e.g. 0.6,0.8,1.0") from None
    if not values or any(t < 0 for t in values):
        raise argparse.ArgumentTypeError(f"{text!r}: one or more temperatures, none below 0")
    return values


def dvc(*args: str, capture: bool = False) -> str:
    # The queue's workers are spawned as `dvc ...`: the venv running this command must be on PATH.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], env=env, text=True,
                          capture_output=capture)
    if proc.returncode:
        detail = (proc.stderr or "")[-2000:] if capture else ""
        raise DataError(f"dvc {' '.join(args)} failed (exit {proc.returncode}) {detail}".rstrip())
    return proc.stdout or ""


def experiment_name(config: str, t_train: float) -> str:
    return f"{PREFIX}{config}-T{t_train:g}"


def queue(config: str, t_train: list[float], t_eval: list[float], overrides: list[str]) -> list[str]:
    grid = {experiment_name(config, t): [f"sample.configs.{config}.temperature={t:g}",
                                         f"evaluate.sweep=[{','.join(f'{v:g}' for v in t_eval)}]", *overrides]
            for t in t_train}
    for sets in grid.values():  # DVC does not validate -S values: a bad one would fail in the queue
        update_params_file(PARAMS_FILE, sets, write=False)
    names = []
    for name, sets in grid.items():
        dvc("exp", "run", "--queue", "--name", name, *[arg for s in sets for arg in ("-S", s)])
        names.append(name)
        print(f"grid: queued {name}")
    return names


def experiments(exp_show: list[dict]) -> list[dict]:
    """The finished grid experiments of `dvc exp show --json`: name, commit, params and metrics data."""
    found = []
    for commit in exp_show:
        for group in commit.get("experiments") or []:
            for rev in group.get("revs") or []:
                if (rev.get("name") or "").startswith(PREFIX) and rev.get("data") and not rev.get("error"):
                    found.append({"name": rev["name"], "rev": rev["rev"],
                                  "params": rev["data"]["params"]["params.yaml"]["data"],
                                  "metrics": {path: m.get("data") for path, m in rev["data"]["metrics"].items()}})
    return found


def eval_metrics_at(rev: str, model: str) -> dict:
    """eval/<model>/metrics.json as the experiment commit `rev` holds it ({} where it has none)."""
    shown = subprocess.run(["git", "show", f"{rev}:./{paths.eval_metrics(model)}"], capture_output=True, text=True)
    return json.loads(shown.stdout) if shown.returncode == 0 else {}


def cells(found: list[dict], config: str, arm: str) -> dict[str, dict[tuple[float, float], float]]:
    """model -> {(T_train, T_eval): validation pass@1}, for the arm and for the base (whose T_train
    is that of the experiment: the same model in every row, a reference line)."""
    grid: dict[str, dict[tuple[float, float], float]] = {arm: {}, "base": {}}
    for exp in found:
        t_train = exp["params"]["sample"]["configs"][config]["temperature"]
        for model in (arm, "base"):
            metrics = eval_metrics_at(exp["rev"], model)
            by_t = (metrics.get("validation") or {}).get("pass@1_by_temperature") or {}
            for t_eval, value in by_t.items():
                grid[model][(float(t_train), float(t_eval))] = value
    return grid


def plot(config: str, arm: str, out: Path) -> dict:
    from tasks.analysis import plots

    found = experiments(json.loads(dvc("exp", "show", "--json", capture=True)))
    grid = cells(found, config, arm)
    if not grid[arm]:
        raise DataError(f"no finished {PREFIX}* experiment has eval/{arm}/metrics.json with a validation sweep "
                        "(run `selfdistill grid --t-train ... --t-eval ...` first; `dvc exp show` lists them)")
    plots.grid_heatmap(grid[arm], out / "heatmap.png", f"{arm}: validation pass@1")
    plots.pass_vs_t_eff(grid[arm], out / "t_eff.png", f"{arm}: validation pass@1 vs T_eff")
    rows = sorted(grid[arm])
    table = {"config": config, "arm": arm, "experiments": sorted(e["name"] for e in found),
             "cells": [{"t_train": a, "t_eval": b, "t_eff": round(a * b, 6), "pass@1": grid[arm][(a, b)],
                        "base_pass@1": grid["base"].get((a, b))} for a, b in rows]}
    write_json(out / "grid.json", table)
    t_eval = sorted({b for _, b in rows})
    lines = [f"# T_train x T_eval grid: {arm} (sampling config {config}), validation pass@1", "",
             "| T_train | " + " | ".join(f"T_eval={t:g}" for t in t_eval) + " |", "|---|" + "---|" * len(t_eval)]
    for a in sorted({a for a, _ in rows}):
        lines.append(f"| {a:g} | " + " | ".join(f"{grid[arm][(a, b)]:.3f}" if (a, b) in grid[arm] else "-"
                                                   for b in t_eval) + " |")
    best = max(rows, key=lambda c: grid[arm][c])
    lines += ["", f"Best cell: T_train={best[0]:g}, T_eval={best[1]:g} (T_eff={best[0] * best[1]:g}): "
                  f"{grid[arm][best]:.3f}.", "", "![heatmap](heatmap.png) ![pass@1 vs T_eff](t_eff.png)"]
    write_text(out / "grid.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="selfdistill grid", description=__doc__.split("\n\n")[0])
    parser.add_argument("--t-train", type=temperatures, help="T_train values, comma-separated")
    parser.add_argument("--t-eval", type=temperatures, help="T_eval values (each model's validation sweep; "
                        "evaluate.temperature, its tie-breaker, must be one, or be --set to one)")
    parser.add_argument("--config", default="ssd", help="the sampling config whose temperature varies (default: ssd)")
    parser.add_argument("--arm", help="the arm plotted (default: the first arm on --config)")
    parser.add_argument("--set", action="append", dest="overrides", default=[], metavar="KEY=VALUE",
                        help="more overrides for every experiment (dvc exp run -S)")
    parser.add_argument("--queue-only", action="store_true", help="queue the experiments; run them later "
                        "(`dvc exp run --run-all`, or `dvc queue start` with workers)")
    parser.add_argument("--plot-only", action="store_true", help="plot the finished grid experiments")
    parser.add_argument("-o", "--out", default="grid", help="where grid.md, grid.json and the PNGs go (default: grid/)")
    args = parser.parse_args(argv)

    params = load_params()
    named(params.sample.configs, args.config, "sample.configs")
    arm = args.arm or next((a for a, spec in params.arms.items() if spec.sample == args.config), None)
    if arm is None:
        raise ParamsError(f"arms: none samples from config {args.config!r}: nothing trains on the grid's T_train")
    if not args.plot_only:
        if not (args.t_train and args.t_eval):
            parser.error("--t-train and --t-eval are required (or --plot-only)")
        if not shutil.which("git") or not Path(".dvc").is_dir():
            raise DataError("run it in the project's git + DVC repo (experiments are commits of it)")
        queue(args.config, args.t_train, args.t_eval, args.overrides)
        if args.queue_only:
            print("grid: queued; run them with `dvc exp run --run-all`, then `selfdistill grid --plot-only`")
            return 0
        dvc("exp", "run", "--run-all", "--jobs", "1")
    plot(args.config, arm, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
