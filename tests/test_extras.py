"""The optional extras resolve together with the pinned torch: what `pip install '.[vllm]'` picks."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


def test_the_vllm_extra_resolves_with_the_torch_pin(tmp_path):
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                           "--report", str(report), f"{REPO}[vllm]"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    picked = {item["metadata"]["name"].lower(): item["metadata"]["version"]
              for item in json.loads(report.read_text())["install"]}
    pyproject = (REPO / "pyproject.toml").read_text()
    torch_pin = re.search(r'"torch==([\d.]+)"', pyproject).group(1)
    vllm_pin = re.search(r'"vllm==([\d.]+)\.\*"', pyproject).group(1)
    assert picked["torch"].split("+")[0] == torch_pin
    assert picked["vllm"].startswith(vllm_pin + ".")
    # The transformers it brings is one the backends are checked under (test_backends.py).
    assert picked["transformers"] == "5.19.0", picked["transformers"]
