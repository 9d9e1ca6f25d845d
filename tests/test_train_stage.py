"""The train stage as a program: what it drops and why, the runs it refuses; its curve through
dvclive, under `dvc repro` and `dvc plots show`; LoRA, checkpoint, SIGKILL, resume, a loadable HF dir."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, humaneval_only, init_repo, make_workspace, stage_env, write_params
from tasks.core.config import EXIT_NO_RETRY, run_stage


def run(root, *args):
    return subprocess.run([sys.executable, "-m", *args], cwd=root, env=stage_env(root), check=True,
                          capture_output=True, text=True)


def train_workspace(root, model_dir, rows, **train):
    """params.yaml with `train` overrides, the base model, and `rows` as arm ssd-none's filtered samples."""
    write_params(root, None, {"train": {"micro_batch_size": 2, "grad_accum": 1, "bf16": False, "epochs": 1,
                                        "max_length": 64, "warmup_steps": 0, **train}})
    shutil.copytree(model_dir, root / "models/base")
    (root / "models/base/source.json").write_text(json.dumps({"base": "tiny"}))
    (root / "filtered/ssd-none").mkdir(parents=True)
    (root / "filtered/ssd-none/train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def row(question, answer, finish_reason="eos"):
    return {"finish_reason": finish_reason,
            "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def run_train(root, monkeypatch) -> int:
    """The stage in this process (no interpreter start-up), through run_stage's error path."""
    from tasks import train

    monkeypatch.chdir(root)
    return run_stage(lambda: train.main(["--arm", "ssd-none"]))


def test_the_stage_says_what_it_dropped_and_why(tmp_path, tiny_model, monkeypatch, capsys):
    # Byte-level tokens: a 100-character question leaves no answer token within 64 tokens.
    rows = [row(f"q{i}", f"a{i}\n" * 3, "length" if i == 0 else "eos") for i in range(4)] + \
           [row("x" * 100, "a\n" * 3)] * 2
    root = train_workspace(tmp_path, tiny_model, rows)
    assert run_train(root, monkeypatch) == 0
    out = capsys.readouterr().out
    assert "training on 4 of 6 samples (1 cut off at sample.max_new_tokens" in out
    assert "dropped {'no answer token within train.max_length': 2}" in out
    stats = json.loads((root / "train/ssd-none/stats.json").read_text())
    assert stats["samples"] == 6 and stats["trained"] == 4 and stats["trained_open"] == 1
    assert stats["dropped"] == {"no answer token within train.max_length": 2} and stats["steps"] == 2
    # Trained tokens: each answer's 9 bytes, and "<|im_end|>\n" after the 3 that finished, not after the cut one.
    assert stats["answer_tokens"] == 4 * 9 + 3 * 2


def live_curves(root, arm="ssd-none") -> dict[str, list[tuple[int, float]]]:
    """dvclive's curves of a train run: name -> [(step, value)] (paths as dvc.yaml declares them)."""
    import csv

    from tasks.core import paths
    from tasks.training.sft import LIVE_CURVES

    curves = {}
    for name in LIVE_CURVES:
        with open(root / paths.train_curve(arm, name), newline="") as f:
            curves[name] = [(int(r["step"]), float(r[name])) for r in csv.DictReader(f, delimiter="\t")]
    return curves


def test_a_resumed_run_continues_the_dvclive_curve(tmp_path, tiny_model, monkeypatch, capsys):
    """A run that dies after logging a step past its last checkpoint, resumed: one row per
    optimizer step, steps 1..N, the uninterrupted run's values."""
    from tasks.training import sft

    rows = [row(f"q{i}", f"a{i}\n" * 3) for i in range(10)]  # 5 optimizer steps of 2
    once = train_workspace(tmp_path / "once", tiny_model, rows, checkpoint_every=2)
    assert run_train(once, monkeypatch) == 0
    uninterrupted = live_curves(once)
    assert [step for step, _ in uninterrupted["loss"]] == [1, 2, 3, 4, 5]

    mark_complete = type(sft._mark_complete_callback())

    class DiesAtStep4(mark_complete):
        def on_step_end(self, args, state, control, **kwargs):  # before step 4 is logged or saved
            if state.global_step == 4:
                raise KeyboardInterrupt

    root = train_workspace(tmp_path / "killed", tiny_model, rows, checkpoint_every=2)
    with monkeypatch.context() as patched:
        patched.setattr(sft, "_mark_complete_callback", DiesAtStep4)
        assert run_train(root, monkeypatch) == 130
    assert [step for step, _ in live_curves(root)["loss"]] == [1, 2, 3]  # step 3: past checkpoint-2
    assert run_train(root, monkeypatch) == 0
    out = capsys.readouterr().out
    assert "resuming at step 2/5" in out, out[-3000:]
    resumed = live_curves(root)
    for name, curve in uninterrupted.items():
        assert [step for step, _ in resumed[name]] == [1, 2, 3, 4, 5], name
        assert [v for _, v in resumed[name]] == pytest.approx([v for _, v in curve], rel=1e-5), name
    summary = json.loads((root / "train/ssd-none/live/metrics.json").read_text())
    assert summary["step"] == 5 and summary["loss"] == resumed["loss"][-1][1]


def test_dvc_repro_of_the_train_stage_gives_dvc_its_curves(tmp_path, tiny_model):
    """The project's train stage under `dvc repro`: dvclive's files are the outs and plots
    dvc.yaml declares, `dvc plots show` draws each curve, and dvclive leaves dvc.yaml, git's
    refs (no DVC experiment) and the repo's metrics alone."""
    import yaml

    from tasks.core import paths
    from tasks.training.sft import LIVE_CURVES

    root = train_workspace(tmp_path / "ws", tiny_model, [row(f"q{i}", f"a{i}\n" * 3) for i in range(6)])
    for name in ("tasks", "requirements"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    pipeline = yaml.safe_dump({"stages": {"train": stages["train"]}}, sort_keys=False)
    (root / "dvc.yaml").write_text(pipeline)
    init_repo(root)

    def dvc(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=stage_env(root),
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout

    dvc("repro", "train@ssd-none")
    assert json.loads(dvc("status", "--json", "train@ssd-none")) == {}  # every file it wrote is declared
    stats = json.loads((root / "train/ssd-none/stats.json").read_text())
    curves = live_curves(root)
    assert stats["steps"] == 3 and [step for step, _ in curves["loss"]] == [1, 2, 3]
    assert all(len(curve) == 3 for curve in curves.values())
    assert sum(v for _, v in curves["answer_tokens"]) == stats["answer_tokens"]
    assert curves["loss"][-1][1] == pytest.approx(stats["final_loss"]) and all(v > 0 for _, v in curves["lr"])
    assert (root / "dvc.yaml").read_text() == pipeline and not list(root.glob("train/**/dvc.yaml"))
    assert subprocess.run(["git", "for-each-ref", "refs/exps"], cwd=root, capture_output=True, text=True).stdout == ""
    # No DVC metrics from training: the report's headline is the pipeline's only metrics file.
    assert not any(rev.get("data") for rev in json.loads(dvc("metrics", "show", "--json")).values())

    shown = json.loads(dvc("plots", "show", "--json"))["data"]
    for name in LIVE_CURVES:
        (plot,) = shown[paths.train_curve("ssd-none", name)]
        assert [int(v["step"]) for v in plot["content"]["data"]["values"]] == [1, 2, 3], name
    dvc("plots", "show", "-o", str(tmp_path / "html"))
    page = (tmp_path / "html/index.html").read_text()
    assert all(paths.train_curve("ssd-none", name) in page for name in LIVE_CURVES)


def test_the_stage_refuses_a_run_whose_learning_rate_never_leaves_zero(tmp_path, tiny_model, monkeypatch, capsys):
    # 2 samples, one optimizer step: the linear warm-up's first step has learning rate 0.
    root = train_workspace(tmp_path, tiny_model, [row("q", "a\n"), row("r", "b\n")], warmup_steps=3)
    assert run_train(root, monkeypatch) == EXIT_NO_RETRY
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("error: train.warmup_steps=3: none of the run's 1 optimizer steps")
    assert "Traceback" not in err
    assert not (root / "models/ssd-none").exists()


def test_the_stage_refuses_weights_that_did_not_move(tmp_path, tiny_model, monkeypatch, capsys):
    # A learning rate below fp32's resolution of the weights: every step leaves them as they were.
    root = train_workspace(tmp_path, tiny_model, [row("q", "a\n"), row("r", "b\n")], lr=1e-30, min_lr=0.0)
    assert run_train(root, monkeypatch) == EXIT_NO_RETRY
    assert "the trained weights equal the base's after 1 steps" in capsys.readouterr().err
    assert not (root / "models/ssd-none").exists() and not (root / "train/ssd-none/stats.json").exists()


@pytest.mark.slow
def test_lora_train_resumes_after_sigkill(tmp_path, tiny_model):
    root = make_workspace(tmp_path / "ws", tiny_model, {
        "data": humaneval_only(train=8),
        # Saved in float32, the master weights' dtype, so that the resumed run is compared with the
        # uninterrupted one before any rounding.
        "train": {"method": "lora", "epochs": 3, "micro_batch_size": 1, "grad_accum": 1, "max_length": 2048,
                  "checkpoint_every": 2, "save_dtype": "float32"},
    })
    for stage in (["tasks.model"], ["tasks.prepare"], ["tasks.sample", "--config", "ssd"], ["tasks.filter", "--arm", "ssd-none"]):
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

    kept_checkpoint = tmp_path / "kept-checkpoint"
    shutil.copytree(ckpt, kept_checkpoint)

    # Other training code (a comment is enough): the checkpoint is discarded, naming the file, and
    # the run trains from scratch: an uninterrupted run, the reference for the resumed one.
    sft = root / "tasks/training/sft.py"
    original = sft.read_text()
    sft.write_text(original + "# edited\n")
    fresh = run(root, "tasks.train", "--arm", "ssd-none")
    assert "discarding the checkpoint" in fresh.stdout and "code.tasks/training/sft.py" in fresh.stdout
    assert "resuming at step" not in fresh.stdout
    uninterrupted = load_file(root / "models/ssd-none/model.safetensors")

    sft.write_text(original)
    shutil.rmtree(ckpt, ignore_errors=True)
    shutil.copytree(kept_checkpoint, ckpt)
    resumed = run(root, "tasks.train", "--arm", "ssd-none")
    assert "resuming at step" in resumed.stdout
    assert not ckpt.exists(), "the checkpoint is removed once the model is saved"
    weights = load_file(root / "models/ssd-none/model.safetensors")
    assert weights.keys() == uninterrupted.keys()
    assert {t.dtype for t in weights.values()} == {torch.float32}
    for name, tensor in weights.items():
        torch.testing.assert_close(tensor, uninterrupted[name], rtol=1e-5, atol=1e-6, msg=name)
    kept = sum(1 for l in (root / "filtered/ssd-none/train.jsonl").read_text().splitlines() if l.strip())
    for name, curve in live_curves(root).items():  # the resumed run's curve: one row per optimizer step
        assert [step for step, _ in curve] == list(range(1, 3 * kept + 1)), name

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(root / "models/ssd-none")  # merged: a plain HF model
    assert not hasattr(model, "peft_config")
    # Decoding settings are publish's (at the chosen T_eval): train leaves the base model's.
    gen = json.loads((root / "models/ssd-none/generation_config.json").read_text())
    base = json.loads((root / "models/base/generation_config.json").read_text())
    decoding = ("do_sample", "temperature", "top_k", "top_p", "min_p", "max_new_tokens")
    assert [gen.get(k) for k in decoding] == [base.get(k) for k in decoding]


@pytest.mark.parametrize(("save_dtype", "saved"), [("bfloat16", torch.bfloat16), ("auto", torch.float32)])
def test_the_model_is_saved_in_train_save_dtype(tmp_path, tiny_model, monkeypatch, save_dtype, saved):
    # Trained in fp32 (bf16 off): written in bf16 when the param says so, and as computed under
    # auto. auto -> bfloat16 (bf16 on) is checked by the pipeline test.
    root = train_workspace(tmp_path, tiny_model, [row("q", "a\n"), row("r", "b\n")], save_dtype=save_dtype)
    assert run_train(root, monkeypatch) == 0
    weights = load_file(root / "models/ssd-none/model.safetensors")
    assert {t.dtype for t in weights.values()} == {saved}
    assert json.loads((root / "models/ssd-none/config.json").read_text())["dtype"] == str(saved).removeprefix("torch.")
