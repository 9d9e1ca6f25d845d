"""Stage `report`: base vs every arm on each eval set, with paired bootstrap confidence intervals.

Outputs report/headline.json, the pipeline's only DVC metrics (`dvc metrics show`, `dvc exp
show`): flat keys, pass@1 per eval set and model, each model's chosen T_eval, each arm's final
training loss and the lock/fork diagnostics at a glance; report/summary.json, every number below;
report/t_eval/<model>.json, validation pass@1 per T_eval (a `dvc plots` source); and
report/summary.md: per eval set, pass@k of every model with its difference from the base and
the CI, and pass@1 per difficulty band where the set has difficulties (the paper finds the
gains on the hard problems); the lock/fork diagnostics; and report/figures/*.png, linked from it.
"""
from __future__ import annotations

import sys
from pathlib import Path

from tasks.analysis import plots
from tasks.analysis.selection import choose_temperature, validation_answers
from tasks.core import paths
from tasks.core.config import load_params, run_stage
from tasks.core.files import DataError, atomic_path, read_json, read_jsonl, write_json, write_text
from tasks.core.metrics import (bootstrap_mean, minimum_detectable_effect, paired_bootstrap, paired_pooled_bootstrap,
                                pass_at_k, per_problem_counts)
from tasks.core.problems import difficulty_band


MIN_BAND_PROBLEMS = 5  # a difficulty band with fewer problems is marked: a handful of coin flips
POWER = 0.8  # for the smallest difference each comparison could have detected
# The smallest gain the paper reports (pass@1 points, Qwen3-4B-Thinking 54.5 -> 57.8): a null
# result is informative about effects of the paper's size only if the run could detect this.
PAPER_SMALLEST_GAIN = 0.033


def pooled_counts(name: str, eval_set: str, ev) -> dict[str, tuple[int, int]]:
    """Per problem (samples, passed) over every decoding of the test set: the first and, with
    evaluate.repeats > 1, each repeat's, pooled (n x repeats samples per problem)."""
    rows = read_jsonl(paths.eval_samples(name, eval_set))
    for seed in range(ev.seed + 1, ev.seed + ev.repeats):
        rows += read_jsonl(paths.repeat_samples(name, eval_set, seed))
    return per_problem_counts(rows)


def per_problem_pass(counts: dict[str, tuple[int, int]], k: int) -> dict[str, float]:
    return {task: pass_at_k(n, c, k) for task, (n, c) in counts.items()}


def bands_with_cis(pass_1: dict[str, float], band_of: dict[str, str], rep) -> dict[str, list[float]]:
    """pass@1 per difficulty band with its bootstrap CI over the band's problems."""
    members: dict[str, dict[str, float]] = {}
    for task, value in pass_1.items():
        if band_of.get(task) is not None:
            members.setdefault(band_of[task], {})[task] = value
    return {band: list(bootstrap_mean(values, rep.bootstrap, rep.seed, rep.confidence))
            for band, values in sorted(members.items())}


def t_eval_choices(params, metrics: dict) -> dict:
    """Each model's T_eval, chosen again here from its validation answers alone (and checked
    against the one `evaluate` tested at), with the validation sweep behind it."""
    ev = params.evaluate
    choices = {}
    for name, m in metrics.items():
        if not ev.sweep:
            choices[name] = {"chosen": ev.temperature}
            continue
        choice = choose_temperature(validation_answers(name, ev.sweep), ev.temperature, ev.sweep_confidence, ev.seed)
        chosen, by_t = choice["chosen"], choice["pass@1"]
        tested = {s["temperature"] for s in m["sets"].values()}
        if tested != {chosen}:
            raise DataError(f"{paths.eval_metrics(name)}: tested at T={sorted(tested)}, but its validation answers "
                            f"choose T={chosen:g}: rerun evaluate for {name}")
        choices[name] = {"chosen": chosen, "validation_pass@1": {f"{t:g}": v for t, v in by_t.items()},
                         "vs_tie_breaker": {f"{t:g}": v for t, v in choice["vs_tie_breaker"].items()}}
    return choices


