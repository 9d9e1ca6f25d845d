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

With evaluate.shards N > 1 a model's evaluation is 2N stages and a merge (dvc.yaml), each shard
taking the batches b % N == i of every pass the whole stage would decode, with their verdicts:
`--shard I --part validation` (evaluate-validation@<name>-<I>) the T_eval sweep's, `--shard I
--part test` (evaluate-test@<name>-<I>) every test pass's, at the T_eval chosen from all the
validation shards; `--merge` (evaluate-merge@<name>) checks that the shards hold every answer once
and writes the files and metrics one stage writes, byte for byte.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import cached_property

from tasks import sandbox
from tasks.analysis.selection import choose_temperature
from tasks.core import paths
from tasks.core.config import DecodingConfig, ParamsError, load_params, run_stage
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

    @cached_property
    def by_id(self) -> dict[str, dict]:
        return {problem["task_id"]: problem for problem in self.problems}


@dataclass(frozen=True)
class Pass:
    """One decoding pass of the stage: its outputs, decoded together at `temperature` and `seed`
    (an output at another T has its requests decoded at their own T); `name` keys its partial
    work and shards."""
    name: str
    outputs: list[Output]
    temperature: float
    seed: int
    desc: str

    def decoding(self, cfg) -> DecodingConfig:
        for out in self.outputs:
            decoding_at(cfg, out.temperature)  # each T is one the backend can sample (it raises naming the key)
        return decoding_at(cfg, self.temperature, self.seed)


def validation_pass(name: str, cfg, validation: list[dict]) -> Pass:
    return Pass("validation", [Output(paths.validation_samples(name, t), validation, t) for t in cfg.sweep],
                cfg.temperature, cfg.seed,
                f"evaluate[{name}/validation T=" + ",".join(f"{t:g}" for t in cfg.sweep) + "]")


def tested_passes(name: str, cfg, sets: list[tuple[str, list[dict]]], chosen: float) -> list[Pass]:
    """Every test set at one seed is one pass; the first seed's files are the results, the next
    seeds' the repeats (evaluate.repeats)."""
    passes = []
    for seed in range(cfg.seed, cfg.seed + cfg.repeats):
        first = seed == cfg.seed
        outputs = [Output(paths.eval_samples(name, set_name) if first else paths.repeat_samples(name, set_name, seed),
                          problems, chosen) for set_name, problems in sets]
        passes.append(Pass(f"test.seed{seed}", outputs, chosen, seed,
                           f"evaluate[{name}/test" + ("" if first else f" seed {seed}") + "]"))
    return passes


def pass_requests(p: Pass) -> list[Request]:
    """n answers per problem of every output; a prompt's requests in every output next to each
    other, so the plan keeps them in one batch, where they share the prompt's prefill."""
    for out in p.outputs:
        if not out.problems:
            raise DataError(f"{p.desc}: {out.path}: no problems")
    by_prompt: dict[str, list[Request]] = {}
    for i, out in enumerate(p.outputs):
        own_t = None if out.temperature == p.temperature else out.temperature
        for problem in out.problems:
            messages = chat_messages(problem)
            by_prompt.setdefault(json.dumps(messages), []).append(
                Request({"output": i, "task_id": problem["task_id"]}, messages, own_t))
    return [request for group in by_prompt.values() for request in group]


def by_output(p: Pass, rows: list[dict]) -> list[list[dict]]:
    """The pass's rows split by output (the key dropped), each ordered by problem then sample
    index and checked not degenerate."""
    per_output: list[list[dict]] = [[] for _ in p.outputs]
    for row in rows:
        per_output[row.pop("output")].append(row)
    for out, out_rows in zip(p.outputs, per_output):
        position = {task_id: k for k, task_id in enumerate(out.by_id)}
        out_rows.sort(key=lambda row: (position[row["task_id"]], row["sample_index"]))
        check_not_degenerate(out_rows, out.path)
    return per_output


def check_answers(checked: list[tuple[dict, dict]], timeout_s: float, sandbox_cfg) -> None:
    """Each (row, problem)'s answer run against the problem's tests: its verdict into the row."""
    verdicts = sandbox.check_programs([answer_job(problem, row["text"]) for row, problem in checked],
                                      timeout_s=timeout_s, memory_mb=sandbox_cfg.memory_mb,
                                      workers=sandbox_cfg.workers, progress=True)
    for (row, _), verdict in zip(checked, verdicts):
        row.pop("batch")
        row["extractable"] = last_fenced_block(row["text"]) is not None
        row["passed"], row["result"] = verdict.passed, verdict.result


def answer_and_check(backend, model_dir: str, p: Pass, name: str, cfg, sandbox_cfg) -> list[list[dict]]:
    """The pass decoded (resumable: its partial work is kept under paths.eval_pass), each answer
    with its sandbox verdict; each output's rows go to its file and are returned in the order of
    the pass's outputs."""
    rows = generate_rows(model_dir, pass_requests(p), p.decoding(cfg), paths.partial_of(paths.eval_pass(name, p.name)),
                         desc=p.desc, backend=backend)
    per_output = by_output(p, rows)
    check_answers([(row, out.by_id[row["task_id"]]) for out, out_rows in zip(p.outputs, per_output) for row in out_rows],
                  cfg.timeout_s, sandbox_cfg)
    for out, out_rows in zip(p.outputs, per_output):
        write_jsonl(out.path, out_rows)
    return per_output


def conversations_answered(params) -> list[list[dict]]:
    """The chat of every problem this stage decodes (validation when swept, every eval set): an
    engine sized at start (vllm) is sized for the longest of them."""
    problems = read_jsonl(paths.VALIDATION_PROBLEMS) if params.evaluate.sweep else []
    for eval_set in params.data.eval:
        problems += read_jsonl(paths.eval_problems(eval_set.name))
    return [chat_messages(p) for p in problems]


def stage_backend(params, model_dir: str):
    cfg = params.evaluate
    return load_backend(cfg.backend, model_dir, engine={"vllm": params.vllm.model_dump()},  # once, for every pass
                        conversations=conversations_answered(params), max_new_tokens=cfg.max_new_tokens)


def tested_sets(params) -> list[tuple[str, list[dict]]]:
    return [(eval_set.name, read_jsonl(paths.eval_problems(eval_set.name))) for eval_set in params.data.eval]


def chosen_temperature(name: str, cfg, validation: list[dict], answers: list[list[dict]] | None, metrics: dict) -> float:
    """T_eval from the validation answers at each swept T (none without a sweep: the tie-breaker),
    recorded in metrics["validation"]."""
    if not cfg.sweep:
        return cfg.temperature
    choice = choose_temperature(dict(zip(cfg.sweep, answers)), cfg.temperature, cfg.sweep_confidence, cfg.seed)
    chosen, by_t = choice["chosen"], choice["pass@1"]
    metrics["validation"] = {"problems": len(validation), "pass@1_by_temperature": {f"{t:g}": v for t, v in by_t.items()},
                             "chosen_temperature": chosen,
                             "vs_tie_breaker": {f"{t:g}": v for t, v in choice["vs_tie_breaker"].items()}}
    print(f"evaluate[{name}]: validation pass@1 " + ", ".join(f"T={t:g} {v:.3f}" for t, v in by_t.items())
          + f"; T_eval {chosen:g}")
    return chosen


def write_metrics(name: str, model_dir: str, cfg, sets: list[tuple[str, list[dict]]], chosen: float,
                  by_seed: dict[int, list[list[dict]]], metrics: dict) -> dict:
    metrics = {"model": model_dir, **metrics, "sets": {}}
    for k, (set_name, problems) in enumerate(sets):
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


def evaluate(model_dir: str, name: str) -> dict:
    """The whole stage evaluate@<name>: T_eval chosen on the validation set before any test
    problem is decoded, then every test set at it."""
    params = load_params()
    cfg = params.evaluate
    backend = stage_backend(params, model_dir)
    validation, answers, metrics = [], None, {}
    if cfg.sweep:
        validation = read_jsonl(paths.VALIDATION_PROBLEMS)
        answers = answer_and_check(backend, model_dir, validation_pass(name, cfg, validation), name, cfg,
                                   params.sandbox)
    chosen = chosen_temperature(name, cfg, validation, answers, metrics)
    sets = tested_sets(params)
    by_seed = {p.seed: answer_and_check(backend, model_dir, p, name, cfg, params.sandbox)
               for p in tested_passes(name, cfg, sets, chosen)}
    return write_metrics(name, model_dir, cfg, sets, chosen, by_seed, metrics)


def shard_rows(name: str, part: str, shards: int) -> list[dict]:
    rows = []
    for shard in range(shards):
        path = paths.eval_shard(name, part, shard)
        try:
            rows += read_jsonl(path)
        except FileNotFoundError:
            raise DataError(f"{path}: missing (stage evaluate-{part}@{name}-{shard} writes it)") from None
    return rows


def merged_pass(name: str, part: str, p: Pass, rows: list[dict], shards: int, n: int) -> list[list[dict]]:
    """The pass's rows from the shards of `part`, checked to hold each (output, problem, sample
    index) exactly once, split by output in the order the whole stage writes them."""
    mine = [{k: v for k, v in row.items() if k != "pass"} for row in rows if row.get("pass") == p.name]
    units = [(row.get("output"), row.get("task_id"), row.get("sample_index")) for row in mine]
    expected = {(i, problem["task_id"], s) for i, out in enumerate(p.outputs) for problem in out.problems
                for s in range(n)}
    if len(units) != len(set(units)) or set(units) != expected:
        missing, extra = sorted(expected - set(units), key=str), sorted(set(units) - expected, key=str)
        raise DataError(f"{paths.eval_shards_dir(name)}/{part}: {shards} shards hold {len(units)} answers of pass "
                        f"{p.name} ({len(set(units))} distinct), not the {len(expected)} (output, problem, sample "
                        f"index) triples it decodes; missing e.g. {missing[:3]}, not of this run e.g. {extra[:3]}: "
                        f"rerun the evaluate-{part}@{name}-* stages")
    return by_output(p, mine)


def merged_validation(name: str, cfg, validation: list[dict]) -> list[list[dict]] | None:
    if not cfg.sweep:
        return None
    return merged_pass(name, "validation", validation_pass(name, cfg, validation),
                       shard_rows(name, "validation", cfg.shards), cfg.shards, cfg.n)


def evaluate_shard(model_dir: str, name: str, part: str, shard: int) -> None:
    """Shard `shard` of `part`: the batches b % evaluate.shards == shard of each of its passes,
    decoded and checked, into paths.eval_shard (each row with its pass's name)."""
    params = load_params()
    cfg = params.evaluate
    if not 0 <= shard < cfg.shards:
        raise ParamsError(f"--shard {shard}: evaluate.shards is {cfg.shards}, so shards are 0 .. {cfg.shards - 1}")
    validation = read_jsonl(paths.VALIDATION_PROBLEMS) if cfg.sweep else []
    if part == "validation":
        passes = [validation_pass(name, cfg, validation)] if cfg.sweep else []
    else:  # T_eval from every validation shard, as the whole stage chooses it
        chosen = chosen_temperature(name, cfg, validation, merged_validation(name, cfg, validation), {})
        passes = tested_passes(name, cfg, tested_sets(params), chosen)
    backend = stage_backend(params, model_dir) if passes else None
    runs = {p.name: paths.eval_pass(name, f"{p.name}.shard{shard}of{cfg.shards}") for p in passes}
    rows = []
    for p in passes:
        decoded = generate_rows(model_dir, pass_requests(p), p.decoding(cfg), paths.partial_of(runs[p.name]),
                                desc=f"{p.desc} shard {shard}/{cfg.shards}", backend=backend,
                                shard=(shard, cfg.shards))
        check_answers([(row, p.outputs[row["output"]].by_id[row["task_id"]]) for row in decoded], cfg.timeout_s,
                      params.sandbox)
        rows += [{"pass": p.name, **row} for row in decoded]
    write_jsonl(paths.eval_shard(name, part, shard), rows)
    for run in runs.values():
        discard_partials(run)
    print(f"evaluate[{name}] {part} shard {shard}/{cfg.shards}: {len(rows)} answers")


def evaluate_merge(model_dir: str, name: str) -> dict:
    """evaluate-merge@<name>: the shards' answers into the files and metrics evaluate@<name> writes."""
    params = load_params()
    cfg = params.evaluate
    validation = read_jsonl(paths.VALIDATION_PROBLEMS) if cfg.sweep else []
    metrics, answers = {}, merged_validation(name, cfg, validation)
    if answers is not None:
        for out, out_rows in zip(validation_pass(name, cfg, validation).outputs, answers):
            write_jsonl(out.path, out_rows)
    chosen = chosen_temperature(name, cfg, validation, answers, metrics)
    sets, rows, by_seed = tested_sets(params), shard_rows(name, "test", cfg.shards), {}
    for p in tested_passes(name, cfg, sets, chosen):
        by_seed[p.seed] = merged_pass(name, "test", p, rows, cfg.shards, cfg.n)
        for out, out_rows in zip(p.outputs, by_seed[p.seed]):
            write_jsonl(out.path, out_rows)
    return write_metrics(name, model_dir, cfg, sets, chosen, by_seed, metrics)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.evaluate")
    parser.add_argument("--model", required=True, help="HF model dir to evaluate")
    parser.add_argument("--name", required=True, help="its name in eval/ and the report: base, or the arm")
    parser.add_argument("--shard", type=int, metavar="I",
                        help="decode and check only shard I of evaluate.shards (the batches b %% shards == I of each "
                             "pass of --part) into eval/<name>/shards/<part>/I.jsonl")
    parser.add_argument("--part", choices=["validation", "test"], help="with --shard: the T_eval sweep, or the test sets "
                        "at the T_eval chosen from every validation shard")
    parser.add_argument("--merge", action="store_true", help="merge the evaluate.shards shards into the model's "
                        "samples and metrics")
    args = parser.parse_args(argv)
    if (args.shard is None) != (args.part is None) or (args.merge and args.shard is not None):
        parser.error("--shard and --part go together, and not with --merge")
    if args.shard is not None:
        evaluate_shard(args.model, args.name, args.part, args.shard)
        return 0
    if args.merge:
        evaluate_merge(args.model, args.name)
    else:
        evaluate(args.model, args.name)
    discard_partials(paths.eval_dir(args.name))
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
