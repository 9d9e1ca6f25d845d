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

Nothing is decoded twice and batches are full: the whole T_eval sweep is one decoding pass,
each validation prompt's requests at every T next to each other (each with its own T; the
continuous backends compute the prompt's prefill once for all of them), written out as one
file per T; every test set at one seed is one pass too, one file per set. A pass resumes as
one unit (its partial file is named by paths.eval_pass).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass

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
from tasks.sampling.generate import Request, check_not_degenerate, discard_partials, generate_rows


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


@dataclass(frozen=True)
class Output:
    """One sample file of a decoding pass: answers to `problems` at `temperature`."""
    path: str
    problems: list[dict]
    temperature: float


def answer_and_check(backend, model_dir: str, outputs: list[Output], cfg: DecodingConfig, run: str, desc: str,
                     timeout_s: float, sandbox_cfg) -> list[list[dict]]:
    """n answers per problem of every output, decoded in one pass whose partial work is kept
    under `run` (paths.eval_pass), each with its sandbox verdict; each output's rows, ordered
    by problem then sample index, go to its file and are returned in the order of `outputs`.
    An output at a T other than cfg.temperature has its requests decoded at their own T."""
    if not outputs:
        return []
    for out in outputs:
        if not out.problems:
            raise DataError(f"{desc}: {out.path}: no problems")
    # A prompt's requests in every output next to each other: the plan keeps them in one
    # batch, where they share the prompt's prefill.
    by_prompt: dict[str, list[Request]] = {}
    for i, out in enumerate(outputs):
        own_t = None if out.temperature == cfg.temperature else out.temperature
        for problem in out.problems:
            messages = chat_messages(problem)
            by_prompt.setdefault(json.dumps(messages), []).append(
                Request({"output": i, "task_id": problem["task_id"]}, messages, own_t))
    requests = [request for group in by_prompt.values() for request in group]
    rows = generate_rows(model_dir, requests, cfg, paths.partial_of(run), desc=desc, backend=backend)
    per_output: list[list[dict]] = [[] for _ in outputs]
    for row in rows:
        per_output[row.pop("output")].append(row)
    problems_by_id = [{p["task_id"]: p for p in out.problems} for out in outputs]
    for out, out_rows, by_id in zip(outputs, per_output, problems_by_id):
        position = {task_id: k for k, task_id in enumerate(by_id)}
        out_rows.sort(key=lambda row: (position[row["task_id"]], row["sample_index"]))
        check_not_degenerate(out_rows, out.path)
    checked = [(row, by_id[row["task_id"]]) for out_rows, by_id in zip(per_output, problems_by_id) for row in out_rows]
    verdicts = sandbox.check_programs([answer_job(problem, row["text"]) for row, problem in checked],
                                      timeout_s=timeout_s, memory_mb=sandbox_cfg.memory_mb,
                                      workers=sandbox_cfg.workers, progress=True)
    for (row, _), verdict in zip(checked, verdicts):
        row.pop("batch")
        row["extractable"] = last_fenced_block(row["text"]) is not None
        row["passed"], row["result"] = verdict.passed, verdict.result
    for out, out_rows in zip(outputs, per_output):
        write_jsonl(out.path, out_rows)
    return per_output


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
            decoding_at(cfg, t)  # each swept T is one the backend can sample (it raises naming the key)
        answer_and_check(backend, model_dir, [Output(paths.validation_samples(name, t), validation, t)
                                              for t in cfg.sweep],
                         decoding_at(cfg, cfg.temperature), paths.eval_pass(name, "validation"),
                         f"evaluate[{name}/validation T=" + ",".join(f"{t:g}" for t in cfg.sweep) + "]",
                         cfg.timeout_s, params.sandbox)
        choice = choose_temperature(name, cfg.sweep, cfg.temperature, cfg.sweep_confidence, cfg.seed)
        chosen, by_t = choice["chosen"], choice["pass@1"]
        metrics["validation"] = {"problems": len(validation), "pass@1_by_temperature": {f"{t:g}": v for t, v in by_t.items()},
                                 "chosen_temperature": chosen,
                                 "vs_tie_breaker": {f"{t:g}": v for t, v in choice["vs_tie_breaker"].items()}}
        print(f"evaluate[{name}]: validation pass@1 " + ", ".join(f"T={t:g} {v:.3f}" for t, v in by_t.items())
              + f"; T_eval {chosen:g}")
    test_sets = [(eval_set.name, read_jsonl(paths.eval_problems(eval_set.name))) for eval_set in params.data.eval]
    by_seed: dict[int, list[list[dict]]] = {}
    for seed in range(cfg.seed, cfg.seed + cfg.repeats):
        # Every test set at this seed in one pass; the first seed's files are the results, the
        # next seeds' the repeats (evaluate.repeats).
        first = seed == cfg.seed
        outputs = [Output(paths.eval_samples(name, set_name) if first else paths.repeat_samples(name, set_name, seed),
                          problems, chosen) for set_name, problems in test_sets]
        by_seed[seed] = answer_and_check(backend, model_dir, outputs, decoding_at(cfg, chosen, seed),
                                         paths.eval_pass(name, f"test.seed{seed}"),
                                         f"evaluate[{name}/test" + ("" if first else f" seed {seed}") + "]",
                                         cfg.timeout_s, params.sandbox)
    for k, (set_name, problems) in enumerate(test_sets):
        metrics["sets"][set_name] = dict(set_metrics(problems, by_seed[cfg.seed][k], cfg.n), temperature=chosen)
        print(f"evaluate[{name}/{set_name}] at T={chosen:g}: " + ", ".join(
            f"pass@{n}={metrics['sets'][set_name][f'pass@{n}']:.3f}" for n in range(1, cfg.n + 1)))
        if cfg.repeats > 1:
            pass_at_1 = {seed: set_metrics(problems, rows[k], cfg.n)["pass@1"] for seed, rows in by_seed.items()}
            metrics["sets"][set_name]["pass@1_by_seed"] = {str(seed): v for seed, v in pass_at_1.items()}
            print(f"evaluate[{name}/{set_name}]: pass@1 by seed " + ", ".join(
                f"{seed}: {v:.3f}" for seed, v in pass_at_1.items()))
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
