"""Wheels for `make gpu-smoke-offline`: everything bench/gpu_smoke.py needs that a GPU machine with
only torch and transformers (and no package index) lacks, for that machine's Python and platform.

    python bench/gpu_wheels.py --python-version 3.12 --torch 2.11.0 --transformers 5.17.0 -o .whl

pip resolves two sets for the target (`pip install --dry-run --report`, nothing installed here):
what the machine has (torch and transformers at its versions, with their dependencies) and that
plus bench/gpu-smoke-requirements.txt, what the machine lacks constrained to the versions
requirements/lock.txt pins. The difference is downloaded, one pinned wheel each
(--no-deps), with the requirements marked `no-deps` as they are. It refuses when the requirements would need another version of something the machine
already has (installing it offline would break torch or transformers there).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tasks.core.stack import LOCK, canonical, read_lock  # noqa: E402  (stdlib only: runs on any Python)

LOCK = REPO / LOCK
REQUIREMENTS = REPO / "bench" / "gpu-smoke-requirements.txt"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "linux_x86_64")


def target_args(python_version: str) -> list[str]:
    args = ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp"]
    for platform in PLATFORMS:
        args += ["--platform", platform]
    return args


def resolve(requirements: list[str], python_version: str, pinned: dict[str, str] | None = None,
            find_links: Path | None = None) -> dict[str, str]:
    """name -> version of what pip would install for the target, dependencies included; `pinned`
    (name -> version) constrains those packages to the versions the project's lock tested."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        constraints = Path(tmp) / "constraints.txt"
        constraints.write_text("".join(f"{name}=={version}\n" for name, version in sorted((pinned or {}).items())))
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--report", str(report), "--target", str(Path(tmp) / "t"), *target_args(python_version),
               "-c", str(constraints), *(["--find-links", str(find_links)] if find_links else []), *requirements]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"gpu-wheels: pip cannot resolve {' '.join(requirements)} for Python "
                             f"{python_version}:\n{proc.stderr[-3000:]}")
        installs = json.loads(report.read_text())["install"]
    return {item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"] for item in installs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python-version", required=True, help="the GPU machine's Python, e.g. 3.12")
    parser.add_argument("--torch", required=True, help="the torch version installed there, e.g. 2.11.0")
    parser.add_argument("--transformers", required=True, help="the transformers version installed there")
    parser.add_argument("-o", "--out", default=".whl")
    args = parser.parse_args(argv)

    text = REQUIREMENTS.read_text().splitlines()
    lines = [line.split("#")[0].strip() + ("  no-deps" if "# no-deps" in line else "") for line in text]
    resolved = [line for line in lines if line and not line.endswith("no-deps")]
    as_is = [line.removesuffix("no-deps").strip() for line in lines if line.endswith("no-deps")]
    # Pure-Python packages PyPI ships only as sources: built into wheels here, for the target to resolve.
    built = [line.split("#")[0].strip() for line in text if "# build-wheel" in line]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if built:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), *built], check=True)
    preinstalled = [f"torch=={args.torch}", f"transformers=={args.transformers}"]
    have = resolve(preinstalled, args.python_version)
    # What the machine lacks comes at the versions requirements/lock.txt tested: that is what the
    # records name, and pip's resolver, free to choose, backtracks through DVC's dependency graph
    # until it gives up (resolution-too-deep).
    pinned = {name: version for name, version in read_lock(LOCK).items() if name not in map(canonical, have)}
    need = resolve([*preinstalled, *resolved], args.python_version, pinned, find_links=out)
    clash = {name: (have[name], version) for name, version in need.items() if name in have and have[name] != version}
    if clash:
        raise SystemExit("gpu-wheels: the requirements need other versions of packages the machine has: "
                         + ", ".join(f"{n} {a} -> {b}" for n, (a, b) in sorted(clash.items())))
    built_names = {canonical(b.split("==")[0]) for b in built}
    missing = sorted((name, version) for name, version in need.items()
                     if name not in have and canonical(name) not in built_names)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(out),
           *target_args(args.python_version), *[f"{name}=={version}" for name, version in missing], *as_is]
    subprocess.run(cmd, check=True)
    size = sum(f.stat().st_size for f in out.glob("*.whl"))
    print(f"gpu-wheels: {len(missing) + len(as_is)} wheels, {size / 2 ** 20:.1f} MiB in {out}/ for Python {args.python_version} "
          f"next to torch {args.torch} and transformers {args.transformers}:")
    print("  " + " ".join([f"{name}=={version}" for name, version in missing] + as_is))
    return 0


if __name__ == "__main__":
    sys.exit(main())
