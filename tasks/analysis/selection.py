"""Choosing each model's T_eval on the validation set, and nothing else.

The paper: tuning T_eval alone moves pass@1 by 1.5-3 points, so SSD must beat the base at the
base's own best T. Each model (the base included) decodes the validation set, disjoint from every
test problem (tasks/prepare.py), at each T of `evaluate.sweep`; it is tested at the T with the best
validation pass@1. Only validation answers are read here: a test result cannot move a choice.
"""
from __future__ import annotations

from tasks.core import paths
from tasks.core.files import read_jsonl
from tasks.core.metrics import mean_pass_at_k, per_problem_counts


def validation_pass_at_1(name: str, sweep: list[float]) -> dict[float, float]:
    """Each swept T's pass@1 on the validation set, from the answers `evaluate` wrote."""
    return {t: mean_pass_at_k(list(per_problem_counts(read_jsonl(paths.validation_samples(name, t))).values()), 1)
            for t in sweep}


def choose_temperature(validation_pass_at_1: dict[float, float], default: float) -> float:
    """The T_eval with the best validation pass@1; ties go to the T nearest `default`, then the
    lower T."""
    return min(validation_pass_at_1, key=lambda t: (-validation_pass_at_1[t], abs(t - default), t))
