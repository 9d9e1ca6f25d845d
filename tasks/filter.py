"""Stage `filter`: which raw samples each arm trains on.

An arm (params `arms.<name>`, one DVC foreach stage each) pairs a sampling config with a filter:
  none         SSD as in the paper: drop only empty outputs and one-line stubs
  shortest     also drop the shortest `filter.shortest_fraction` (as apple/ml-ssd does)
  extractable  also drop samples with no fenced code block
  syntax       also drop samples whose code block does not parse
  passes       also drop samples failing their train problem's tests (rejection sampling,
               the baseline the paper lacks; the only arm that reads tests)
Samples cut off at sample.max_new_tokens (finish_reason "length") are dropped by every filter
with `filter.truncated: drop`; with `keep-open` they keep their finish_reason, and the train
stage trains no end-of-turn token after them.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter

from tasks.core import paths
from tasks.core.config import load_params, named, run_stage
from tasks.core.extract import last_fenced_block, one_line_stub, parses
from tasks.core.files import DataError, read_jsonl, write_json, write_jsonl
from tasks.core.jobs import answer_job


TRUNCATED = "cut off at sample.max_new_tokens"


def drop_reasons(kind: str, rows: list[dict], params, problems: dict[str, dict]) -> list[str | None]:
    """For each sample, why filter `kind` drops it (None keeps it)."""
    drop_truncated = params.filter.truncated == "drop"
    reasons: list[str | None] = [
        "empty or one-line stub" if one_line_stub(r["text"])
        else TRUNCATED if drop_truncated and r["finish_reason"] == "length" else None
        for r in rows]
    if kind == "shortest":
        ranked = sorted((i for i, why in enumerate(reasons) if why is None), key=lambda i: (rows[i]["num_tokens"], i))
        for i in ranked[: int(len(ranked) * params.filter.shortest_fraction)]:
            reasons[i] = "shortest"
    elif kind in ("extractable", "syntax"):
        for i, row in enumerate(rows):
            if reasons[i] is None:
                code = last_fenced_block(row["text"])
                if code is None:
                    reasons[i] = "no code block"
                elif kind == "syntax" and not parses(code):
                    reasons[i] = "syntax error"
    elif kind == "passes":
        from tasks import sandbox

        pending = [i for i, why in enumerate(reasons) if why is None]
        jobs = [answer_job(problems[rows[i]["prompt_id"]], rows[i]["text"]) for i in pending]
        verdicts = sandbox.check_programs(jobs, timeout_s=params.filter.timeout_s,
                                          memory_mb=params.sandbox.memory_mb, workers=params.sandbox.workers,
                                          progress=True)
        for i, verdict in zip(pending, verdicts):
            if not verdict.passed:
                reasons[i] = "fails tests"
    return reasons


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.filter")
    parser.add_argument("--arm", required=True, help="a key of arms in params.yaml")
    arm = parser.parse_args(argv).arm
    params = load_params()
    spec = named(params.arms, arm, "arms")
    kind = spec.filter
    rows = read_jsonl(paths.samples(spec.sample))
    problems = {p["task_id"]: p for p in read_jsonl(paths.TRAIN_PROBLEMS)}
    reasons = drop_reasons(kind, rows, params, problems)
    kept = [
        {"prompt_id": r["prompt_id"], "sample_index": r["sample_index"], "finish_reason": r["finish_reason"],
         "messages": r["messages"] + [{"role": "assistant", "content": r["text"]}]}
        for r, why in zip(rows, reasons) if why is None
    ]
    if not kept:
        raise DataError(f"arm {arm!r} (filter {kind!r}) kept 0 of {len(rows)} samples: nothing to train on "
                        f"(dropped: {dict(Counter(reasons))})")
    stats = {
        "arm": arm,
        "sample": spec.sample,
        "filter": kind,
        "samples": len(rows),
        "kept": len(kept),
        "kept_fraction": len(kept) / len(rows),
        "dropped": dict(Counter(why for why in reasons if why is not None)),
        # Cut off at sample.max_new_tokens: how many were, how many are kept (trained with no
        # end-of-turn label) and how many were dropped for it (filter.truncated: drop).
        "truncated": {"samples": sum(r["finish_reason"] == "length" for r in rows),
                      "kept": sum(r["finish_reason"] == "length" for r in kept),
                      "dropped": reasons.count(TRUNCATED)},
    }
    if kind == "passes":
        from tasks import sandbox

        stats["isolation"] = sandbox.isolation_level()
    write_jsonl(paths.filtered_samples(arm), kept)
    write_json(paths.filter_stats(arm), stats)
    print(f"filter[{arm}]: kept {len(kept)}/{len(rows)} ({stats['truncated']['kept']} of them cut off at "
          f"sample.max_new_tokens: no end-of-turn label); dropped {stats['dropped']}")
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
