"""sample.shards / evaluate.shards: a config's batches (a model's passes) split over stages that
each decode their own, resume on their own, and together write exactly the rows of one stage;
params and dvc.yaml that agree on them.
(The shards on two workers of a real Dask cluster, merged byte for byte: tests/test_dask.py.)"""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from conftest import REPO, decoding, init_repo, rendered_stages, write_params
from tasks.core.config import ParamsError, validate_params
from tasks.core.profiles import update_params_file
from tasks.sampling.backend_transformers import TransformersBackend
from tasks.sampling.generate import Request, generate_jsonl, generate_rows


@pytest.fixture(scope="module")
def backend(tiny_model):
    return TransformersBackend(tiny_model, dtype=torch.float32)


def requests(count=5):
    return [Request({"prompt_id": f"p{i}"}, [{"role": "user", "content": "x" * (i + 1)}]) for i in range(count)]


class Stopped(Exception):
    pass


class StopsAfter:
    """The backend, stopped as a kill would stop it after `batches` batches."""

    def __init__(self, backend, batches: int):
        self.backend, self.left = backend, batches

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def generate_batch(self, *args, **kwargs):
        if self.left == 0:
            raise Stopped
        self.left -= 1
        return self.backend.generate_batch(*args, **kwargs)


def in_whole_run_order(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: (int(r["prompt_id"][1:]), r["sample_index"]))


@pytest.mark.parametrize("shards", [2, 3])
def test_shards_together_write_the_rows_of_the_whole_run(tmp_path, backend, tiny_model, shards):
    cfg = decoding(n=2, max_new_tokens=16, batch_size=3)  # 10 sequences: batches 0 .. 3
    whole = generate_jsonl(tiny_model, requests(), cfg, tmp_path / "whole.jsonl", backend=backend)
    parts = [generate_rows(tiny_model, requests(), cfg, tmp_path / f"{i}.partial", backend=backend, shard=(i, shards))
             for i in range(shards)]
    for i, rows in enumerate(parts):
        assert rows and {r["batch"] % shards for r in rows} == {i}  # disjoint: each batch in one shard
    assert in_whole_run_order([r for rows in parts for r in rows]) == whole


def test_a_shard_resumes_its_own_batches(tmp_path, backend, tiny_model, capsys):
    cfg = decoding(n=2, max_new_tokens=16, batch_size=3)
    clean = generate_rows(tiny_model, requests(), cfg, tmp_path / "clean.partial", backend=backend, shard=(1, 2))
    partial = tmp_path / "killed.partial"
    with pytest.raises(Stopped):
        generate_rows(tiny_model, requests(), cfg, partial, backend=StopsAfter(backend, 1), shard=(1, 2))
    assert [json.loads(l).get("batch") for l in partial.read_text().splitlines()[1:]] == [1, 1, 1]
    capsys.readouterr()
    resumed = generate_rows(tiny_model, requests(), cfg, partial, backend=StopsAfter(backend, 1), shard=(1, 2))
    assert resumed == clean  # one batch left to decode (batch 3): the stopping backend allowed exactly it
    assert "resuming, 3 of 4 completions already written" in capsys.readouterr().out


def raw_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_shards_are_counted_from_one_and_the_stage_lists_must_follow_them():
    raw = raw_params()
    raw["sample"]["shards"] = 0
    with pytest.raises(ParamsError, match=r"sample\.shards: Input should be greater than or equal to 1"):
        validate_params(raw)
    raw["sample"]["shards"] = 2  # by hand, stages left as they were
    with pytest.raises(ParamsError) as err:
        validate_params(raw)
    assert "sample.stages" in str(err.value) and "shards: 2" in str(err.value)
    assert 'set sample.stages to {whole: [], sharded: ["ssd", "null"], shard: [0, 1]}' in str(err.value)