def build_report(params) -> dict:
    ks = sorted(set(params.evaluate.k) | {1})
    arms = list(params.arms)
    metrics = {name: read_json(paths.eval_metrics(name)) for name in ["base", *arms]}
    kept = {arm: read_json(paths.filter_stats(arm)) for arm in arms}
    trained = {arm: read_json(paths.train_stats(arm)) for arm in arms}
    configs = params.sample.configs
    summary = {"samples": {name: {**configs[name].model_dump(), **read_json(paths.sample_stats(name))}
                           for name in configs},
               "arms": {arm: {"sample": spec.sample, "filter": spec.filter, "kept": kept[arm]["kept"],
                              "kept_fraction": kept[arm]["kept_fraction"], "truncated": kept[arm]["truncated"],
                              "trained": trained[arm]["trained"], "train_dropped": trained[arm]["dropped"],
                              "final_loss": trained[arm]["final_loss"]}
                        for arm, spec in params.arms.items()},
               "isolation": metrics["base"]["isolation"], "t_eval": t_eval_choices(params, metrics), "sets": {}}
    ev, rep = params.evaluate, params.report
    for eval_set in params.data.eval:
        name = eval_set.name
        base = metrics["base"]["sets"][name]
        # pass@k over every decoding of the test set (evaluate.repeats pooled), per problem.
        passes = {model: {k: per_problem_pass(pooled_counts(model, name, ev), k) for k in ks} for model in ["base", *arms]}
        band_of = {p["task_id"]: difficulty_band(p.get("difficulty")) for p in read_jsonl(paths.eval_problems(name))}
        models = {"base": {"t_eval": base["temperature"],
                           **{f"pass@{k}": sum(passes["base"][k].values()) / len(passes["base"][k]) for k in ks}}}
        if "pass@1_by_seed" in base:
            models["base"]["pass@1_by_seed"] = list(base["pass@1_by_seed"].values())
        if "by_difficulty" in base:
            models["base"]["by_difficulty"] = bands_with_cis(passes["base"][1], band_of, rep)
        base_pass = passes["base"]
        for arm in arms:
            arm_metrics = metrics[arm]["sets"][name]
            entry = {"t_eval": arm_metrics["temperature"], "kept": kept[arm]["kept"],
                     "kept_fraction": kept[arm]["kept_fraction"]}
            for k in ks:
                entry[f"pass@{k}"] = sum(passes[arm][k].values()) / len(passes[arm][k])
                diff, lo, hi = paired_bootstrap(passes[arm][k], base_pass[k], rep.bootstrap, rep.seed, rep.confidence)
                entry[f"delta_pass@{k}"] = diff
                entry[f"delta_pass@{k}_ci"] = [lo, hi]
            entry["mde_pass@1"] = minimum_detectable_effect(passes[arm][1], base_pass[1], rep.confidence, POWER)
            if "pass@1_by_seed" in arm_metrics and "pass@1_by_seed" in base:
                # Each seed's arm-minus-base difference: how far a rerun alone moves the headline.
                entry["delta_pass@1_by_seed"] = [arm_metrics["pass@1_by_seed"][s] - base["pass@1_by_seed"][s]
                                                 for s in base["pass@1_by_seed"]]
            if "by_difficulty" in arm_metrics:
                entry["by_difficulty"] = bands_with_cis(passes[arm][1], band_of, rep)
            if "pass@1_by_seed" in arm_metrics:
                entry["pass@1_by_seed"] = list(arm_metrics["pass@1_by_seed"].values())
            models[arm] = entry
        summary["sets"][name] = {"source": eval_set.source, "problems": base["problems"], "models": models,
                                 "decodings": ev.repeats, "samples_per_problem": ev.n * ev.repeats}
        if "by_difficulty" in base:
            summary["sets"][name]["difficulty_problems"] = {b: m["problems"] for b, m in base["by_difficulty"].items()}
    summary["diagnostics"] = {name: read_json(paths.diagnose_metrics(name)) for name in ["base", *arms]}
    summary["mechanism"] = mechanism(summary["diagnostics"], params, rep)
    data_source = read_json(paths.DATA_SOURCE) if Path(paths.DATA_SOURCE).exists() else {}
    summary["train_prompts"] = {key: data_source[key] for key in ("decontamination", "near_duplicates")
                                if key in data_source}
    return summary


