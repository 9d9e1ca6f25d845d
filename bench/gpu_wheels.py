"""Wheels for `make gpu-smoke-offline`: everything bench/gpu_smoke.py needs that a GPU machine with
only torch and transformers (and no package index) lacks, for that machine's Python and platform.

    python bench/gpu_wheels.py --python-version 3.12 --torch 2.11.0 --transformers 5.17.0 -o .whl

pip resolves two sets for the target (`pip install --dry-run --report`, nothing installed here):
what the machine has (torch and transformers at its versions, with their dependencies) and that
plus bench/gpu-smoke-requirements.txt. The difference is downloaded, one pinned wheel each
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
REQUIREMENTS = REPO / "bench" / "gpu-smoke-requirements.txt"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "linux_x86_64")


def target_args(python_version: str) -> list[str]:
    args = ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp"]
    for platform in PLATFORMS:
        args += ["--platform", platform]
    return args


def resolve(requirements: list[str], python_version: str) -> dict[str, str]:
    """name -> version of what pip would install for the target, dependencies included."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--report", str(report), "--target", str(Path(tmp) / "t"), *target_args(python_version),
               *requirements]
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

    lines = [line.split("#")[0].strip() + ("  no-deps" if "# no-deps" in line else "")
             for line in REQUIREMENTS.read_text().splitlines()]
    resolved = [line for line in lines if line and not line.endswith("no-deps")]
    as_is = [line.removesuffix("no-deps").strip() for line in lines if line.endswith("no-deps")]
    preinstalled = [f"torch=={args.torch}", f"transformers=={args.transformers}"]
    have = resolve(preinstalled, args.python_version)
    need = resolve([*preinstalled, *resolved], args.python_version)
    clash = {name: (have[name], version) for name, version in need.items() if name in have and have[name] != version}
    if clash:
        raise SystemExit("gpu-wheels: the requirements need other versions of packages the machine has: "
                         + ", ".join(f"{n} {a} -> {b}" for n, (a, b) in sorted(clash.items())))
    missing = sorted((name, version) for name, version in need.items() if name not in have)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
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
