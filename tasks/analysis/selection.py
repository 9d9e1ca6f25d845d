"""Choosing each model's T_eval on the validation set, and nothing else.

The paper: tuning T_eval alone moves pass@1 by 1.5-3 points, so SSD must beat the base at the
base's own best T. Each model (the base included) decodes the validation set, disjoint from every
test problem (tasks/prepare.py), at each T of `evaluate.sweep`; it is tested at the T with the best
validation pass@1, unless that T's edge over the tie-breaker is within validation noise (see
choose_temperature). Only validation answers are read here: a test result cannot move a choice.
"""
from __future__ import annotations

from tasks.core import paths
from tasks.core.files import read_jsonl
from tasks.core.metrics import mean_pass_at_k, paired_bootstrap, per_problem_counts


def validation_answers(name: str, sweep: list[float]) -> dict[float, list[dict]]:
    """The answers `evaluate` wrote for a model at each swept T, with their verdicts."""
    return {t: read_jsonl(paths.validation_samples(name, t)) for t in sweep}


BOOTSTRAP_ROUNDS = 2000  # resamples of the validation problems behind each comparison


def choose_temperature(answers: dict[float, list[dict]], tie_breaker: float, confidence: float, seed: int) -> dict:
    """The T_eval a model is tested at, from its validation answers at each swept T (rows with
    task_id and passed), with what the choice rests on.

    Validation noise is as large as the effect of tuning T_eval (the paper: 1.5-3 points), so the
    choice leaves the tie-breaker (evaluate.temperature, in the sweep) only for a T whose paired
    bootstrap CI over validation problems of (its pass@1 - the tie-breaker's) lies above 0 at
    `confidence`; among several such, the best pass@1 (then the T nearest the tie-breaker, then the
    lower). Returns {"chosen", "pass@1": {T: pass@1}, "vs_tie_breaker": {T: [delta, lo, hi]}}."""
    counts = {t: per_problem_counts(rows) for t, rows in answers.items()}
    rates = {t: {task: c / n for task, (n, c) in by_task.items()} for t, by_task in counts.items()}
    pass_at_1 = {t: mean_pass_at_k(list(by_task.values()), 1) for t, by_task in counts.items()}
    versus = {t: list(paired_bootstrap(rates[t], rates[tie_breaker], BOOTSTRAP_ROUNDS, seed, confidence))
              for t in answers if t != tie_breaker}
    clear = [t for t, (_, low, _) in versus.items() if low > 0]
    chosen = min(clear, key=lambda t: (-pass_at_1[t], abs(t - tie_breaker), t)) if clear else tie_breaker
    return {"chosen": chosen, "pass@1": pass_at_1, "vs_tie_breaker": versus}
