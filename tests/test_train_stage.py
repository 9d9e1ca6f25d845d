"""The train stage as a program: LoRA, checkpoint, SIGKILL, resume, a loadable HF dir."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import humaneval_only, make_workspace, stage_env

pytestmark = pytest.mark.slow


def run(root, *args):
    return subprocess.run([sys.executable, "-m", *args], cwd=root, env=stage_env(root), check=True,
                          capture_output=True, text=True)


def test_lora_train_resumes_after_sigkill(tmp_path, tiny_model):
    root = make_workspace(tmp_path / "ws", tiny_model, {
        "data": humaneval_only(train=8),
        "train": {"method": "lora", "epochs": 3, "micro_batch_size": 1, "grad_accum": 1, "max_length": 2048,
                  "checkpoint_every": 2},
    })
    for stage in (["tasks.prepare"], ["tasks.sample", "--config", "ssd"], ["tasks.filter", "--arm", "ssd-none"]):
        run(root, *stage)
    ckpt = root / "checkpoints/ssd-none"
    saved = lambda: any(ckpt.glob("checkpoint-*/complete"))  # noqa: E731
    proc = subprocess.Popen([sys.executable, "-m", "tasks.train", "--arm", "ssd-none"], cwd=root, env=stage_env(root),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not saved() and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert saved(), "no checkpoint was written before the kill"
    assert not (root / "models/ssd-none").exists()

    resumed = run(root, "tasks.train", "--arm", "ssd-none")
    assert "resuming at step" in resumed.stdout
    assert not ckpt.exists(), "the checkpoint is removed once the model is saved"
    curve = (root / "plots/train/ssd-none.csv").read_text().splitlines()
    kept = sum(1 for l in (root / "filtered/ssd-none/train.jsonl").read_text().splitlines() if l.strip())
    assert curve[0] == "step,loss,lr,tokens" and len(curve) - 1 == 3 * kept
    assert [int(l.split(",")[0]) for l in curve[1:]] == list(range(1, 3 * kept + 1))

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(root / "models/ssd-none")  # merged: a plain HF model
    assert not hasattr(model, "peft_config")
    gen = json.loads((root / "models/ssd-none/generation_config.json").read_text())
    assert gen["do_sample"] is True and gen["temperature"] == 0.7
