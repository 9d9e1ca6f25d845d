"""Stage `report`: base vs every arm, with paired bootstrap confidence intervals.

Outputs report/summary.json (DVC metrics: `dvc metrics show` / `dvc metrics diff`) and
report/summary.md.
"""
from __future__ import annotations

import sys

from tasks.core import paths
from tasks.core.config import load_params, run_stage
from tasks.core.files import read_json, read_jsonl, write_json, write_text
from tasks.core.metrics import paired_bootstrap, pass_at_k, per_problem_counts


def per_problem_pass(name: str, k: int) -> dict[str, float]:
    counts = per_problem_counts(read_jsonl(paths.eval_samples(name)))
    return {task: pass_at_k(n, c, k) for task, (n, c) in counts.items()}


def build_report(params) -> dict:
    ks = sorted(set(params.evaluate.k) | {1})
    base_metrics = read_json(paths.eval_metrics("base"))
    summary = {
        "sample": read_json(paths.SAMPLE_STATS),
        "isolation": base_metrics["isolation"],
        "problems": base_metrics["problems"],
        "models": {"base": {f"pass@{k}": base_metrics[f"pass@{k}"] for k in ks}},
    }
    base_pass = {k: per_problem_pass("base", k) for k in ks}
    for arm in params.filter.arms:
        metrics = read_json(paths.eval_metrics(arm))
        stats = read_json(paths.filter_stats(arm))
        entry = {"kept": stats["kept"], "kept_fraction": stats["kept_fraction"]}
        for k in ks:
            entry[f"pass@{k}"] = metrics[f"pass@{k}"]
            diff, lo, hi = paired_bootstrap(per_problem_pass(arm, k), base_pass[k], params.report.bootstrap,
                                            params.report.seed, params.report.confidence)
            entry[f"delta_pass@{k}"] = diff
            entry[f"delta_pass@{k}_ci"] = [lo, hi]
        summary["models"][arm] = entry
    return summary


def markdown(summary: dict, params) -> str:
    ks = sorted(set(params.evaluate.k) | {1})
    conf = int(params.report.confidence * 100)
    s = summary["sample"]
    ev = params.evaluate
    lines = [
        "# selfdistill report",
        "",
        f"{summary['problems']} held-out problems, {ev.n} samples each at T_eval={ev.temperature}, top-k={ev.top_k}, "
        f"top-p={ev.top_p}; sandbox isolation: {summary['isolation']}.",
        f"Training samples: {s['samples']} at T_train={params.sample.temperature}, top-k={params.sample.top_k}, "
        f"top-p={params.sample.top_p}; {s['extractable_fraction']:.1%} have an extractable code block.",
        "",
        "| model | kept | " + " | ".join(f"pass@{k} | Δ vs base ({conf}% CI)" for k in ks) + " |",
        "|---|---|" + "---|---|" * len(ks),
    ]
    for name, m in summary["models"].items():
        kept = "-" if name == "base" else f"{m['kept']} ({m['kept_fraction']:.0%})"
        cells = []
        for k in ks:
            cells.append(f"{m[f'pass@{k}']:.3f}")
            if name == "base":
                cells.append("-")
            else:
                lo, hi = m[f"delta_pass@{k}_ci"]
                cells.append(f"{m[f'delta_pass@{k}']:+.3f} [{lo:+.3f}, {hi:+.3f}]")
        lines.append(f"| {name} | {kept} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    params = load_params()
    summary = build_report(params)
    write_json(paths.REPORT_JSON, summary)
    text = markdown(summary, params)
    write_text(paths.REPORT_MD, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
