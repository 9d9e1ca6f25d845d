"""`selfdistill plan [--profile NAME|FILE] [--set KEY=VALUE ...]`: what each stage will cost, before
anything runs.

For the current params (or params.yaml with a profile and overrides applied, nothing written):
per stage the problems x samples, the tokens to decode at most, the memory by component at its
peak, the disk it writes, and the time at stated throughputs; then the run's totals. It needs no
data and no model on this machine (the model's config.json from a local dir or the Hugging Face
cache, else the shipped table of the paper's models), so a GPU run can be planned on a laptop
with `--gpu-memory 80`. Exit 1, naming the param to change, when a stage does not fit its
device: the GPU (`--gpu-memory`, default: the visible GPU's; 0: no GPU) or, for what runs on the
CPU, RAM (`--ram`, default: this machine's).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import yaml

from tasks.core.config import PARAMS_FILE, validate_params
from tasks.core.plan import GiB, Machine, StagePlan, dvc_cache_type, plan, refusals, total_disk, total_seconds
from tasks.core.profiles import update_params_file
from tasks.core.shapes import model_shape

DEFAULT_PROMPT_TOKENS = 1024


def visible_gpu_memory() -> float | None:
    """Bytes of memory of the first GPU torch sees, or None (no NVIDIA driver, no CUDA torch)."""
    if shutil.which("nvidia-smi") is None:
        return None  # no driver: no need to import torch to know
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None


def machine_ram() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def detect_machine(gpu_memory: float | None = None, ram: float | None = None, cores: int | None = None) -> Machine:
    """The machine to plan for: GiB given, else this one's (gpu_memory 0: no GPU)."""
    gpu = visible_gpu_memory() if gpu_memory is None else gpu_memory * GiB if gpu_memory > 0 else None
    return Machine(gpu=gpu, ram=ram * GiB if ram else machine_ram(), cores=cores or os.cpu_count() or 1)


def load_for_plan(path: str | os.PathLike, profile: str | None = None, overrides: list[str] = ()):
    """The params to plan (problem files may be missing yet: the plan only counts them)."""
    path = Path(path)
    if profile or overrides:
        from tasks.commands.profile import profile_path

        return update_params_file(path, list(overrides), profile=profile_path(profile) if profile else None,
                                  write=False, require_files=False)
    with open(path) as f:
        return validate_params(yaml.safe_load(f) or {}, str(path), path.parent, require_files=False)


def gib(n: float) -> str:
    return f"{n / GiB:,.1f} GiB" if n >= GiB / 10 else f"{n / 2 ** 20:,.0f} MiB"


def duration(seconds: float) -> str:
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:,.1f} h"
    return f"{seconds / 60:,.0f} min" if seconds >= 120 else f"{seconds:,.0f} s"


def render_stage(stage: StagePlan, machine: Machine) -> list[str]:
    each = " (each)" if len(stage.stages) > 1 else ""
    lines = [f"{', '.join(stage.stages)}{each}: {stage.engine}"]
    lines += [f"  {line}" for line in stage.work]
    if stage.memory:
        need, phase = stage.peak()
        where = "GPU memory" if stage.device == "gpu" else "RAM"
        verdict = "fits" if stage.fits(machine) else "DOES NOT FIT"
        peak = f"{gib(need)} at its peak{f' ({phase})' if phase else ''}"
        if stage.share < 1:  # vLLM takes its share of the GPU and needs part of it
            lines.append(f"  memory: vLLM takes {gib(stage.budget(machine))} ({stage.share:g} of the GPU) and needs "
                         f"{peak} of it: {verdict}")
        else:
            lines.append(f"  memory: {peak}, {gib(stage.budget(machine))} of {where}: {verdict}")
        for part in stage.memory:
            when = f"  [{', '.join(part.phases)}]" if part.phases else ""
            lines.append(f"    {gib(part.bytes):>11}  {part.label}{when}")
        if not stage.fits(machine):
            lines.append(f"  -> set {stage.fix}")
    lines += [f"  note: {note}" for note in stage.notes]
    if stage.rate:
        time = duration(stage.seconds) if stage.seconds is not None else "? (a count is not known)"
        lines.append(f"  time: {time}{each} at {stage.rate}")
    for disk in stage.disk:
        lines.append(f"  disk: {gib(disk.bytes)}{each}  {disk.label}")
    return lines


def render(plans: list[StagePlan], machine: Machine, shape, what: str, prompt_tokens: int, workspace: Path) -> str:
    gpu = f"GPU {gib(machine.gpu)}" if machine.gpu else "no GPU (every stage on the CPU)"
    lines = [f"selfdistill plan: {what}",
             f"model: {shape.name}: {shape.describe()}",
             f"  shape from {shape.source}",
             f"machine: {gpu}, RAM {gib(machine.ram)}, {machine.cores} cores; longest prompt {prompt_tokens:,} tokens "
             "(assumed: --prompt-tokens)", ""]
    for stage in plans:
        lines += render_stage(stage, machine) + [""]
    seconds, complete = total_seconds(plans)
    cache = dvc_cache_type(workspace)
    lines.append(f"total: {duration(seconds)}{'' if complete else ' and more (some counts are not known)'} of stages "
                 f"run one after another; disk {gib(total_disk(plans))} (DVC cache.type {cache}: "
                 f"{'links, no second copy' if cache.split(',')[0] in ('hardlink', 'symlink') else 'counted as copies'}"
                 "; one arm's training checkpoints at a time)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="selfdistill plan", description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    parser.add_argument("--profile", help="plan params.yaml with this profile applied (a name in profiles/ or a file)")
    parser.add_argument("--set", action="append", dest="overrides", default=[], metavar="KEY=VALUE",
                        help="also set a param, after the profile (repeatable)")
    parser.add_argument("--params", default=str(PARAMS_FILE), help="the params file (default: params.yaml)")
    parser.add_argument("--gpu-memory", type=float, metavar="GIB",
                        help="one GPU's memory in GiB (default: the visible GPU's; 0: plan without a GPU)")
    parser.add_argument("--ram", type=float, metavar="GIB", help="RAM in GiB (default: this machine's)")
    parser.add_argument("--cores", type=int, help="CPU cores (default: this machine's); CPU rates scale with them")
    parser.add_argument("--prompt-tokens", type=int, default=DEFAULT_PROMPT_TOKENS,
                        help=f"the longest prompt, in tokens (default: {DEFAULT_PROMPT_TOKENS})")
    parser.add_argument("--sample-tps", type=float, help="decoding tokens/s of this model (default: measured rates)")
    parser.add_argument("--train-tps", type=float, help="training answer tokens/s (default: measured rates)")
    args = parser.parse_args(argv)
    params = load_for_plan(args.params, args.profile, args.overrides)
    workspace = Path(args.params).parent
    machine = detect_machine(args.gpu_memory, args.ram, args.cores)
    shape = model_shape(params.model.base, params.model.revision, workspace)
    plans = plan(params, shape, machine, args.prompt_tokens, workspace, args.sample_tps, args.train_tps)
    what = args.params + (f" with profile {args.profile}" if args.profile else "") + \
        (f" and {' '.join(args.overrides)}" if args.overrides else "")
    print(render(plans, machine, shape, what, args.prompt_tokens, workspace))
    refused = refusals(plans, machine)
    for line in refused:
        print(f"selfdistill plan: {line}", file=sys.stderr)
    return 1 if refused else 0
