"""The library stack a stage runs on, against the lock it should run on (requirements/lock.txt).

Every stage declares the lock as a DVC dep, so dvc.lock (and every run record) names the lock by
its hash. That claim holds only where the venv was installed from the lock (`make install`), so
each stage checks the installed versions against it at start and says which packages differ.

It also fingerprints what decides a resumable stage's content (`code_fingerprint`, `versions`):
the project code loaded in the process and the versions of the libraries that compute, so a
partial output or checkpoint of other code or another engine is never resumed.

`python -m tasks.core.stack [--against LOCK] [--exact]` prints the differences (exit 1 if any).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
import sysconfig
from importlib.metadata import PackageNotFoundError, distributions, version
from pathlib import Path

LOCK = Path("requirements/lock.txt")
PROJECT = "selfdistill"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path = LOCK) -> dict[str, str]:
    """name -> pinned version, for every `name==version` line of a pip-compile lock."""
    pins = {}
    for line in Path(path).read_text().splitlines():
        match = _PIN.match(line)
        if match:
            pins[canonical(match.group(1))] = match.group(2)
    return pins


def installed() -> dict[str, str]:
    """name -> version of what is installed: in this environment's site-packages and in the
    PYTHONPATH dirs (`pip install --target`). Not every distribution on sys.path: setuptools puts
    its vendored copies (packaging, wheel, ...) there once imported (torch's extension builder
    imports it), and those are not installed."""
    pythonpath = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    site = dict.fromkeys([*pythonpath, *(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))])
    found = {}
    for dist in distributions(path=list(site)):
        name = dist.metadata["Name"]
        if name:
            found.setdefault(canonical(name), dist.version)
    return found


def differences(lock: dict[str, str], found: dict[str, str], exact: bool = False) -> list[str]:
    """What `found` (installed versions) does differently from `lock`; with `exact`, packages
    installed but not locked count too (the project itself excepted)."""
    lines = []
    for name, pinned in sorted(lock.items()):
        if name not in found:
            lines.append(f"{name}: locked {pinned}, not installed")
        elif found[name] != pinned:
            lines.append(f"{name}: locked {pinned}, installed {found[name]}")
    if exact:
        lines += [f"{name}: installed {version}, not in the lock"
                  for name, version in sorted(found.items()) if name not in lock and name != PROJECT]
    return lines


def versions(*packages: str) -> dict[str, str | None]:
    """The installed version of each package (None where it is not installed)."""
    found = {}
    for package in packages:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def code_fingerprint(*dirs: Path) -> dict[str, str]:
    """sha256 of every module file loaded in this process from under `dirs` (and the C++ source
    beside a module that compiles it), by path relative to the repo: the code that runs. A file
    that was never imported (another backend, say) does not count."""
    repo = Path(__file__).resolve().parents[2]
    roots = [Path(d).resolve() for d in dirs]
    files = set()
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if file and file.endswith(".py"):
            path = Path(file).resolve()
            if any(path.is_relative_to(root) for root in roots):
                files.add(path)
                if path.with_suffix(".cpp").is_file():
                    files.add(path.with_suffix(".cpp"))
    return {p.relative_to(repo).as_posix() if p.is_relative_to(repo) else str(p):
            hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(files)}


def lock_sha256(path: Path = LOCK) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def describe(path: Path = LOCK) -> dict:
    """The stack in one record: the lock's path and hash, and how this environment differs."""
    if not Path(path).is_file():
        return {"lock": None, "differs": ["no lock file at " + str(path)]}
    return {"lock": str(path), "lock_sha256": lock_sha256(path),
            "differs": differences(read_lock(path), installed())}


def warn_if_off_lock(path: Path | None = None) -> None:
    """One warning when the stage does not run on the stack its dvc.lock entry will name."""
    path = path or LOCK
    stack = describe(path)
    if stack["differs"]:
        shown = "; ".join(stack["differs"][:5]) + ("; ..." if len(stack["differs"]) > 5 else "")
        print(f"warning: this environment is not {path} ({len(stack['differs'])} difference(s): {shown}); "
              "dvc.lock will name the lock all the same. `make install` installs exactly it.", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.core.stack", description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", type=Path, default=LOCK, help="the lock file (default: %(default)s)")
    parser.add_argument("--exact", action="store_true", help="packages installed but not locked count too")
    args = parser.parse_args(argv)
    lines = differences(read_lock(args.against), installed(), exact=args.exact)
    for line in lines:
        print(line)
    print(f"{len(lines)} difference(s) from {args.against}")
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main())
