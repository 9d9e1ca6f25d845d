"""`dvc repro` of the real dvc.yaml on the tiny profile, in a temp git repo."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import make_workspace, rendered_stages, stage_env

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
    # Validation from CodeIO (the default takes HumanEval's): out of train's share of the source, and
    # every param `codeio` declares is read.
    root = make_workspace(tmp_path / "ws", tiny_model, {"train": {"max_length": 2048}, "evaluate": {"repeats": 2},
                                                        "data": {"validation": {"source": "codeio", "max_problems": 3}}})
    trace = tmp_path / "params-read.jsonl"
    out = repro(root, env={"SELFDISTILL_TRACE_PARAMS": str(trace)})
    arms = ["ssd-none", "null-shortest"]  # profiles/tiny.yaml: (sampling config, filter) pairs
    assert ran(out) == {"codeio", "model", "prepare", "sample@ssd", "sample@null", "evaluate@base", "diagnose-base",
                        "report"} | {f"{stage}@{arm}" for stage in ("filter", "train", "evaluate", "publish",
                                                                              "diagnose") for arm in arms}

    # Train prompts from the CodeIO pool; eval sets HumanEval and CodeIO problems held out from it.
    def ids(path):
        return [json.loads(l)["task_id"] for l in (root / path).read_text().splitlines()]

    samples = [json.loads(l) for l in (root / "samples/ssd/samples.jsonl").read_text().splitlines()]
    null_samples = [json.loads(l) for l in (root / "samples/null/samples.jsonl").read_text().splitlines()]
    assert len(null_samples) == len(samples) and [r["text"] for r in null_samples] != [r["text"] for r in samples]
    # Each arm trains on its own config's samples.
    assert json.loads((root / "filtered/null-shortest/stats.json").read_text())["sample"] == "null"
    null_texts = {r["text"] for r in null_samples}
    kept = [json.loads(l) for l in (root / "filtered/null-shortest/train.jsonl").read_text().splitlines()]
    assert kept and all(r["messages"][-1]["content"] in null_texts for r in kept)
    train_ids = ids("data/train.jsonl")
    assert len(train_ids) == 6 and all(t.startswith("codeio/") for t in train_ids)
    assert len(ids("data/eval/humaneval.jsonl")) == 4 and all(t.startswith("HumanEval/") for t in ids("data/eval/humaneval.jsonl"))
    codeio_eval = ids("data/eval/codeio.jsonl")
    assert codeio_eval and all(t.startswith("codeio/") for t in codeio_eval) and not set(train_ids) & set(codeio_eval)
    assert sorted(r["prompt_id"] for r in samples) == sorted(train_ids)
    assert "main_solution" in samples[0]["messages"][0]["content"]
    for row in samples:
        assert set(row) >= {"prompt_id", "sample_index", "messages", "text", "num_tokens", "finish_reason",
                            "extractable"}
        assert row["finish_reason"] in ("eos", "length") and 0 < row["num_tokens"] <= 96

    for arm in arms:
        model_dir = root / "models" / arm
        assert (model_dir / "model.safetensors").exists() and "filtered/" + arm in (model_dir / "README.md").read_text()
        loss = (root / "train" / arm / "live/plots/metrics/loss.tsv").read_text().splitlines()  # dvclive's
        assert loss[0] == "step\tloss"
        # Trained for real: the weights moved away from the base's (the stage also refuses otherwise).
        trained, base = load_file(model_dir / "model.safetensors"), load_file(root / "models/base/model.safetensors")
        # ... even once rounded to the dtype it was saved in: bf16, as it was trained (train.save_dtype auto).
        assert trained.keys() == base.keys() and {t.dtype for t in trained.values()} == {torch.bfloat16}
        assert any(not torch.equal(trained[k], base[k].to(torch.bfloat16)) for k in base)
        assert json.loads((model_dir / "config.json").read_text())["dtype"] == "bfloat16"
        stats = json.loads((root / "train" / arm / "stats.json").read_text())
        filtered = json.loads((root / "filtered" / arm / "stats.json").read_text())
        assert stats["samples"] == filtered["kept"] and [int(l.split("\t")[0]) for l in loss[1:]] == list(
            range(1, stats["steps"] + 1))
        # Samples cut off at sample.max_new_tokens carry it into training (filter.truncated: keep-open).
        kept_rows = [json.loads(l) for l in (root / "filtered" / arm / "train.jsonl").read_text().splitlines()]
        cut = sum(r["finish_reason"] == "length" for r in kept_rows)
        assert filtered["truncated"]["kept"] == cut == stats["trained_open"] and filtered["truncated"]["dropped"] == 0
        metrics = json.loads((root / "eval" / arm / "metrics.json").read_text())
        assert "isolation" in metrics and set(metrics["sets"]) == {"humaneval", "codeio"}
        assert metrics["sets"]["humaneval"]["samples"] == 4 * 2
        assert list(metrics["sets"]["humaneval"]["pass@1_by_seed"]) == ["1", "2"]  # evaluate.repeats: 2
        assert metrics["sets"]["codeio"]["samples"] == len(codeio_eval) * 2
        assert {"pass@1", "pass@2", "results"} <= set(metrics["sets"]["codeio"])
        assert "by_difficulty" in metrics["sets"]["codeio"]  # CodeIO's 1-10 scores, in bands

    summary = json.loads((root / "report/summary.json").read_text())
    assert set(summary["sets"]) == {"humaneval", "codeio"}
    for result in summary["sets"].values():
        assert set(result["models"]) == {"base", *arms}
        for arm in arms:
            assert 0 < result["models"][arm]["kept_fraction"] <= 1
            lo, hi = result["models"][arm]["delta_pass@1_ci"]
            assert lo <= result["models"][arm]["delta_pass@1"] <= hi
    report = (root / "report/summary.md").read_text()
    assert "| null-shortest | null | 1 | off | 1 |" in report and "## humaneval (4 problems" in report
    for arm in arms:
        cut = json.loads((root / "filtered" / arm / "stats.json").read_text())["truncated"]
        assert summary["arms"][arm]["truncated"] == cut
        assert f"| {cut['samples']}: {cut['kept']} / 0 | {summary['arms'][arm]['trained']}" in report
    assert "## codeio (" in report and "Seed-to-seed spread (2 decodings" in report
    for result in summary["sets"].values():
        assert all(len(m["pass@1_by_seed"]) == 2 for m in result["models"].values())
        assert result["models"]["base"]["t_eval"] == summary["t_eval"]["base"]["chosen"]
    assert "pass@1 by difficulty band" in report
    # The lock/fork diagnostics: the same positions (classed by the base) measured for every model.
    diagnostics = summary["diagnostics"]
    assert set(diagnostics) == {"base", *arms}
    assert len({m["all"]["positions"] for m in diagnostics.values()}) == 1
    for m in diagnostics.values():
        assert 0 < m["all"]["kept_mass"] <= 1 and len(m["all"]["cum_mass_by_rank"]) == 20
        assert list(m["all"]["surviving_by_temperature"]) == ["0.5", "1.0"]
    assert "## Lock/fork diagnostics" in report
    # T_eval chosen per model on the validation set, which is disjoint from train and every test set.
    tie_breaker = yaml.safe_load((root / "params.yaml").read_text())["evaluate"]["temperature"]
    validation_ids = ids("data/validation.jsonl")
    assert len(validation_ids) == 3 and not set(validation_ids) & (set(train_ids) | set(codeio_eval))
    for model, choice in summary["t_eval"].items():
        assert set(choice["validation_pass@1"]) == {"0.5", "0.9"}
        # Where validation cannot tell the T apart (the tiny model solves nothing), the tie-breaker.
        if len(set(choice["validation_pass@1"].values())) == 1:
            assert choice["chosen"] == tie_breaker and list(choice["vs_tie_breaker"]) == ["0.5"]
        tested = json.loads((root / "eval" / model / "metrics.json").read_text())["sets"]
        assert {s["temperature"] for s in tested.values()} == {choice["chosen"]}
    assert "chosen T_eval" in report
    # Each release decodes at the T_eval its model's sweep chose (evaluate.temperature is only the
    # tie-breaker; tests/test_publish.py has a choice away from it), with the trained weights and its lineage.
    for arm in arms:
        release = root / "release" / arm
        gen = json.loads((release / "generation_config.json").read_text())
        assert gen["temperature"] == summary["t_eval"][arm]["chosen"] and gen["top_k"] == 20 and gen["top_p"] == 0.8
        assert (release / "model.safetensors").read_bytes() == (root / "models" / arm / "model.safetensors").read_bytes()
        card = (release / "README.md").read_text()
        assert f"`train@{arm}`" in card and f"filtered/{arm}/train.jsonl" in card and "| humaneval | 4 | 2 |" in card
    for figure in ("train_loss.png", "diagnostics.png", "difficulty.png", "t_eval_sweep.png"):
        assert (root / "report/figures" / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"(figures/{figure})" in report

    # dvc.yaml declares exactly the params each stage reads: nothing read is missing, nothing
    # declared goes unread (the sandbox limits of filter are read by its `passes` arm only).
    read = check_params_read(root, trace)
    params_text = (root / "params.yaml").read_text()
    params = yaml.safe_load(params_text)
    params["arms"]["ssd-passes"] = {"sample": "ssd", "filter": "passes"}
    params["evaluate"]["stages"]["whole"].append("ssd-passes")  # a model to evaluate (evaluate.stages)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run([sys.executable, "-m", "tasks.filter", "--arm", "ssd-passes"], cwd=root, capture_output=True,
                   env={**stage_env(root), "SELFDISTILL_TRACE_PARAMS": str(trace)})  # may keep 0: exit 1
    read = check_params_read(root, trace)
    declared_all = declared_params(root)
    (root / "params.yaml").write_text(params_text)
    shutil.rmtree(root / "filtered/ssd-passes", ignore_errors=True)
    # Per stage template (any arm's command), with arm and config names as `*`.
    by_template: dict[str, set[str]] = {}
    for cmd, keys in read.items():
        by_template.setdefault(cmd.split(" --")[0], set()).update(map(named_as_any, keys))
    for cmd, declared in declared_all.items():
        template = by_template[cmd.split(" --")[0]]
        unread = {key for key in declared if not any(covers(named_as_any(key), r) for r in template)}
        assert not unread, f"{cmd}: declares {sorted(unread)} but never reads them"

    # DVC's metrics: the headline alone, flat; `dvc plots show` draws dvclive's training curves and
    # each model's pass@1 per T_eval, and the report's PNGs, which render offline.
    def dvc(*args: str) -> str:
        return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=stage_env(root),
                              capture_output=True, text=True, check=True).stdout

    (shown,) = json.loads(dvc("metrics", "show", "--json")).values()
    headline = shown["data"]["report/headline.json"]["data"]
    assert list(shown["data"]) == ["report/headline.json"]
    assert not any(isinstance(v, (dict, list)) for v in headline.values())
    assert headline["humaneval.ssd-none.pass@1"] == summary["sets"]["humaneval"]["models"]["ssd-none"]["pass@1"]
    assert {headline[f"t_eval.{m}"] for m in ("base", *arms)} <= {0.5, 0.9}
    assert headline["train.ssd-none.loss"] == json.loads((root / "train/ssd-none/stats.json").read_text())["final_loss"]
    dvc("plots", "show", "-o", str(tmp_path / "plots"))
    page = (tmp_path / "plots/index.html").read_text()
    for arm in arms:
        assert all(f"train/{arm}/live/plots/metrics/{name}.tsv" in page for name in ("loss", "lr", "answer_tokens"))
    assert all(f"report/t_eval/{model}.json" in page for model in ("base", *arms))
    assert "train_loss.png" in page and "t_eval_sweep.png" in page
    assert not (root / "plots").exists()

    # Nothing changed: nothing runs, also in a fresh checkout, which has no bytecode caches yet
    # (the stages' code deps are folders that Python writes __pycache__ into).
    for cache in root.glob("tasks/**/__pycache__"):
        shutil.rmtree(cache)
    assert ran(repro(root)) == set()

    # The choice never reads a test result: flip the base's test verdicts, rerun the report: the
    # comparison moves, the chosen T_eval of every model stays.
    chosen = {m: c["chosen"] for m, c in summary["t_eval"].items()}
    path = root / "eval" / "base" / "samples" / "humaneval.jsonl"
    original = path.read_text()
    rows = [json.loads(l) for l in original.splitlines()]
    path.write_text("".join(json.dumps(dict(r, passed=not r["passed"])) + "\n" for r in rows))
    subprocess.run([sys.executable, "-m", "tasks.report"], cwd=root, env=stage_env(root), check=True,
                   capture_output=True)
    path.write_text(original)
    again = json.loads((root / "report/summary.json").read_text())
    assert {m: c["chosen"] for m, c in again["t_eval"].items()} == chosen
    moved = again["sets"]["humaneval"]["models"]["ssd-none"]["delta_pass@1"]
    assert moved != summary["sets"]["humaneval"]["models"]["ssd-none"]["delta_pass@1"]
    # The Δ and its CI, recomputed from the answers: mean over problems of the arm's pass rate
    # minus the base's (its first decoding's verdicts flipped, so not all 0).
    # The repeat decoding (evaluate.repeats: 2) is pooled in, its verdicts as they were.
    def rates(flip: bool, model: str) -> dict[str, float]:
        counts = {}
        samples = root / "eval" / model / "samples"
        for file, flipped in ((samples / "humaneval.jsonl", flip), *((f, False) for f in samples.glob("repeats/humaneval.*"))):
            for line in file.read_text().splitlines():
                row = json.loads(line)
                n_c = counts.setdefault(row["task_id"], [0, 0])
                n_c[0] += 1
                n_c[1] += row["passed"] != flipped
        return {task: c / n for task, (n, c) in counts.items()}

    arm_rates, base_rates = rates(False, "ssd-none"), rates(True, "base")
    expected = sum(arm_rates[t] - base_rates[t] for t in base_rates) / len(base_rates)
    lo, hi = again["sets"]["humaneval"]["models"]["ssd-none"]["delta_pass@1_ci"]
    assert moved == pytest.approx(expected) and lo <= moved <= hi

    # A new T_train for `ssd` reruns its sample stage and its arm downstream: not prepare, not the
    # `null` config's samples nor its arm.
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["sample"]["configs"]["ssd"]["temperature"] = 1.1
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    rerun = ran(repro(root))
    assert not rerun & {"prepare", "codeio", "evaluate@base", "sample@null", "train@null-shortest",
                        "publish@null-shortest"}
    assert {"sample@ssd", "filter@ssd-none", "train@ssd-none", "evaluate@ssd-none", "publish@ssd-none",
            "report"} <= rerun


def declared_params(root) -> dict[str, set[str]]:
    """Each stage's command -> the params dvc.yaml declares for it, as DVC renders them."""
    return {stage["cmd"]: set(stage["params"]) for stage in rendered_stages(root).values()}


def named_as_any(key: str) -> str:
    """`arms.ssd-none.filter` -> `arms.*.filter`, `sample.configs.null` -> `sample.configs.*`."""
    return re.sub(r"^(arms|sample\.configs)\.[^.]+", r"\1.*", key)


def covers(declared: str, read: str) -> bool:
    """A declared key covers a key read at it or under it (`arms.a` covers `arms.a.filter`)."""
    return read == declared or read.startswith(declared + ".")


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
        undeclared = {key for key in keys if not any(covers(d, key) for d in declared[cmd])}
        assert not undeclared, f"{cmd} reads {sorted(undeclared)}, which dvc.yaml does not declare"
    return read
