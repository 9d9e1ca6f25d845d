"""`make gpu-smoke`: `dvc repro` of a profile in a scratch workspace with its figures (run here on
CPU with --allow-cpu and the tiny profile), and the wheels it needs cut into parts and joined."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import wheel_parts  # noqa: E402


@pytest.mark.slow
def test_make_gpu_smoke_runs_dvc_repro_and_prints_its_figures(tmp_path, tiny_model):
    workspace = tmp_path / "smoke"
    args = ["--allow-cpu", "--profile", str(REPO / "profiles/tiny.yaml"), "--workspace", str(workspace),
            "--set", f"model.base={tiny_model}", "--set", "train.max_length=2048",  # byte-level tokenizer: long prompts
            # One config and arm: the tiny random model at T 1.0 (`null`) may write nothing a healthy model would.
            "--set", 'arms={"ssd-none": {"sample": "ssd", "filter": "none"}}',
            "--set", 'sample.configs={"ssd": {"temperature": 0.8, "top_k": 20, "top_p": 0.8, "min_p": 0.0}}',
            # As profiles/gpu-smoke.yaml decodes where vLLM does not import.
            "--set", "sample.backend=transformers", "--set", "evaluate.backend=transformers"]
    # -o: the venv's install stamp counts as done (the test runs in the venv it would install).
    run = subprocess.run(["make", "-o", ".venv/.installed-lock", "gpu-smoke", f"BIN={Path(sys.executable).parent}",
                          f"GPU_SMOKE_ARGS={shlex.join(args)}"], cwd=REPO, capture_output=True, text=True,
                         timeout=1800)
    out = run.stdout
    assert run.returncode == 0, out[-4000:] + run.stderr[-3000:]
    # dvc repro ran every stage of dvc.yaml in the scratch workspace and recorded them.
    assert {"codeio", "prepare", "sample@ssd", "train@ssd-none", "evaluate@ssd-none", "report"} <= set(
        re.findall(r"Running stage '([^']+)'", out))
    assert (workspace / "dvc.lock").is_file() and (workspace / "report/summary.md").is_file()
    # The figures: tokens/s of sampling and training, and per stage its measured peak beside the plan's.
    assert re.search(r"gpu-smoke on CPU: sampling ssd \(transformers\): [\d,]+ tokens/s", out), out[-3000:]
    assert re.search(r"gpu-smoke on CPU: training ssd-none: [\d,]+ answer tokens/s", out)
    assert "gpu-smoke: plan: for this machine (no GPU" in out
    row = re.search(r"^train@ssd-none +[\d.]+ +([\d.]+) GiB +- +([\d.]+) GiB \(CPU\)$", out, re.M)
    assert row and float(row.group(1)) > 0.05 and float(row.group(2)) > 0, out[-3000:]
    assert "(vLLM needs CUDA)" in out and "# selfdistill report" in out


def test_wheel_parts_join_into_the_same_wheels_and_name_a_missing_or_damaged_part(tmp_path, capsys):
    import random

    wheels = tmp_path / "whl"
    wheels.mkdir()
    rng = random.Random(0)
    for name, size in (("a-1.0-py3-none-any.whl", 700_000), ("b-2.0-py3-none-any.whl", 50_000)):
        (wheels / name).write_bytes(rng.randbytes(size))
    parts = tmp_path / "parts"
    assert wheel_parts.main(["split", str(wheels), "-o", str(parts), "--part-mib", "0.25"]) == 0
    cut = sorted(parts.glob("part-*"))
    assert len(cut) == 3 and all(p.stat().st_size <= 0.25 * 2**20 for p in cut)
    assert wheel_parts.main(["join", str(parts), "-o", str(tmp_path / "joined")]) == 0
    for wheel in wheels.iterdir():
        assert (tmp_path / "joined" / wheel.name).read_bytes() == wheel.read_bytes()

    damaged = bytearray(cut[1].read_bytes())
    damaged[10] ^= 1
    cut[1].write_bytes(bytes(damaged))
    with pytest.raises(SystemExit, match="part-001: damaged"):
        wheel_parts.join(parts, tmp_path / "again")
    cut[2].unlink()
    cut[1].write_bytes(bytes(damaged[:10]) + bytes([damaged[10] ^ 1]) + bytes(damaged[11:]))
    with pytest.raises(SystemExit, match="part-002: missing"):
        wheel_parts.join(parts, tmp_path / "again")
    assert not (tmp_path / "again").exists()  # nothing unpacked unless every part checks
    with pytest.raises(SystemExit, match="at most 64"):
        wheel_parts.main(["split", str(wheels), "-o", str(parts), "--part-mib", "65"])
