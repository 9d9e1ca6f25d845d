"""`selfdistill profile NAME|PATH [--set key=value ...]`: write a profile's keys into params.yaml.

A profile (profiles/NAME.yaml) holds only the keys it changes; params.yaml holds every default.
The result is validated first and written atomically with params.yaml's comments kept, so a bad
profile changes nothing. `git diff params.yaml` shows what it did; `git checkout params.yaml`
undoes it. Problem files the profile names may not exist yet (they are made by
`selfdistill problems ...` after the profile is chosen): it is applied anyway, and each missing
file is listed with the command that makes it; the stages refuse to run until it exists.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from tasks.core.config import PARAMS_FILE, ParamsError, missing_problem_files
from tasks.core.profiles import update_params_file

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
    params = update_params_file(args.params, args.overrides, profile=path, require_files=False)
    print(f"{args.params}: applied {path}" + (f" and {' '.join(args.overrides)}" if args.overrides else ""))
    missing = missing_problem_files(params, Path(args.params).parent)
    if missing:
        print("Not there yet (the stages refuse to run until they are):")
        for key, file in missing:
            print(f"  {key}: {file}; make it with:\n    {command_making(file, path)}")
    return 0


def command_making(file: str, profile: Path) -> str:
    """The `selfdistill problems ... -o FILE` command the profile's comments give for `file`, else
    the generic one."""
    for line in profile.read_text().splitlines():
        comment = line.partition("#")[2].strip()
        if comment.startswith("selfdistill problems") and re.search(rf"-o {re.escape(file)}(\s|$)", comment):
            return comment
    return f"selfdistill problems import --format rstar-coder|livecodebench SRC -o {file}   (docs/problems.md)"