MECHANISM = (("lock", "kept_mass"), ("fork", "entropy"))  # SSD's account: tails at locks shrink, forks keep their spread


def is_null_control(config) -> bool:
    """T=1 without truncation: plain self-training, which in expectation should change nothing."""
    return config.temperature == 1 and config.top_k == 0 and config.top_p == 1 and config.min_p == 0


def mechanism(diagnostics: dict, params, rep) -> dict:
    """Each arm's change in kept mass at locks and entropy at forks, against the base and against
    every null-control arm: {arm: {other: {"lock.kept_mass": [delta, low, high], ...}}}, paired
    bootstrap CIs over the reference problems (the same positions, classed by the base)."""
    controls = [arm for arm, spec in params.arms.items() if is_null_control(params.sample.configs[spec.sample])]
    out = {}
    for arm in params.arms:
        out[arm] = {}
        for other in ["base", *(c for c in controls if c != arm)]:
            compared = {}
            for cls, stat in MECHANISM:
                ours, theirs = diagnostics[arm].get(cls), diagnostics[other].get(cls)
                if not ours or not theirs or "per_problem" not in ours or "per_problem" not in theirs:
                    continue
                if ours["per_problem"]["positions"] != theirs["per_problem"]["positions"]:
                    raise DataError(f"{paths.diagnose_metrics(arm)} and {paths.diagnose_metrics(other)}: "
                                    f"{cls} positions differ per problem: rerun diagnose")
                result = paired_pooled_bootstrap(ours["per_problem"][stat], theirs["per_problem"][stat],
                                                 theirs["per_problem"]["positions"], rep.bootstrap, rep.seed,
                                                 rep.confidence)
                if result is not None:
                    compared[f"{cls}.{stat}"] = list(result)
            out[arm][other] = compared
    return out


def mechanism_markdown(summary: dict, conf: int) -> list[str]:
    problems = summary["diagnostics"]["base"]["problems"]
    lines = ["", f"Mechanism, each arm against the base and the null control (paired over the {problems} "
                 f"reference problems, {conf}% CI): SSD predicts kept mass at locks up, entropy at forks down.", ""]
    for arm, versus in summary["mechanism"].items():
        parts = []
        for other, compared in versus.items():
            shown = ", ".join(f"{key.replace('.', ' ').replace('_', ' ')} {d:+.3f} [{lo:+.3f}, {hi:+.3f}]"
                              for key, (d, lo, hi) in compared.items())
            parts.append(f"vs {other}: {shown or 'no positions of these classes'}")
        lines.append(f"- {arm}: " + "; ".join(parts))
    return lines


def train_prompts_markdown(record: dict) -> list[str]:
    """One line: how many candidate train prompts overlapped a validation or eval problem (and
    were dropped), per set, and the near-duplicates dropped before the split."""
    if "decontamination" not in record:
        return []
    d = record["decontamination"]
    per_set = ", ".join([f"validation {d['dropped_validation']}", *(f"{k} {v}" for k, v in d["dropped_eval"].items())])
    line = (f"Train prompts: of {d['checked']} candidates, {d['dropped_total']} shared {d['ngram']}-grams "
            f"covering {d['min_tokens']}+ tokens with a held-out problem and were dropped ({per_set})")
    if "near_duplicates" in record:
        dups = record["near_duplicates"]
        line += f"; {dups['dropped']} near-duplicates dropped from {dups['source']} before the split"
    return ["", line + "."]


