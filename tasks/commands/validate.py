"""`selfdistill validate [PATH]`: check params.yaml (or PATH) against the schema before any work, and warn
of any stage that will not fit this machine (`selfdistill plan`)."""
from __future__ import annotations

import argparse
from pathlib import Path

from tasks.core.config import PARAMS_FILE, ParamsError, load_params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="selfdistill validate", description=__doc__.split(": ", 1)[1])
    parser.add_argument("path", nargs="?", default=str(PARAMS_FILE), help="the params file (default: params.yaml)")
    path = parser.parse_args(argv).path
    params = load_params(path)
    arms = ", ".join(f"{name} ({arm.sample} -> {arm.filter})" for name, arm in params.arms.items())
    print(f"params OK: arms {arms}")
    warn_from_plan(params, Path(path).parent)
    return 0


def warn_from_plan(params, workspace: Path) -> None:
    """`selfdistill plan` on this machine: a warning per stage that will not fit (validate still passes)."""
    from tasks.commands.plan import DEFAULT_PROMPT_TOKENS, detect_machine
    from tasks.core.plan import plan, refusals
    from tasks.core.shapes import model_shape

    try:
        shape = model_shape(params.model.base, params.model.revision, workspace)
    except ParamsError as err:
        print(f"warning: no resource plan: {err}")
        return
    machine = detect_machine()
    for line in refusals(plan(params, shape, machine, DEFAULT_PROMPT_TOKENS, workspace), machine):
        print(f"warning: {line} (selfdistill plan shows each stage's memory)")
