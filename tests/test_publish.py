"""`publish@<arm>`: the released model decodes at the T_eval its validation sweep chose, and no
`evaluate.*` value reruns training or sampling (they are publish's and evaluate's, not train's)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from conftest import TINY_PROFILE, make_workspace, stage_env, write_params
from tasks import publish
from tasks.core import paths
from tasks.core.files import DataError
from tasks.evaluate import set_metrics

ARM = "ssd-none"  # profiles/tiny.yaml: sampling config ssd, filter none


def eval_metrics(sweep: dict[float, float], chosen: float) -> dict:
    """eval/<arm>/metrics.json as tasks/evaluate.py writes it: two problems, two samples each."""
    rows = [{"task_id": f"HumanEval/{i // 2}", "passed": i == 0, "extractable": True, "num_tokens": 10,
             "result": "passed" if i == 0 else "failed: assert"} for i in range(4)]
    problems = [{"task_id": "HumanEval/0"}, {"task_id": "HumanEval/1"}]
    return {"model": paths.trained_model(ARM),
            "sets": {"humaneval": dict(set_metrics(problems, rows, 2), temperature=chosen)},
            "validation": {"problems": 3, "pass@1_by_temperature": {f"{t:g}": v for t, v in sweep.items()},
                           "chosen_temperature": chosen},
            "isolation": "bubblewrap"}


@pytest.fixture
def trained(tmp_path, tiny_model, monkeypatch) -> Path:
    """A workspace holding what publish@ssd-none reads: params.yaml (tiny profile, tie-breaker
    evaluate.temperature 0.7), models/base/source.json and a trained model dir."""
    write_params(tmp_path, TINY_PROFILE, {"evaluate": {"temperature": 0.7, "sweep": [0.0, 0.5, 0.7, 0.9]}})
    monkeypatch.chdir(tmp_path)
    Path(paths.BASE_MODEL).mkdir(parents=True)
    (Path(paths.BASE_MODEL) / "source.json").write_text(json.dumps({"base": "tiny-test-model"}))
    shutil.copytree(tiny_model, paths.trained_model(ARM))
    (Path(paths.trained_model(ARM)) / "README.md").write_text("train's model card\n")
    return tmp_path


@pytest.mark.parametrize("chosen", [0.9, 0.0])
def test_the_release_decodes_at_the_chosen_t_eval_not_the_tie_breaker(trained, chosen):
    sweep = {0.0: 0.1, 0.5: 0.2, 0.7: 0.2, 0.9: 0.2}
    sweep[chosen] = 0.5
    Path(paths.eval_metrics(ARM)).parent.mkdir(parents=True)
    Path(paths.eval_metrics(ARM)).write_text(json.dumps(eval_metrics(sweep, chosen)))
    model, release = Path(paths.trained_model(ARM)), Path(paths.release_dir(ARM))
    trained_gen = (model / "generation_config.json").read_text()

    assert publish.main(["--arm", ARM]) == 0

    gen = json.loads((release / "generation_config.json").read_text())
    assert gen["max_new_tokens"] == 48  # profiles/tiny.yaml's evaluate.max_new_tokens
    if chosen:
        assert gen["do_sample"] is True and gen["temperature"] == chosen
        assert gen["top_k"] == 20 and gen["top_p"] == 0.8
    else:
        assert not gen.get("do_sample") and gen.get("temperature") is None
    # The weights are the trained ones, linked; the trained model's own files stay as train left them.
    assert os.path.samefile(release / "model.safetensors", model / "model.safetensors")
    assert {p.name for p in model.iterdir()} <= {p.name for p in release.iterdir()}
    assert (model / "generation_config.json").read_text() == trained_gen
    assert (model / "README.md").read_text() == "train's model card\n"
    card = (release / "README.md").read_text()
    assert "base_model: tiny-test-model" in card and f"T_eval {chosen:g} was chosen on 3 validation problems" in card
    assert "| humaneval | 2 | 2 | 0.250 | - |" in card
    assert "sampling config `ssd` (T_train 0.8, top-k 20, top-p 0.8" in card and "filter `none`" in card
    assert "No dvc.lock record" in card  # run by hand, outside DVC

    from transformers import AutoTokenizer, GenerationConfig

    assert GenerationConfig.from_pretrained(release).max_new_tokens == 48 and AutoTokenizer.from_pretrained(release)


def test_a_metrics_file_whose_test_sets_ran_at_another_t_is_refused(trained):
    metrics = eval_metrics({0.5: 0.5, 0.9: 0.0}, 0.5)
    metrics["sets"]["humaneval"]["temperature"] = 0.9
    Path(paths.eval_metrics(ARM)).parent.mkdir(parents=True)
    Path(paths.eval_metrics(ARM)).write_text(json.dumps(metrics))
    with pytest.raises(DataError, match="validation chose T=0.5 but the test sets ran at T=0.9"):
        publish.main(["--arm", ARM])
    assert not Path(paths.release_dir(ARM)).exists()


# Writes every output a stage declares: the project's dvc.yaml runs in seconds, with real DVC records.
FAKE_STAGE = textwrap.dedent("""
    import pathlib, sys
    for out in map(pathlib.Path, sys.argv[1:]):
        (out if not out.suffix else out.parent).mkdir(parents=True, exist_ok=True)
        (out / "weights.bin" if not out.suffix else out).write_text(str(out))
""")


def changed(value):
    """Another value of a param's type."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, list):
        return value + value[-1:] if value else [1]
    return f"{value}-changed"


def test_no_evaluate_param_reruns_sampling_or_training(tmp_path):
    root = make_workspace(tmp_path / "ws", Path("tiny-model-not-loaded"))
    pipeline = yaml.safe_load((root / "dvc.yaml").read_text())
    for stage in pipeline["stages"].values():
        body = stage.get("do", stage)
        outs = [next(iter(o)) if isinstance(o, dict) else o for key in ("outs", "metrics", "plots")
                for o in body.get(key, [])]
        body["cmd"] = "python fake_stage.py " + " ".join(outs)
    (root / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    (root / "fake_stage.py").write_text(FAKE_STAGE)

    def dvc(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=stage_env(root),
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout

    dvc("repro", "train", "evaluate@base")
    params = yaml.safe_load((root / "params.yaml").read_text())
    kept = {f"train@{arm}" for arm in params["arms"]} | {f"sample@{config}" for config in params["sample"]["configs"]}
    targets = sorted(kept | {"evaluate@base"})
    assert set(yaml.safe_load((root / "dvc.lock").read_text())["stages"]) >= set(targets)
    assert json.loads(dvc("status", "--json", *targets)) == {}

    # evaluate.shards / stages change which stages there are (tests/test_shards.py), not a value one reads.
    params["evaluate"] = {key: value if key in ("shards", "stages") else changed(value)
                          for key, value in params["evaluate"].items()}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = json.loads(dvc("status", "--json", *targets))
    assert "evaluate@base" in status  # DVC sees the new values
    assert not kept & set(status), f"an evaluate.* value reruns {sorted(kept & set(status))}"

    # Likewise the problem sets: a data.* value remakes them, never the base model's weights.
    params["data"]["train"]["max_problems"] += 1
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = json.loads(dvc("status", "--json", "model", "prepare"))
    assert "prepare" in status and "model" not in status