def headline(summary: dict) -> dict[str, float]:
    """One flat key per number: `<set>.<model>.pass@1`, `t_eval.<model>`, `train.<arm>.loss` (the
    last step's), `lock.<model>.kept_mass` and `fork.<model>.entropy` (SSD's account: tails at
    locks shrink, forks keep their spread). Few, short keys: `dvc exp show` fits a terminal."""
    flat = {}
    for name, result in summary["sets"].items():
        for model, m in result["models"].items():
            flat[f"{name}.{model}.pass@1"] = m["pass@1"]
    for model, choice in summary["t_eval"].items():
        flat[f"t_eval.{model}"] = choice["chosen"]
    for arm, spec in summary["arms"].items():
        flat[f"train.{arm}.loss"] = spec["final_loss"]
    for model, m in summary["diagnostics"].items():
        for cls, value in (("lock", "kept_mass"), ("fork", "entropy")):
            if cls in m:
                flat[f"{cls}.{model}.{value}"] = m[cls][value]
    return flat


def t_eval_curves(summary: dict) -> None:
    """report/t_eval/<model>.json: [{T_eval, pass@1}] of the validation sweep ([] without one),
    one file per model of this report (the folder is replaced whole)."""
    with atomic_path(paths.REPORT_T_EVAL, is_dir=True) as tmp:
        for model, choice in summary["t_eval"].items():
            write_json(tmp / Path(paths.t_eval_curve(model)).name,
                       [{"T_eval": float(t), "pass@1": v} for t, v in choice.get("validation_pass@1", {}).items()])


def figures(summary: dict, params) -> dict[str, str]:
    """Writes the report's PNGs; returns caption -> path relative to report/summary.md."""
    out = Path(paths.REPORT_FIGURES)
    made = {}
    plots.training_loss({arm: paths.train_curve(arm) for arm in params.arms}, out / "train_loss.png")
    made["training loss"] = "figures/train_loss.png"
    if any("difficulty_problems" in s for s in summary["sets"].values()):
        plots.difficulty_bands(summary["sets"], out / "difficulty.png")
        made["pass@1 by difficulty band"] = "figures/difficulty.png"
    plots.diagnostics(summary["diagnostics"], out / "diagnostics.png", summary["mechanism"])
    made["lock/fork diagnostics"] = "figures/diagnostics.png"
    if params.evaluate.sweep:
        plots.temperature_sweep(summary["t_eval"], out / "t_eval_sweep.png")
        made["validation pass@1 vs T_eval"] = "figures/t_eval_sweep.png"
    return made


