"""Stage `evaluate`: a model on the held-out problems, its code executed in the sandbox.

`evaluate.n` samples per problem at the evaluation decoding settings; code is taken from
each answer as a careful user would (tasks.core.extract) and run against the problem's tests.
Outputs eval/<name>/samples.jsonl (one row per sample with its verdict) and
eval/<name>/metrics.json (unbiased pass@k for every k <= n).
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from tasks.core import paths
from tasks.core.config import load_params, run_stage
from tasks.core.extract import last_fenced_block
from tasks.core.files import DataError, read_jsonl, write_json, write_jsonl
from tasks.core.metrics import mean_pass_at_k, per_problem_counts
from tasks.core.jobs import answer_job
from tasks.core.problems import chat_messages
from tasks.sampling.generate import Request, generate_jsonl


def evaluate(model_dir: str, out_dir: str) -> dict:
    from tasks import sandbox

    params = load_params()
    cfg = params.evaluate
    problems = read_jsonl(paths.EVAL_PROBLEMS)
    if not problems:
        raise DataError(f"{paths.EVAL_PROBLEMS}: no held-out problems")
    out = Path(out_dir)
    samples_file = out / "samples.jsonl"
    requests = [Request({"task_id": p["task_id"]}, chat_messages(p)) for p in problems]
    rows = generate_jsonl(model_dir, requests, cfg, samples_file, desc=f"evaluate[{out.name}]")
    by_id = {p["task_id"]: p for p in problems}
    jobs = [answer_job(by_id[row["task_id"]], row["text"]) for row in rows]
    verdicts = sandbox.check_programs(jobs, timeout_s=cfg.timeout_s, memory_mb=params.sandbox.memory_mb,
                                      workers=params.sandbox.workers, progress=True)
    for row, verdict in zip(rows, verdicts):
        row.pop("batch")
        row["extractable"] = last_fenced_block(row["text"]) is not None
        row["passed"], row["result"] = verdict.passed, verdict.result
    write_jsonl(samples_file, rows)
    counts = list(per_problem_counts(rows).values())
    metrics = {
        "model": model_dir,
        "problems": len(problems),
        "samples": len(rows),
        **{f"pass@{k}": mean_pass_at_k(counts, k) for k in range(1, cfg.n + 1)},
        "extractable_fraction": sum(r["extractable"] for r in rows) / len(rows),
        "mean_tokens": sum(r["num_tokens"] for r in rows) / len(rows),
        "results": dict(Counter(r["result"].split(":")[0] for r in rows)),
        "isolation": sandbox.isolation_level(),
    }
    write_json(out / "metrics.json", metrics)
    print(f"evaluate[{out.name}]: " + ", ".join(f"pass@{k}={metrics[f'pass@{k}']:.3f}" for k in range(1, cfg.n + 1)))
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.evaluate")
    parser.add_argument("--model", required=True, help="HF model dir to evaluate")
    parser.add_argument("--out", required=True, help="output dir, e.g. eval/base")
    args = parser.parse_args(argv)
    evaluate(args.model, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
