"""codeio.convert: needed against a full conversion, on reasoning-gym's real CodeIO data in the
real sandbox: prepare must choose the same problems (task ids, per set, in order) from either.

The pool is the first 300 distinct problems of reasoning-gym's files plus the data's one group
of near-duplicates (three problems), so the full conversion takes seconds; the sets are sized so
the lazy one stops well before the end of each part of the seeded order, and SHARED's split_seed
puts two of the near-duplicates among the first of the train part with the one that near-
duplicate removal keeps far behind them. A conversion is itself not perfectly repeatable (a
reference whose output follows set order is caught as nondeterministic only when the two passes'
hash seeds order its sets differently; one near the timeout may time out under load): the test
says so, naming the problems, when a problem both runs converted came out differently, and
test_the_choice_is_the_full_ones_for_the_same_outcomes checks the same with the full run's
outcomes standing in for the sandbox (no such noise), over more seeds, shares and margins.
"""
from __future__ import annotations

import json
import types

import pytest

from tasks.core import paths
from tasks.core.config import DataConfig
from tasks.core.files import DataError, read_jsonl, write_json, write_jsonl
from tasks.core.problems import is_held_out, rank_key, source_draw
from tasks.problemsets import Report
from tasks.problemsets import codeio
from tasks.problemsets.codeio import Needed, convert_needed

FIRST = 300
NEAR_DUPLICATES = ("codeio/6b276d39a172", "codeio/c0d055b7cad8", "codeio/e309569bed77")
HUMANEVAL_EVAL = {"name": "humaneval", "source": "humaneval", "max_problems": 3}
# CodeIO is train's source and an eval set's: split, near-duplicates, decontamination.
SHARED = {"train": {"source": "codeio", "max_problems": 12}, "validation": {"source": "codeio", "max_problems": 5},
          "eval": [HUMANEVAL_EVAL, {"name": "codeio", "source": "codeio", "max_problems": 6}],
          "eval_fraction": 0.2, "split_seed": 25}
# CodeIO only held out: validation and an eval set from it, train from HumanEval.
HELD_OUT_ONLY = {"train": {"source": "humaneval", "max_problems": 8},
                 "validation": {"source": "codeio", "max_problems": 4},
                 "eval": [HUMANEVAL_EVAL, {"name": "codeio", "source": "codeio", "max_problems": 7}],
                 "eval_fraction": 0.2, "split_seed": 0}


@pytest.fixture(scope="module")
def convert_args(tmp_path_factory) -> dict:
    """convert_needed's arguments for the test's pool: a JSONL of reasoning-gym's own rows."""
    rows = codeio.read_distinct(codeio.data_files(), Report(source={}), None)
    pool = rows[:FIRST] + [r for r in rows[FIRST:] if r[0] in NEAR_DUPLICATES]
    assert len(pool) == FIRST + 3
    path = tmp_path_factory.mktemp("codeio") / "codeio.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for _, _, row in pool))
    return dict(tests=3, seed=0, timeout_s=5.0, memory_mb=1024, workers=0, paths=[path])


def data_config(raw: dict) -> DataConfig:
    return DataConfig.model_validate(raw)


def needed(data: DataConfig, margin: float = 0.25) -> Needed:
    return Needed(draw=source_draw(data, "codeio"), split_seed=data.split_seed, eval_fraction=data.eval_fraction,
                  margin=margin)


@pytest.fixture(scope="module")
def full(convert_args):
    return convert_needed(**convert_args)


def prepared(workspace, monkeypatch, conversion, data: DataConfig) -> dict[str, list[str]]:
    """prepare's choice from `conversion` (problems, report, catalog): task ids per set."""
    from tasks.prepare import prepare_data

    workspace.mkdir()
    monkeypatch.chdir(workspace)
    problems, report, catalog = conversion
    write_jsonl(paths.CODEIO_PROBLEMS, problems)
    write_jsonl(paths.CODEIO_CATALOG, catalog)
    write_json(paths.CODEIO_SOURCE, report.counts())
    prepare_data(types.SimpleNamespace(data=data))
    ids = lambda path: [row["task_id"] for row in read_jsonl(path)]  # noqa: E731
    chosen = {"train": ids(paths.TRAIN_PROBLEMS), "validation": ids(paths.VALIDATION_PROBLEMS)}
    chosen.update({f"eval/{s.name}": ids(f"{paths.EVAL_PROBLEMS}/{s.name}.jsonl") for s in data.eval})
    return chosen


def same_outcomes(full_catalog: list[dict], lazy_catalog: list[dict]) -> None:
    lazy = {row["task_id"]: row["status"] for row in lazy_catalog if row["status"] != "unconverted"}
    differ = [(row["task_id"], row["status"], lazy[row["task_id"]]) for row in full_catalog
              if row["task_id"] in lazy and lazy[row["task_id"]] != row["status"]]
    assert not differ, f"the conversion itself gave other outcomes (full, lazy): {differ}"


