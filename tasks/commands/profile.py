"""`selfdistill profile NAME|PATH [--set key=value ...]`: write a profile's keys into params.yaml.

A profile (profiles/NAME.yaml) holds only the keys it changes; params.yaml holds every default.
The result is validated first and written atomically with params.yaml's comments kept, so a bad
profile changes nothing. `git diff params.yaml` shows what it did; `git checkout params.yaml`
undoes it.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from tasks.core.config import PARAMS_FILE, ParamsError, update_params_file

PROFILES_DIR = Path("profiles")


def profile_path(name: str) -> Path:
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    path = PROFILES_DIR / f"{name}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))) or "none"
        raise ParamsError(f"profile {name!r}: no {path} (profiles here: {known})")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="selfdistill profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("profile", help="a name in profiles/ (tiny, gpu) or a YAML file")
    parser.add_argument("--set", action="append", dest="overrides", default=[], metavar="KEY=VALUE",
                        help="also set a param, after the profile (repeatable)")
    parser.add_argument("--params", default=str(PARAMS_FILE), help="the params file to update (default: params.yaml)")
    args = parser.parse_args(argv)
    path = profile_path(args.profile)
    update_params_file(args.params, args.overrides, profile=path)
    print(f"{args.params}: applied {path}" + (f" and {' '.join(args.overrides)}" if args.overrides else ""))
    return 0
