"""Stage `evaluate`: a model on every eval set, its code executed in the sandbox.

First T_eval is chosen for this model: the validation set (disjoint from every test problem) is
decoded at each T of `evaluate.sweep`, and the T with the best validation pass@1 is kept (the
paper: tuning T_eval alone moves pass@1, so each model, the base included, is compared at its
own best T). Then `evaluate.n` samples per problem of each eval set at that T; code is taken
from each answer as a careful user would (tasks.core.jobs) and run against the problem's tests.
Outputs eval/<name>/samples/<set>.jsonl (one row per sample with its verdict) and
eval/<name>/metrics.json (per eval set: unbiased pass@k for every k <= n, the same per
difficulty band where the set has difficulties, and the count of each verdict). With
`evaluate.repeats` > 1 each test set is decoded again with the next seeds (under
eval/<name>/samples/repeats/) and pass@1 per seed is recorded: the seed-to-seed noise.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter, defaultdict

from tasks import sandbox
from tasks.analysis.selection import choose_temperature
from tasks.core import paths
from tasks.core.config import DecodingConfig, load_params, run_stage
from tasks.core.extract import last_fenced_block
from tasks.core.files import DataError, read_jsonl, write_json, write_jsonl
from tasks.core.jobs import answer_job
from tasks.core.metrics import mean_pass_at_k, per_problem_counts
from tasks.core.problems import chat_messages, difficulty_band
from tasks.sampling.backends import load_backend
from tasks.sampling.generate import Request, discard_partials, generate_jsonl


def set_metrics(problems: list[dict], rows: list[dict], n: int) -> dict:
    counts = per_problem_counts(rows)
    metrics = {
        "problems": len(problems),
        "samples": len(rows),
        **{f"pass@{k}": mean_pass_at_k(list(counts.values()), k) for k in range(1, n + 1)},
        "extractable_fraction": sum(r["extractable"] for r in rows) / len(rows),
        "mean_tokens": sum(r["num_tokens"] for r in rows) / len(rows),
        "results": dict(Counter(r["result"].split(":")[0] for r in rows)),
    }
    bands = defaultdict(list)
    for problem in problems:
        band = difficulty_band(problem.get("difficulty"))
        if band is not None:
            bands[band].append(counts[problem["task_id"]])
    if bands:
        metrics["by_difficulty"] = {band: {"problems": len(c), **{f"pass@{k}": mean_pass_at_k(c, k)
                                                               for k in range(1, n + 1)}}
                                    for band, c in sorted(bands.items())}
    return metrics


def decoding_at(cfg, temperature: float, seed: int | None = None) -> DecodingConfig:
    """The evaluation's decoding settings at one T_eval (only the decoding keys are read)."""
    return DecodingConfig.model_validate({**{name: getattr(cfg, name) for name in DecodingConfig.model_fields},
                                          "temperature": temperature, **({} if seed is None else {"seed": seed})})


def answer_and_check(backend, model_dir: str, problems: list[dict], cfg: DecodingConfig, out: str, desc: str,
                     timeout_s: float, sandbox_cfg) -> list[dict]:
    """n answers per problem into `out`, each with its sandbox verdict."""
    if not problems:
        raise DataError(f"{desc}: no problems")
    requests = [Request({"task_id": p["task_id"]}, chat_messages(p)) for p in problems]
    rows = generate_jsonl(model_dir, requests, cfg, out, desc=desc, backend=backend)
    by_id = {p["task_id"]: p for p in problems}
    verdicts = sandbox.check_programs([answer_job(by_id[row["task_id"]], row["text"]) for row in rows],
                                      timeout_s=timeout_s, memory_mb=sandbox_cfg.memory_mb,
                                      workers=sandbox_cfg.workers, progress=True)
    for row, verdict in zip(rows, verdicts):
        row.pop("batch")
        row["extractable"] = last_fenced_block(row["text"]) is not None
        row["passed"], row["result"] = verdict.passed, verdict.result
    write_jsonl(out, rows)
    return rows


