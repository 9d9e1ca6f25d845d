"""Stage `sample`: raw completions of the train prompts from the frozen base model, at one named
sampling config (`python -m tasks.sample --config ssd`: sample.configs.ssd, one DVC foreach
stage each: the paper's T_train with truncation, the `null` control, the `gibberish` stress test).

No verification of any kind: SSD trains on what the model wrote. Each row records the
prompt id, sample index, chat messages, raw text, token count, finish reason and whether
a fenced code block can be extracted. Killed runs resume (see tasks.sampling.generate).

With sample.shards N > 1 the work of a config is N stages and a merge (dvc.yaml):
`--shard I` (sample-shard@<config>-<I>) decodes the batches b % N == I of the plan the whole run
would follow, each resumable on its own, into samples/<config>/shards/<I>.jsonl; `--merge`
(sample-merge@<config>) checks that the shards hold every (prompt, sample index) once and writes
them in the whole run's order: the same samples.jsonl and stats.json, byte for byte.
"""
from __future__ import annotations

import argparse
import sys

from tasks.core import paths
from tasks.core.config import ParamsError, load_params, named, run_stage, sampling_decoding
from tasks.core.extract import last_fenced_block
from tasks.core.files import DataError, read_jsonl, write_json, write_jsonl
from tasks.core.problems import chat_messages
from tasks.sampling.generate import Request, check_not_degenerate, discard_partials, generate_jsonl, generate_rows


def sample_stats(rows: list[dict]) -> dict:
    n = len(rows)
    return {
        "samples": n,
        "extractable_fraction": sum(r["extractable"] for r in rows) / n if n else 0.0,
        "eos_fraction": sum(r["finish_reason"] == "eos" for r in rows) / n if n else 0.0,
        "mean_tokens": sum(r["num_tokens"] for r in rows) / n if n else 0.0,
    }


def finish(name: str, rows: list[dict]) -> None:
    """The config's samples.jsonl and stats.json from its rows (in request, sample-index order)."""
    for row in rows:
        row.pop("batch")
        row["extractable"] = last_fenced_block(row["text"]) is not None
    write_jsonl(paths.samples(name), rows)
    stats = sample_stats(rows)
    write_json(paths.sample_stats(name), stats)
    discard_partials(paths.samples(name))
    print(f"sample[{name}]: {stats}")


def merged_shards(name: str, shards: int, problems: list[dict], n: int) -> list[dict]:
    """The rows of shards 0 .. shards-1, checked to hold each (prompt, sample index) of the run
    exactly once, in the order the whole run writes them: by prompt as in data/train.jsonl, then
    by sample index."""
    rows = []
    for shard in range(shards):
        path = paths.sample_shard(name, shard)
        try:
            rows += read_jsonl(path)
        except FileNotFoundError:
            raise DataError(f"{path}: missing (stage sample-shard@{name}-{shard} writes it)") from None
    order = {p["task_id"]: i for i, p in enumerate(problems)}
    units = [(row.get("prompt_id"), row.get("sample_index")) for row in rows]
    expected = {(p["task_id"], s) for p in problems for s in range(n)}
    if len(units) != len(set(units)) or set(units) != expected:
        missing, extra = sorted(expected - set(units)), sorted(set(units) - expected)
        raise DataError(f"{paths.sample_shards_dir(name)}: {shards} shards hold {len(units)} rows "
                        f"({len(set(units))} distinct), not the {len(expected)} (prompt, sample index) pairs of "
                        f"{paths.TRAIN_PROBLEMS} x sample.n {n}; missing e.g. {missing[:3]}, not of this run e.g. "
                        f"{extra[:3]}: rerun the sample-shard@{name}-* stages")
    return sorted(rows, key=lambda row: (order[row["prompt_id"]], row["sample_index"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.sample")
    parser.add_argument("--config", required=True, help="a key of sample.configs in params.yaml")
    part = parser.add_mutually_exclusive_group()
    part.add_argument("--shard", type=int, metavar="I",
                      help="decode only shard I of sample.shards (its batches b %% shards == I) into "
                           "samples/<config>/shards/I.jsonl")
    part.add_argument("--merge", action="store_true", help="merge the config's sample.shards shards into its samples")
    args = parser.parse_args(argv)
    name = args.config
    params = load_params()
    named(params.sample.configs, name, "sample.configs")
    problems = read_jsonl(paths.TRAIN_PROBLEMS)
    if not problems:
        raise DataError(f"{paths.TRAIN_PROBLEMS}: no train prompts")
    if args.merge:
        rows = merged_shards(name, params.sample.shards, problems, params.sample.n)
        check_not_degenerate(rows, paths.samples(name))
        finish(name, rows)
        return 0
    # Prompts only: solutions and tests never reach the sampler.
    requests = [Request({"prompt_id": p["task_id"]}, chat_messages(p)) for p in problems]
    cfg, engine = sampling_decoding(params.sample, name), {"vllm": params.vllm.model_dump()}
    if args.shard is None:
        finish(name, generate_jsonl(paths.BASE_MODEL, requests, cfg, paths.samples(name), desc=f"sample[{name}]",
                                    engine=engine))
        return 0
    shards = params.sample.shards
    if not 0 <= args.shard < shards:
        raise ParamsError(f"--shard {args.shard}: sample.shards is {shards}, so shards are 0 .. {shards - 1}")
    out = paths.sample_shard(name, args.shard)
    rows = generate_rows(paths.BASE_MODEL, requests, cfg, paths.partial_of(out), engine=engine,
                         desc=f"sample[{name}] shard {args.shard}/{shards}", shard=(args.shard, shards))
    if not rows:
        print(f"sample[{name}] shard {args.shard}/{shards}: no batch of the plan falls to this shard "
              f"(fewer batches than sample.shards: lower sample.batch_size or sample.shards)")
    write_jsonl(out, rows)
    discard_partials(out)
    print(f"sample[{name}] shard {args.shard}/{shards}: {len(rows)} samples")
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
