"""`selfdistill validate [PATH]`: check params.yaml (or PATH) against the schema before any work."""
from __future__ import annotations

import argparse

from tasks.core.config import PARAMS_FILE, load_params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="selfdistill validate", description=__doc__.split(": ", 1)[1])
    parser.add_argument("path", nargs="?", default=str(PARAMS_FILE), help="the params file (default: params.yaml)")
    params = load_params(parser.parse_args(argv).path)
    arms = ", ".join(f"{name} ({arm.sample} -> {arm.filter})" for name, arm in params.arms.items())
    print(f"params OK: arms {arms}")
    return 0