def conversations_answered(params) -> list[list[dict]]:
    """The chat of every problem this stage decodes (validation when swept, every eval set): an
    engine sized at start (vllm) is sized for the longest of them."""
    problems = read_jsonl(paths.VALIDATION_PROBLEMS) if params.evaluate.sweep else []
    for eval_set in params.data.eval:
        problems += read_jsonl(paths.eval_problems(eval_set.name))
    return [chat_messages(p) for p in problems]


def evaluate(model_dir: str, name: str) -> dict:
    params = load_params()
    cfg = params.evaluate
    backend = load_backend(cfg.backend, model_dir, engine={"vllm": params.vllm.model_dump()},  # once, for every set
                           conversations=conversations_answered(params), max_new_tokens=cfg.max_new_tokens)
    metrics = {"model": model_dir, "sets": {}}
    chosen = cfg.temperature
    if cfg.sweep:
        # T_eval is chosen on the validation set before any test problem is decoded.
        validation = read_jsonl(paths.VALIDATION_PROBLEMS)
        for t in cfg.sweep:
            answer_and_check(backend, model_dir, validation, decoding_at(cfg, t), paths.validation_samples(name, t),
                             f"evaluate[{name}/validation T={t:g}]", cfg.timeout_s, params.sandbox)
        choice = choose_temperature(name, cfg.sweep, cfg.temperature, cfg.sweep_confidence, cfg.seed)
        chosen, by_t = choice["chosen"], choice["pass@1"]
        metrics["validation"] = {"problems": len(validation), "pass@1_by_temperature": {f"{t:g}": v for t, v in by_t.items()},
                                 "chosen_temperature": chosen,
                                 "vs_tie_breaker": {f"{t:g}": v for t, v in choice["vs_tie_breaker"].items()}}
        print(f"evaluate[{name}]: validation pass@1 " + ", ".join(f"T={t:g} {v:.3f}" for t, v in by_t.items())
              + f"; T_eval {chosen:g}")
    test_cfg = decoding_at(cfg, chosen)
    for eval_set in params.data.eval:
        problems = read_jsonl(paths.eval_problems(eval_set.name))
        rows = answer_and_check(backend, model_dir, problems, test_cfg, paths.eval_samples(name, eval_set.name),
                                f"evaluate[{name}/{eval_set.name}]", cfg.timeout_s, params.sandbox)
        metrics["sets"][eval_set.name] = dict(set_metrics(problems, rows, cfg.n), temperature=chosen)
        print(f"evaluate[{name}/{eval_set.name}] at T={chosen:g}: " + ", ".join(
            f"pass@{k}={metrics['sets'][eval_set.name][f'pass@{k}']:.3f}" for k in range(1, cfg.n + 1)))
        if cfg.repeats > 1:
            by_seed = {cfg.seed: metrics["sets"][eval_set.name]["pass@1"]}
            for seed in range(cfg.seed + 1, cfg.seed + cfg.repeats):
                again = answer_and_check(backend, model_dir, problems, decoding_at(cfg, chosen, seed),
                                         paths.repeat_samples(name, eval_set.name, seed),
                                         f"evaluate[{name}/{eval_set.name} seed {seed}]", cfg.timeout_s, params.sandbox)
                by_seed[seed] = set_metrics(problems, again, cfg.n)["pass@1"]
            metrics["sets"][eval_set.name]["pass@1_by_seed"] = {str(seed): v for seed, v in by_seed.items()}
            print(f"evaluate[{name}/{eval_set.name}]: pass@1 by seed " + ", ".join(
                f"{seed}: {v:.3f}" for seed, v in by_seed.items()))
    metrics["isolation"] = sandbox.isolation_level()
    write_json(paths.eval_metrics(name), metrics)
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.evaluate")
    parser.add_argument("--model", required=True, help="HF model dir to evaluate")
    parser.add_argument("--name", required=True, help="its name in eval/ and the report: base, or the arm")
    args = parser.parse_args(argv)
    evaluate(args.model, args.name)
    discard_partials(paths.eval_dir(args.name))
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
