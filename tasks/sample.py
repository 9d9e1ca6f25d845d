"""Stage `sample`: raw completions of the train prompts from the frozen base model, at one named
sampling config (`python -m tasks.sample --config ssd`: sample.configs.ssd, one DVC foreach
stage each: the paper's T_train with truncation, the `null` control, the `gibberish` stress test).

No verification of any kind: SSD trains on what the model wrote. Each row records the
prompt id, sample index, chat messages, raw text, token count, finish reason and whether
a fenced code block can be extracted. Killed runs resume (see tasks.sampling.generate).
"""
from __future__ import annotations

import argparse
import sys

from tasks.core import paths
from tasks.core.config import load_params, named, run_stage, sampling_decoding
from tasks.core.extract import last_fenced_block
from tasks.core.files import DataError, read_jsonl, write_json, write_jsonl
from tasks.core.problems import chat_messages
from tasks.sampling.generate import Request, discard_partials, generate_jsonl


def sample_stats(rows: list[dict]) -> dict:
    n = len(rows)
    return {
        "samples": n,
        "extractable_fraction": sum(r["extractable"] for r in rows) / n if n else 0.0,
        "eos_fraction": sum(r["finish_reason"] == "eos" for r in rows) / n if n else 0.0,
        "mean_tokens": sum(r["num_tokens"] for r in rows) / n if n else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.sample")
    parser.add_argument("--config", required=True, help="a key of sample.configs in params.yaml")
    name = parser.parse_args(argv).config
    params = load_params()
    named(params.sample.configs, name, "sample.configs")
    problems = read_jsonl(paths.TRAIN_PROBLEMS)
    if not problems:
        raise DataError(f"{paths.TRAIN_PROBLEMS}: no train prompts")
    # Prompts only: solutions and tests never reach the sampler.
    requests = [Request({"prompt_id": p["task_id"]}, chat_messages(p)) for p in problems]
    rows = generate_jsonl(paths.BASE_MODEL, requests, sampling_decoding(params.sample, name), paths.samples(name),
                          desc=f"sample[{name}]", engine={"vllm": params.vllm.model_dump()})
    for row in rows:
        row.pop("batch")
        row["extractable"] = last_fenced_block(row["text"]) is not None
    write_jsonl(paths.samples(name), rows)
    stats = sample_stats(rows)
    write_json(paths.sample_stats(name), stats)
    discard_partials(paths.samples(name))
    print(f"sample[{name}]: {stats}")
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
