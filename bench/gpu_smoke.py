"""The GPU smoke run: every stage of the embedded default on CUDA, timed, in a scratch workspace.

    make gpu-smoke                       # or: python bench/gpu_smoke.py [--profile profiles/gpu-smoke.yaml]

Runs the stage modules in dvc.yaml's order (no DVC, no Prefect: a GPU machine may have only torch
and transformers installed, the rest from wheels brought along: `make gpu-wheels`) in a copy of
this checkout under a temp dir, with profiles/gpu-smoke.yaml applied, then prints sampling and
training throughput and the report. Refuses to start without CUDA unless --allow-cpu (which the
tests use, with a tiny profile, to check the script itself).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

COPIED = ("tasks", "problems", "requirements", "params.yaml", "dvc.yaml")


def stage_commands(params) -> list[list[str]]:
    """dvc.yaml's stages, upstream first, for the profile's sampling configs and arms."""
    arms = list(params.arms)
    return ([["tasks.codeio"], ["tasks.model"], ["tasks.prepare"]] + [["tasks.sample", "--config", c] for c in params.sample.configs]
            + [["tasks.filter", "--arm", a] for a in arms] + [["tasks.train", "--arm", a] for a in arms]
            + [["tasks.evaluate", "--model", "models/base", "--name", "base"]]
            + [["tasks.evaluate", "--model", f"models/{a}", "--name", a] for a in arms]
            + [["tasks.publish", "--arm", a] for a in arms]
            + [["tasks.diagnose", "--model", "models/base", "--name", "base"]]
            + [["tasks.diagnose", "--model", f"models/{a}", "--name", a] for a in arms] + [["tasks.report"]])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default=str(REPO / "profiles" / "gpu-smoke.yaml"))
    parser.add_argument("--set", action="append", dest="overrides", default=[], metavar="KEY=VALUE")
    parser.add_argument("--workspace", help="keep the run here (default: a temp dir, removed)")
    parser.add_argument("--allow-cpu", action="store_true", help="run without CUDA (to test this script)")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available() and not args.allow_cpu:
        print("gpu-smoke: no CUDA device here (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    from tasks.core.config import update_params_file

    workspace = Path(args.workspace or tempfile.mkdtemp(prefix="selfdistill-gpu-smoke-"))
    for name in COPIED:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, workspace / name, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
        else:
            shutil.copy(src, workspace / name)
    params = update_params_file(workspace / "params.yaml", args.overrides, profile=args.profile)
    # The workspace's tasks/ first; packages installed with --target (make gpu-smoke-offline) stay.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(workspace), os.environ.get("PYTHONPATH")]))}
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    print(f"gpu-smoke: {device}; workspace {workspace}", flush=True)
    seconds = {}
    try:
        for command in stage_commands(params):
            name = " ".join(command).replace("tasks.", "")
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", *command], cwd=workspace, env=env, check=True)
            seconds[name] = time.perf_counter() - started
            print(f"gpu-smoke: {name}: {seconds[name]:.1f} s", flush=True)
        arm = next(iter(params.arms))
        config = params.arms[arm].sample
        sampled = sum(json.loads(line)["num_tokens"]
                      for line in (workspace / f"samples/{config}/samples.jsonl").read_text().splitlines())
        trained = json.loads((workspace / f"train/{arm}/stats.json").read_text())["answer_tokens"]
        print(f"\ngpu-smoke on {device}: sampling {sampled / seconds[f'sample --config {config}']:,.0f} tokens/s "
              f"({sampled:,} tokens, model load and self-check included); training {arm}: "
              f"{trained / seconds[f'train --arm {arm}']:,.0f} answer tokens/s ({trained:,} tokens); "
              f"all stages {sum(seconds.values()) / 60:.1f} min\n")
        print((workspace / "report/summary.md").read_text())
    finally:
        if not args.workspace:
            shutil.rmtree(workspace, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
