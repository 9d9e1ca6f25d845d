"""The GPU smoke run: `dvc repro` of the whole pipeline on the gpu-smoke profile, in a scratch
workspace, timed and measured.

    make gpu-smoke        # python bench/gpu_smoke.py [--profile FILE] [--set KEY=VALUE ...] [--workspace DIR]

What it does, in order:
- copies this checkout's pipeline (dvc.yaml, params.yaml, tasks/, problems/, requirements/) into a
  temp dir, applies the profile (profiles/gpu-smoke.yaml) and the --set values, and makes the copy
  a DVC repo of its own (`dvc init --no-scm`: no git needed, nothing of this checkout touched);
- switches sample.backend and evaluate.backend to `vllm` where vLLM imports and CUDA is present
  (the profile's `transformers` otherwise);
- prints `selfdistill plan`'s memory estimate per stage for this machine, then runs `dvc repro`
  with its output passed through, noting when each stage starts;
- meanwhile polls, every 0.2 s, the processes under `dvc repro` (/proc: each one's peak RSS,
  VmHWM) and, with nvidia-smi, the GPU memory in use: each stage's measured peak;
- prints a table per stage (seconds, measured peak RSS and GPU memory, the plan's estimate),
  sampling and training throughput (tokens over the stage's seconds: model load, self-check and
  DVC saving its outputs included), and the report.

Refuses to start without CUDA unless --allow-cpu (the tests run it so, on a tiny profile). Needs
DVC, which the wheels of `make gpu-wheels` bring (through dvclive) to a machine that has only
torch and transformers.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

COPIED = ("tasks", "problems", "requirements", "params.yaml", "dvc.yaml", ".dvcignore")
POLL_S = 0.2
MiB = 2**20
RUNNING = re.compile(r"Running stage '([^']+)'")


def vllm_importable() -> bool:
    return importlib.util.find_spec("vllm") is not None


def make_workspace(workspace: Path, profile: str, overrides: list[str], backend_overrides: list[str]):
    """The pipeline's files in `workspace`, the profile and overrides applied; returns the params."""
    from tasks.core.profiles import update_params_file

    for name in COPIED:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, workspace / name, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
        elif src.exists():
            shutil.copy(src, workspace / name)
    params = update_params_file(workspace / "params.yaml", backend_overrides + overrides, profile=profile)
    # Stage commands say `python -m ...`: this interpreter, also where only `python3` is on PATH. A
    # script, not a symlink: a venv's python found through a symlink elsewhere is not in its venv.
    bin_dir = workspace / ".smoke-bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python").chmod(0o755)
    return params


def children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # the process ended meanwhile
            continue
        ppid = int(text.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(stat.parent.name))
    return children


