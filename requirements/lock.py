"""Regenerate the lock files (`make lock`): exact versions with sha256 hashes, for CPython 3.11 on
Linux x86_64 (this project's machines), resolved by pip-tools from pyproject.toml.

- requirements/lock.txt: everything `make install` puts in the venv: the project's dependencies
  with its dev and docker extras, then the packages of requirements/no-deps.in (installed without
  their dependencies, which the project does not use).
- requirements/transformers-<X>.txt: the project's dependencies (and the dev extra: pytest) with
  transformers pinned at X, one file per version the project claims (pyproject's lower bound; the
  version the vllm extra brings): tests/test_backends.py builds a venv of its own from each and
  runs the backends' self-checks and the training equivalence tests there.

Run it after changing a dependency in pyproject.toml or to take newer releases (then `make test`
on the result before committing it). `make test-latest` shows what the newest releases would change.
"""
from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements" / "lock.txt"
NO_DEPS = REPO / "requirements" / "no-deps.in"
TESTED_TRANSFORMERS_EXTRA = "5.19.0"  # what `pip install '.[vllm]'` brings (tests/test_extras.py)


def lowest_transformers() -> str:
    return re.search(r'"transformers>=([\d.]+),', (REPO / "pyproject.toml").read_text()).group(1)


def transformers_lock(version: str) -> Path:
    return REPO / "requirements" / f"transformers-{version}.txt"


def pip_compile(out: Path, *args: str, pins: str = "") -> None:
    """pip-compile pyproject.toml (and `pins`, requirement lines read from stdin) into `out`."""
    cmd = [sys.executable, "-m", "piptools", "compile", "--quiet", "--generate-hashes", "--allow-unsafe",
           "--strip-extras", "--no-emit-index-url", "--no-emit-find-links", "--no-emit-trusted-host",
           "--newline", "lf", "--output-file", str(out.relative_to(REPO)), *args, "pyproject.toml"]
    cmd += ["-"] if pins else []
    print("lock:", " ".join(cmd[1:]), f"< {pins!r}" if pins else "", flush=True)
    subprocess.run(cmd, cwd=REPO, check=True, input=pins, text=True)


def no_deps_entries() -> str:
    """requirements/no-deps.in's pins with the sha256 of the file pip picks for this platform."""
    pins = [line.split("#")[0].strip() for line in NO_DEPS.read_text().splitlines()]
    pins = [p for p in pins if p]
    lines = ["# Installed with --no-deps (from requirements/no-deps.in): only their files are used."]
    with tempfile.TemporaryDirectory() as tmp:
        for pin in pins:
            if "==" not in pin:
                raise SystemExit(f"{NO_DEPS}: {pin!r} is not pinned with ==")
            before = set(Path(tmp).iterdir())
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, pin], check=True)
            (file,) = set(Path(tmp).iterdir()) - before
            digest = hashlib.sha256(file.read_bytes()).hexdigest()
            lines += [f"{pin} \\", f"    --hash=sha256:{digest}"]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upgrade", action="store_true", help="take the newest allowed releases (default: keep "
                        "the current pins where they still satisfy pyproject.toml)")
    args = parser.parse_args()
    upgrade = ["--upgrade"] if args.upgrade else []
    pip_compile(LOCK, "--extra", "dev", "--extra", "docker", *upgrade)
    LOCK.write_text(LOCK.read_text() + no_deps_entries())
    for version in (lowest_transformers(), TESTED_TRANSFORMERS_EXTRA):
        pip_compile(transformers_lock(version), "--extra", "dev", *upgrade, pins=f"transformers=={version}\n")
    print(f"lock: wrote {LOCK.relative_to(REPO)} and the transformers locks; now run `make test`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
