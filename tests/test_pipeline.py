"""`dvc repro` of the real dvc.yaml on the tiny profile, in a temp git repo."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import yaml

from conftest import make_workspace, stage_env

pytestmark = pytest.mark.slow


def repro(root, *args, env: dict | None = None) -> str:
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro", *args], cwd=root, env={**stage_env(root), **(env or {})},
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def test_dvc_repro_tiny_profile(tmp_path, tiny_model):
    # The tiny model's tokenizer is byte-level: prompts take ~1k tokens.
    root = make_workspace(tmp_path / "ws", tiny_model, {"train": {"max_length": 2048}})
    trace = tmp_path / "params-read.jsonl"
    out = repro(root, env={"SELFDISTILL_TRACE_PARAMS": str(trace)})
    arms = ["none", "shortest"]
    assert ran(out) == {"prepare", "sample", "evaluate-base", "report"} | {
        f"{stage}@{arm}" for stage in ("filter", "train", "evaluate") for arm in arms}

    samples = [json.loads(l) for l in (root / "samples/samples.jsonl").read_text().splitlines()]
    train_ids = [json.loads(l)["task_id"] for l in (root / "data/train.jsonl").read_text().splitlines()]
    eval_ids = [json.loads(l)["task_id"] for l in (root / "data/eval.jsonl").read_text().splitlines()]
    assert not set(train_ids) & set(eval_ids)
    assert sorted(r["prompt_id"] for r in samples) == sorted(train_ids)
    for row in samples:
        assert set(row) >= {"prompt_id", "sample_index", "messages", "text", "num_tokens", "finish_reason",
                            "extractable"}
        assert row["finish_reason"] in ("eos", "length") and 0 < row["num_tokens"] <= 48

    for arm in arms:
        model_dir = root / "models" / arm
        gen = json.loads((model_dir / "generation_config.json").read_text())
        assert gen["temperature"] == 0.7 and gen["top_k"] == 20 and gen["top_p"] == 0.8
        assert (model_dir / "model.safetensors").exists() and "filtered/" + arm in (model_dir / "README.md").read_text()
        assert (root / "plots/train" / f"{arm}.csv").read_text().startswith("step,loss")
        metrics = json.loads((root / "eval" / arm / "metrics.json").read_text())
        assert metrics["samples"] == 4 * 2 and {"pass@1", "pass@2", "isolation"} <= set(metrics)

    summary = json.loads((root / "report/summary.json").read_text())
    assert set(summary["models"]) == {"base", *arms}
    for arm in arms:
        assert 0 < summary["models"][arm]["kept_fraction"] <= 1
        lo, hi = summary["models"][arm]["delta_pass@1_ci"]
        assert lo <= summary["models"][arm]["delta_pass@1"] <= hi
    assert "| shortest |" in (root / "report/summary.md").read_text()

    # dvc.yaml declares exactly the params each stage reads: nothing read is missing, nothing
    # declared goes unread (the sandbox limits of filter are read by its `passes` arm only).
    read = check_params_read(root, trace)
    subprocess.run([sys.executable, "-m", "tasks.filter", "--arm", "passes"], cwd=root, capture_output=True,
                   env={**stage_env(root), "SELFDISTILL_TRACE_PARAMS": str(trace)})
    read = check_params_read(root, trace)
    by_template: dict[str, set[str]] = {}
    for cmd, keys in read.items():
        by_template.setdefault(cmd.split(" --")[0], set()).update(keys)
    for cmd, declared in declared_params(root).items():
        assert declared <= by_template[cmd.split(" --")[0]], f"{cmd}: declares {sorted(declared - by_template[cmd.split(' --')[0]])} but never reads them"

    shown = subprocess.run([sys.executable, "-m", "dvc", "metrics", "show", "--json"], cwd=root,
                           env=stage_env(root), capture_output=True, text=True, check=True).stdout
    assert "report/summary.json" in shown

    # Nothing changed: nothing runs.
    assert ran(repro(root)) == set()

    # A new sampling temperature reruns sample and everything downstream, not prepare.
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["sample"]["temperature"] = 1.1
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    rerun = ran(repro(root))
    assert "prepare" not in rerun and "evaluate-base" not in rerun
    assert {"sample", "filter@none", "train@none", "evaluate@none", "report"} <= rerun


def declared_params(root) -> dict[str, set[str]]:
    """Each stage's rendered command -> the params dvc.yaml declares for it (foreach items expanded)."""
    from tasks.core.config import FILTER_ARMS

    declared = {}
    for name, stage in yaml.safe_load((root / "dvc.yaml").read_text())["stages"].items():
        body = stage.get("do", stage)
        items = FILTER_ARMS if "foreach" in stage else [None]  # every arm a run may have
        for item in items:
            cmd = body["cmd"] if item is None else body["cmd"].replace("${item}", item)
            declared[cmd] = set(body.get("params", []))
    return declared


def check_params_read(root, trace) -> dict[str, set[str]]:
    """Every param a stage read is declared for it in dvc.yaml (else DVC would not rerun it when
    that param changes); returns what each command read."""
    declared = declared_params(root)
    read: dict[str, set[str]] = {}
    for line in trace.read_text().splitlines():
        record = json.loads(line)
        read.setdefault(record["cmd"], set()).update(record["keys"])
    for cmd, keys in read.items():
        assert cmd in declared, f"{cmd!r} is not a dvc.yaml stage command"
        assert keys <= declared[cmd], f"{cmd} reads {sorted(keys - declared[cmd])}, which dvc.yaml does not declare"
    return read