@pytest.mark.parametrize("raw", [SHARED, HELD_OUT_ONLY], ids=["shared", "held-out-only"])
def test_needed_conversion_leads_prepare_to_the_full_conversions_choice(full, convert_args, raw, tmp_path,
                                                                       monkeypatch):
    data = data_config(raw)
    lazy = convert_needed(**convert_args, needed=needed(data))
    _, report, catalog = lazy
    assert report.notes["convert"]["mode"] == "needed"
    assert 0 < report.notes["converted"] < len(catalog) // 2, report.notes
    assert {row["status"] for row in catalog} == {"kept", "dropped", "unconverted"}
    assert report.notes["unconverted"] == sum(row["status"] == "unconverted" for row in catalog)
    same_outcomes(full[2], catalog)
    want = prepared(tmp_path / "full", monkeypatch, full, data)
    got = prepared(tmp_path / "lazy", monkeypatch, lazy, data)
    assert got == want
    assert all(want.values()) and len(want["train"]) == data.train.max_problems


@pytest.mark.parametrize("split_seed, eval_fraction, margin", [
    (25, 0.2, 0.25), (25, 0.2, 0.0), (30, 0.2, 0.0), (280, 0.5, 0.0), (0, 0.02, 0.1), (7, 0.9, 0.0)])
def test_the_choice_is_the_full_ones_for_the_same_outcomes(full, convert_args, split_seed, eval_fraction, margin,
                                                           tmp_path, monkeypatch):
    """The full run's outcome of each problem stands in for the sandbox: the lazy choice must be the
    full one for every seed, share and margin (the near-duplicates among the first ranked for
    seeds 25, 30 and 280; a held-out part too small for its eval set at 0.02)."""
    full_tests = {problem["task_id"]: problem["tests"] for problem in full[0]}

    def outcomes_of_the_full_run(batch, **_):
        kept = [c for c in batch if c.task_id in full_tests]
        for c in kept:
            c.tests = full_tests[c.task_id]
        return kept

    monkeypatch.setattr(codeio, "run_candidates", outcomes_of_the_full_run)
    # Decontamination's template n-grams are counted over every catalogued problem, converted or
    # not (in this small pool no verdict turns on it; at reasoning-gym's scale some do).
    import tasks.prepare
    counted = []
    decontaminate = tasks.prepare.decontaminate

    def counting(candidates, references, **kwargs):
        counted.append({p["task_id"] for p in kwargs.get("corpus", ())})
        return decontaminate(candidates, references, **kwargs)

    monkeypatch.setattr(tasks.prepare, "decontaminate", counting)
    for raw in (SHARED, HELD_OUT_ONLY):
        data = data_config(dict(raw, split_seed=split_seed, eval_fraction=eval_fraction))
        lazy = convert_needed(**convert_args, needed=needed(data, margin))
        assert lazy[1].notes["unconverted"] > 0
        want = prepared(tmp_path / f"full-{raw is SHARED}", monkeypatch, full, data)
        assert prepared(tmp_path / f"lazy-{raw is SHARED}", monkeypatch, lazy, data) == want
        assert counted[-1] >= {row["task_id"] for row in lazy[2]}


def test_prepare_stops_where_the_conversion_does_not_cover_its_choice(convert_args, tmp_path, monkeypatch):
    """prepare never chooses from what happened to be converted: a set that wants more than the
    converted first problems of its part (params changed, or more train prompts dropped to
    decontamination than codeio.margin allowed), or an unconverted problem ranking before a
    chosen one, stops it naming the keys to change."""
    data = data_config(SHARED)
    problems, report, catalog = convert_needed(**convert_args, needed=needed(data, margin=0.0))
    bigger = data_config(dict(SHARED, train={"source": "codeio", "max_problems": 40}))
    with pytest.raises(DataError, match="wants more CodeIO problems.*codeio.margin.*codeio.convert: all"):
        prepared(tmp_path / "bigger", monkeypatch, (problems, report, catalog), bigger)
    # the first problem of the train part's order taken out, as a conversion that skipped it
    first = min((row for row in catalog if row["status"] == "kept"
                 and not is_held_out(row["task_id"], data.eval_fraction, data.split_seed)),
                key=lambda row: rank_key(row["task_id"], data.split_seed))
    cut = [dict(row, status="unconverted") if row is first else row for row in catalog]
    problems = [p for p in problems if p["task_id"] != first["task_id"]]
    with pytest.raises(DataError, match=f"{first['task_id']} was not converted but ranks before a chosen one"):
        prepared(tmp_path / "cut", monkeypatch, (problems, report, cut), data)


def test_a_set_of_all_converts_all():
    data = data_config(dict(SHARED, train={"source": "codeio", "max_problems": 0}))
    assert None in needed(data).targets().values()
    assert needed(data_config(HELD_OUT_ONLY)).targets() == {"rest": 4 + 7}
    shared = needed(data_config(SHARED)).targets()
    assert shared == {"held-out": 6, "rest": 12 + 5 + 3}
    unused = dict(HELD_OUT_ONLY, validation={"source": "humaneval", "max_problems": 2}, eval=[HUMANEVAL_EVAL])
    assert needed(data_config(unused)).targets() == {}