def descendants(pid: int) -> list[int]:
    children, found, todo = children_map(), [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def peak_rss(pid: int) -> int:
    """A process's peak resident set size so far (VmHWM), in bytes; 0 if it has ended."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def gpu_used() -> int | None:
    """Bytes of memory in use on the first GPU (nvidia-smi), or None where it cannot tell."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=10)
        return int(out.stdout.split()[0]) * MiB if out.returncode == 0 else None
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


class Monitor(threading.Thread):
    """Each stage's peak: the largest peak RSS of a process under `dvc repro`, and the most GPU
    memory in use (the GPU's idle use before the run is subtracted)."""

    def __init__(self, root_pid: int, gpu: bool):
        super().__init__(daemon=True)
        self.root_pid, self.gpu = root_pid, gpu
        self.idle_gpu = (gpu_used() or 0) if gpu else 0
        self.stage: str | None = None
        self.rss: dict[str, int] = {}
        self.gpu_peak: dict[str, int] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(POLL_S):
            stage = self.stage
            if stage is None:
                continue
            rss = max((peak_rss(pid) for pid in descendants(self.root_pid)), default=0)
            self.rss[stage] = max(self.rss.get(stage, 0), rss)
            if self.gpu and (used := gpu_used()) is not None:
                self.gpu_peak[stage] = max(self.gpu_peak.get(stage, 0), used - self.idle_gpu)


def plan_estimates(workspace: Path, params) -> tuple[dict[str, tuple[float, str]], str]:
    """`selfdistill plan`'s peak memory per stage on this machine, and a line saying what it planned
    for (or why there is no plan)."""
    try:
        from tasks.commands.plan import detect_machine
        from tasks.core.plan import plan
        from tasks.core.shapes import model_shape

        machine = detect_machine()
        shape = model_shape(params.model.base, params.model.revision, workspace)
        plans = plan(params, shape, machine, workspace=workspace)
    except Exception as err:  # noqa: BLE001 - the smoke run goes on; the table says the plan is missing
        return {}, f"plan: not available ({type(err).__name__}: {err})"
    estimates = {name: (stage.peak()[0], stage.device) for stage in plans for name in stage.stages}
    gpu = f"GPU {machine.gpu / 2**30:.1f} GiB" if machine.gpu else "no GPU"
    return estimates, f"plan: for this machine ({gpu}, RAM {machine.ram / 2**30:.1f} GiB, {machine.cores} cores)"


def run_dvc_repro(workspace: Path, env: dict, gpu: bool) -> tuple[int, dict[str, float], Monitor]:
    """`dvc repro` in the workspace, its output passed through; each stage's seconds (from its
    "Running stage" line to the next one's, or to the end) and the memory monitor."""
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=workspace, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    monitor = Monitor(proc.pid, gpu)
    monitor.start()
    seconds: dict[str, float] = {}
    started, pending = None, b""
    while chunk := proc.stdout.read1(65536):
        sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if match := RUNNING.search(line.decode(errors="replace")):
                now = time.perf_counter()
                if monitor.stage is not None:
                    seconds[monitor.stage] = now - started
                monitor.stage, started = match.group(1), now
    returncode = proc.wait()
    if monitor.stage is not None:
        seconds[monitor.stage] = time.perf_counter() - started
    monitor.done.set()
    monitor.join()
    return returncode, seconds, monitor


def gib(n: float | None) -> str:
    return "-" if not n else f"{n / 2**30:.2f} GiB"


def figures(workspace: Path, params, seconds: dict[str, float], monitor: Monitor,
            estimates: dict[str, tuple[float, str]], device: str) -> str:
    lines = [f"{'stage':<28}{'seconds':>9}{'peak RSS':>13}{'peak GPU':>13}   plan's estimate"]
    for stage, s in seconds.items():
        estimate = estimates.get(stage)
        planned = f"{gib(estimate[0])} ({estimate[1].upper()})" if estimate else "-"
        lines.append(f"{stage:<28}{s:>9.1f}{gib(monitor.rss.get(stage)):>13}{gib(monitor.gpu_peak.get(stage)):>13}   "
                     f"{planned}")
    lines.append("")
    for config in params.sample.configs:
        stages = [s for s in seconds if s == f"sample@{config}" or s.startswith(f"sample-shard@{config}-")]
        path = workspace / f"samples/{config}/samples.jsonl"
        if stages and path.exists():
            tokens = sum(json.loads(line)["num_tokens"] for line in path.read_text().splitlines())
            took = sum(seconds[s] for s in stages)
            lines.append(f"gpu-smoke on {device}: sampling {config} ({params.sample.backend}): "
                         f"{tokens / took:,.0f} tokens/s ({tokens:,} tokens in {took:.1f} s)")
    for arm in params.arms:
        path = workspace / f"train/{arm}/stats.json"
        if f"train@{arm}" in seconds and path.exists():
            tokens = json.loads(path.read_text())["answer_tokens"]
            took = seconds[f"train@{arm}"]
            lines.append(f"gpu-smoke on {device}: training {arm}: {tokens / took:,.0f} answer tokens/s "
                         f"({tokens:,} tokens in {took:.1f} s)")
    lines.append(f"gpu-smoke on {device}: all stages {sum(seconds.values()) / 60:.1f} min")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default=str(REPO / "profiles" / "gpu-smoke.yaml"))
    parser.add_argument("--set", action="append", dest="overrides", default=[], metavar="KEY=VALUE")
    parser.add_argument("--workspace", help="keep the run here, an empty or new dir (default: a temp dir, removed)")
    parser.add_argument("--allow-cpu", action="store_true", help="run without CUDA (to test this script)")
    args = parser.parse_args(argv)

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print("gpu-smoke: no CUDA device here (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name(0) if cuda else "CPU"
    use_vllm = cuda and vllm_importable()
    backends = ["sample.backend=vllm", "evaluate.backend=vllm"] if use_vllm else []

    workspace = Path(args.workspace or tempfile.mkdtemp(prefix="selfdistill-gpu-smoke-"))
    workspace.mkdir(parents=True, exist_ok=True)
    try:
        params = make_workspace(workspace, args.profile, args.overrides, backends)
        env = {**os.environ,
               "PATH": os.pathsep.join([str(workspace / ".smoke-bin"), os.environ.get("PATH", "")]),
               # The workspace's tasks/ first; packages installed with --target (make gpu-smoke-offline) stay.
               "PYTHONPATH": os.pathsep.join(filter(None, [str(workspace), os.environ.get("PYTHONPATH")]))}
        subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=workspace, env=env, check=True)
        print(f"gpu-smoke: {device}; workspace {workspace}; sampling and evaluation on "
              f"{params.sample.backend} / {params.evaluate.backend}"
              + ("" if use_vllm else " (vLLM " + ("does not import" if cuda else "needs CUDA") + ")"), flush=True)
        estimates, planned = plan_estimates(workspace, params)
        print(f"gpu-smoke: {planned}", flush=True)
        returncode, seconds, monitor = run_dvc_repro(workspace, env, cuda)
        print("\n" + figures(workspace, params, seconds, monitor, estimates, device) + "\n", flush=True)
        if returncode != 0:
            print(f"gpu-smoke: dvc repro exited with {returncode}", file=sys.stderr)
            return 1
        print(f"gpu-smoke: {planned}; peak RSS: the largest process under `dvc repro`, polled every {POLL_S} s")
        print((workspace / "report/summary.md").read_text())
    finally:
        if not args.workspace:
            shutil.rmtree(workspace, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
