"""Stage `diagnose`: lock/fork diagnostics of a model, teacher-forced on held-out references.

On the reference solutions of `diagnose.eval_set` (HumanEval's canonical solutions by default;
any eval set whose problems carry a `canonical_solution`), at the evaluation decoding settings:
kept mass, entropy after truncation, tokens surviving truncation over a T sweep, cumulative mass
by rank, overall and for lock-like and fork-like positions (tasks/analysis/diagnostics.py).
Positions are classed by the base model, so `diagnose@<arm>` reads `diagnose-base`'s classes and
measures the same positions.

Outputs diagnose/<name>/metrics.json (and, for the base, diagnose/base/classes.json).
"""
from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from tasks.analysis.diagnostics import diagnose, reference_answer
from tasks.core import paths
from tasks.core.config import load_params, run_stage
from tasks.core.files import DataError, read_json, read_jsonl, write_json
from tasks.core.modeling import device, load_pretrained, use_all_cores
from tasks.core.problems import seeded_subset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.diagnose")
    parser.add_argument("--model", required=True, help="HF model dir")
    parser.add_argument("--name", required=True, help="base, or the arm")
    args = parser.parse_args(argv)
    params = load_params()
    cfg = params.diagnose
    source = paths.eval_problems(cfg.eval_set)
    problems = [p for p in read_jsonl(source) if reference_answer(p) is not None]
    if not problems:
        raise DataError(f"{source}: no problem with a canonical_solution to diagnose on (diagnose.eval_set)")
    problems = seeded_subset(problems, cfg.max_problems, params.data.split_seed)
    if args.name == "base":
        base_classes = None
    else:
        classed = read_json(paths.diagnose_classes())
        base_classes = dict(zip(classed["task_ids"], classed["classes"]))
    use_all_cores()
    model, tokenizer = load_pretrained(args.model)
    model.to(device()).eval()
    with tqdm(total=len(problems), desc=f"diagnose[{args.name}]", unit="problem") as bar:
        summary, classes = diagnose(model, tokenizer, problems, params.evaluate, cfg.temperatures, base_classes,
                                    cfg.lock_threshold, cfg.fork_threshold, progress=bar.update)
    ev = params.evaluate
    write_json(paths.diagnose_metrics(args.name), {
        "model": args.model, "eval_set": cfg.eval_set, "problems": len(problems),
        "decoding": {"temperature": ev.temperature, "top_k": ev.top_k, "top_p": ev.top_p},
        "classes_by": "base", "lock_threshold": cfg.lock_threshold, "fork_threshold": cfg.fork_threshold,
        **summary})
    if args.name == "base":
        write_json(paths.diagnose_classes(), {"task_ids": [p["task_id"] for p in problems], "classes": classes})
    counts = {name: s["positions"] for name, s in summary.items()}
    print(f"diagnose[{args.name}]: {counts}; kept mass {summary['all']['kept_mass']:.3f}, "
          f"entropy {summary['all']['entropy']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