def markdown(summary: dict, params) -> str:
    ks = sorted(set(params.evaluate.k) | {1})
    conf = int(params.report.confidence * 100)
    ev = params.evaluate
    lines = [
        "# selfdistill report",
        "",
        "Arms: each trains the base on its own samples, drawn at one sampling config and kept by one filter "
        "(`null`: T=1 without truncation, plain self-training, the control; `gibberish`: T=2 without truncation).",
        "",
        "| arm | sampling config | T_train | top-k | top-p | samples | with a code block | filter | kept | "
        "cut off at max_new_tokens: kept (no end-of-turn label) / dropped | trained (dropped: why) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, spec in summary["arms"].items():
        s, cut = summary["samples"][spec["sample"]], spec["truncated"]
        dropped = "; ".join(f"{n} {why}" for why, n in spec["train_dropped"].items())
        lines.append(f"| {arm} | {spec['sample']} | {s['temperature']:g} | {s['top_k'] or 'off'} | {s['top_p']:g} | "
                     f"{s['samples']} | {s['extractable_fraction']:.0%} | {spec['filter']} | "
                     f"{spec['kept']} ({spec['kept_fraction']:.0%}) | {cut['samples']}: {cut['kept']} / "
                     f"{cut['dropped']} | {spec['trained']}{f' (dropped: {dropped})' if dropped else ''} |")
    lines += ["", f"Evaluation: {ev.n} samples per problem, top-k={ev.top_k}, top-p={ev.top_p}; sandbox isolation: "
                  f"{summary['isolation']}."]
    lines += train_prompts_markdown(summary.get("train_prompts", {}))
    if ev.sweep:
        lines += [
            "",
            "## T_eval, chosen per model on the validation set (disjoint from every test problem)",
            "",
            "| model | " + " | ".join(f"T={t:g}" for t in ev.sweep) + " | chosen T_eval |",
            "|---|" + "---|" * len(ev.sweep) + "---|",
        ]
        for model, choice in summary["t_eval"].items():
            cells = [f"{choice['validation_pass@1'][f'{t:g}']:.3f}" for t in ev.sweep]
            lines.append(f"| {model} | " + " | ".join(cells) + f" | **{choice['chosen']:g}** |")
        lines += ["", f"Validation pass@1 minus the tie-breaker's (evaluate.temperature={ev.temperature:g}), paired "
                      f"over validation problems, {ev.sweep_confidence:.0%} bootstrap CI: a T replaces the tie-breaker "
                      "only where the whole CI is above 0.", ""]
        for model, choice in summary["t_eval"].items():
            lines.append(f"- {model}: " + ", ".join(f"T={t}: {d:+.3f} [{lo:+.3f}, {hi:+.3f}]"
                                                    for t, (d, lo, hi) in choice["vs_tie_breaker"].items()))
        tied = [model for model, choice in summary["t_eval"].items()
                if len(set(choice["validation_pass@1"].values())) == 1]
        if tied:
            lines += ["", f"Validation could not tell the T_eval apart for {', '.join(tied)} (equal pass@1 at every "
                          f"T): the tie-breaker, evaluate.temperature={ev.temperature:g}, chose. A larger or easier "
                          "validation set (data.validation) gives the choice something to go on."]
        lines += ["", "Every model below is tested at its own chosen T_eval; each Δ compares an arm at its T "
                      "with the base at the base's."]
    else:
        lines.append(f"All models tested at T_eval={ev.temperature}.")
    for name, result in summary["sets"].items():
        lines += [
            "",
            f"## {name} ({result['problems']} problems, source {result['source']})",
            "",
            "| model | T_eval | " + " | ".join(f"pass@{k} | Δ vs base ({conf}% CI)" for k in ks) + " |",
            "|---|---|" + "---|---|" * len(ks),
        ]
        for model, m in result["models"].items():
            cells = []
            for k in ks:
                cells.append(f"{m[f'pass@{k}']:.3f}")
                if model == "base":
                    cells.append("-")
                else:
                    lo, hi = m[f"delta_pass@{k}_ci"]
                    cells.append(f"{m[f'delta_pass@{k}']:+.3f} [{lo:+.3f}, {hi:+.3f}]")
            lines.append(f"| {model} | {m['t_eval']:g} | " + " | ".join(cells) + " |")
        if result["decodings"] > 1:
            lines += ["", f"pass@k pools the {result['decodings']} decodings of the test set (evaluate.repeats): "
                          f"{result['samples_per_problem']} samples per problem."]
        lines += power_markdown(result["models"], conf)
        lines += seeds_markdown(result["models"])
        if "difficulty_problems" in result:
            bands = list(result["difficulty_problems"])
            counted = {b: result["difficulty_problems"][b] for b in bands}
            lines += ["", f"pass@1 by difficulty band ({conf}% CI over the band's problems; problems, and *few* "
                          f"where fewer than {MIN_BAND_PROBLEMS}):", "",
                      "| model | " + " | ".join(f"{b} ({n}{', few' if n < MIN_BAND_PROBLEMS else ''})"
                                                for b, n in counted.items()) + " |",
                      "|---|" + "---|" * len(bands)]
            for model, m in result["models"].items():
                cells = ["{:.3f} [{:.3f}, {:.3f}]".format(*m["by_difficulty"][b]) if b in m["by_difficulty"] else "-"
                         for b in bands]
                lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines += diagnostics_markdown(summary["diagnostics"])
    lines += mechanism_markdown(summary, conf)
    return "\n".join(lines) + "\n"


def power_markdown(models: dict, conf: int) -> list[str]:
    """For each arm: the smallest Δ pass@1 this set could have detected, and what a null means."""
    lines = ["", f"Smallest Δ pass@1 each comparison could have detected ({POWER:.0%} power, {conf}% two-sided, "
                 "from the spread of the per-problem differences):", ""]
    for arm, m in models.items():
        if arm == "base":
            continue
        mde, (lo, hi) = m["mde_pass@1"], m["delta_pass@1_ci"]
        if mde is None:
            lines.append(f"- {arm}: not estimable: no problem's pass rate differs from the base's, so this set "
                         "says nothing about a difference either way")
            continue
        verdict = ("the CI excludes 0" if lo > 0 or hi < 0 else
                   "the CI includes 0, and the paper's smallest gain (+0.033) is " +
                   ("above" if mde <= PAPER_SMALLEST_GAIN else "below") + " what it could detect: this null is " +
                   ("informative" if mde <= PAPER_SMALLEST_GAIN else "not informative about an effect of that size"))
        lines.append(f"- {arm}: ±{mde:.3f}; {verdict}")
    return lines


def seeds_markdown(models: dict) -> list[str]:
    """The seed-to-seed spread (evaluate.repeats > 1): an effect smaller than it is noise."""
    if not all("pass@1_by_seed" in m for m in models.values()):
        return []
    seeds = len(models["base"]["pass@1_by_seed"])
    lines = ["", f"Seed-to-seed spread ({seeds} decodings of the test set per model, evaluate.repeats):", "",
             "| model | pass@1 per seed | sd | Δ pass@1 vs base per seed |", "|---|---|---|---|"]
    for model, m in models.items():
        values = m["pass@1_by_seed"]
        mean = sum(values) / len(values)
        sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
        deltas = "-" if model == "base" else ", ".join(f"{d:+.3f}" for d in m["delta_pass@1_by_seed"])
        lines.append(f"| {model} | {', '.join(f'{v:.3f}' for v in values)} | {sd:.3f} | {deltas} |")
    return lines


def diagnostics_markdown(diagnostics: dict) -> list[str]:
    base = diagnostics["base"]
    lines = ["", f"## Lock/fork diagnostics ({base['eval_set']}, {base['problems']} reference solutions, "
                 f"teacher-forced at T_eval={base['decoding']['temperature']}, top-k={base['decoding']['top_k']}, "
                 f"top-p={base['decoding']['top_p']})", "",
             f"Positions classed by the base model at T=1: lock = top token >= {base['lock_threshold']}, "
             f"fork = top token < {base['fork_threshold']} with a second >= 0.1. SSD's account: tails at locks "
             "shrink (kept mass up, entropy down) while forks keep their spread.", "",
             "| model | positions | lock: kept mass | lock: entropy | fork: kept mass | fork: entropy | all: top-1 mass |",
             "|---|---|---|---|---|---|---|"]
    for model, m in diagnostics.items():
        cells = [str(m["all"]["positions"])]
        for cls in ("lock", "fork"):
            cells += ([f"{m[cls]['kept_mass']:.3f} ({m[cls]['positions']})", f"{m[cls]['entropy']:.3f}"]
                      if cls in m else ["-", "-"])
        cells.append(f"{m['all']['top1_mass']:.3f}")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return lines


def main() -> int:
    params = load_params()
    summary = build_report(params)
    write_json(paths.REPORT_JSON, summary)
    write_json(paths.REPORT_HEADLINE, headline(summary))
    t_eval_curves(summary)
    made = figures(summary, params)
    text = markdown(summary, params) + "\nFigures: " + ", ".join(f"[{c}]({p})" for c, p in made.items()) + "\n"
    write_text(paths.REPORT_MD, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