def test_setting_shards_writes_the_stage_lists_and_dvc_makes_shard_and_merge_stages(tmp_path, monkeypatch):
    root = tmp_path / "ws"
    path = write_params(root)
    (root / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    init_repo(root)
    monkeypatch.chdir(root)  # DVC names stages relative to the current directory
    one = rendered_stages(root)
    assert {"sample@ssd", "sample@null"} <= set(one) and not [s for s in one if s.startswith("sample-")]

    update_params_file(path, ["sample.shards=2"])
    text = path.read_text()
    assert yaml.safe_load(text)["sample"]["stages"] == {"whole": [], "sharded": ["ssd", "null"], "shard": [0, 1]}
    assert "    shard: [0, 1]            # 0 .. shards-1" in text  # in flow style, comments kept
    two = rendered_stages(root)
    sample = {name: stage for name, stage in two.items() if name.startswith("sample")}
    assert set(sample) == {f"sample-shard@{c}-{i}" for c in ("ssd", "null") for i in (0, 1)} | {
        "sample-merge@ssd", "sample-merge@null"}
    assert sample["sample-shard@null-1"]["cmd"] == "python -m tasks.sample --config null --shard 1"
    assert "samples/null/shards" in sample["sample-merge@null"]["deps"]
    # Downstream stages read the same file, now written by the merge.
    assert set(two) - set(sample) == set(one) - {"sample@ssd", "sample@null"}

    update_params_file(path, ["sample.shards=1"])
    assert rendered_stages(root) == one


def test_evaluate_stage_lists_follow_its_shards_and_the_models_evaluated():
    raw = raw_params()
    raw["evaluate"]["shards"] = 2  # by hand, stages left as they were
    with pytest.raises(ParamsError) as err:
        validate_params(raw)
    assert 'set evaluate.stages to {whole: [], sharded: ["base", "ssd-none", "null-none"], shard: [0, 1]}' in str(err.value)
    raw = raw_params()
    raw["arms"]["ssd-syntax"] = {"sample": "ssd", "filter": "syntax"}  # an arm added by hand is a model to evaluate
    with pytest.raises(ParamsError, match=r'whole: \["base", "ssd-none", "null-none", "ssd-syntax"\]'):
        validate_params(raw)


def test_setting_evaluate_shards_makes_validation_test_and_merge_stages(tmp_path, monkeypatch):
    root = tmp_path / "ws"
    path = write_params(root)
    (root / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    init_repo(root)
    monkeypatch.chdir(root)
    one = rendered_stages(root)
    models = ["base", "ssd-none", "null-none"]
    assert {name for name in one if name.startswith("evaluate")} == {f"evaluate@{m}" for m in models}
    assert one["evaluate@base"]["cmd"] == "python -m tasks.evaluate --model models/base --name base"

    update_params_file(path, ["evaluate.shards=2"])
    assert yaml.safe_load(path.read_text())["evaluate"]["stages"] == {"whole": [], "sharded": models, "shard": [0, 1]}
    two = rendered_stages(root)
    evaluate = {name: stage for name, stage in two.items() if name.startswith("evaluate")}
    assert set(evaluate) == {f"evaluate-{part}@{m}-{i}" for part in ("validation", "test") for m in models
                             for i in (0, 1)} | {f"evaluate-merge@{m}" for m in models}
    assert evaluate["evaluate-test@null-none-1"]["cmd"] == (
        "python -m tasks.evaluate --model models/null-none --name null-none --shard 1 --part test")
    assert "eval/base/shards/validation" in evaluate["evaluate-test@base-0"]["deps"]  # T_eval from every validation shard
    assert "eval/ssd-none/shards" in evaluate["evaluate-merge@ssd-none"]["deps"]
    assert "models/ssd-none" not in evaluate["evaluate-merge@ssd-none"]["deps"]  # the merge joins files only
    # Downstream stages read the same files, now written by the merges.
    assert set(two) - set(evaluate) == set(one) - {f"evaluate@{m}" for m in models}

    update_params_file(path, ["evaluate.shards=1"])
    assert rendered_stages(root) == one


def test_the_plan_counts_each_evaluate_shard(tmp_path):
    from tasks.commands.plan import load_for_plan
    from tasks.core import shapes
    from tasks.core.plan import GiB, Machine, plan

    machine = Machine(gpu=None, ram=16 * GiB, cores=2)

    def evaluate_plan(shards):
        params = load_for_plan(REPO / "params.yaml", overrides=[f"evaluate.shards={shards}"])
        plans = plan(params, shapes.model_shape(params.model.base, params.model.revision, REPO), machine)
        return next(s for s in plans if any(name.startswith("evaluate") for name in s.stages))

    one, two = evaluate_plan(1), evaluate_plan(2)
    assert one.stages == ["evaluate@base", "evaluate@ssd-none", "evaluate@null-none"]
    assert "evaluate-validation@base-1" in two.stages and "evaluate-test@null-none-0" in two.stages
    assert len(two.stages) == 3 * 2 * 2
    assert two.seconds < one.seconds  # each shard stage decodes a share of the model's passes
