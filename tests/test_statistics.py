"""The report's statistics against what they claim: the paired bootstrap detects a planted effect
at the rate a test of its size should and a planted zero at about its error rate; the minimum
detectable effect is the normal approximation's, and an effect of that size is detected with the
stated power; repeats are pooled; difficulty bands carry CIs."""
from __future__ import annotations

import json
from statistics import NormalDist
from types import SimpleNamespace

import numpy as np
import pytest

from tasks.core import paths
from tasks.core.metrics import bootstrap_mean, minimum_detectable_effect, paired_bootstrap

PROBLEMS = 400
DRAWS = 200


def draw(rng, p_base: float, p_arm: float) -> tuple[dict, dict]:
    """One run: each problem solved (1) or not (0) by the base and by the arm, independently."""
    base = {f"p{i}": float(v) for i, v in enumerate(rng.random(PROBLEMS) < p_base)}
    arm = {f"p{i}": float(v) for i, v in enumerate(rng.random(PROBLEMS) < p_arm)}
    return arm, base


def detection_rate(p_base: float, p_arm: float, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    detected = 0
    for i in range(DRAWS):
        arm, base = draw(rng, p_base, p_arm)
        _, lo, hi = paired_bootstrap(arm, base, rounds=1000, seed=i, confidence=0.95)
        detected += lo > 0 or hi < 0
    return detected / DRAWS


def test_a_planted_ten_point_effect_is_detected_and_a_planted_zero_is_not():
    # +10 points on 400 problems (0.3 -> 0.4): a two-sided test at 95% has ~85% power here.
    assert detection_rate(0.3, 0.4) >= 0.75
    # No effect: detected at about the test's error rate (5%), over 200 draws.
    assert detection_rate(0.3, 0.3, seed=1) <= 0.10


def test_the_minimum_detectable_effect_is_the_normal_approximation_and_has_its_power():
    rng = np.random.default_rng(2)
    arm, base = draw(rng, 0.3, 0.3)
    diffs = np.array([arm[t] - base[t] for t in sorted(base)])
    z = NormalDist().inv_cdf
    expected = (z(0.975) + z(0.8)) * diffs.std(ddof=1) / np.sqrt(PROBLEMS)
    mde = minimum_detectable_effect(arm, base, confidence=0.95, power=0.8)
    assert mde == pytest.approx(expected)
    # A true effect of that size is detected about 80% of the time (within simulation error).
    assert 0.68 <= detection_rate(0.3, 0.3 + mde, seed=3) <= 0.92
    # Nothing differs: no spread to estimate from.
    assert minimum_detectable_effect(base, base, 0.95) is None


def test_bootstrap_mean_is_the_mean_with_a_ci_around_it():
    values = {f"p{i}": float(i % 4 == 0) for i in range(100)}
    mean, lo, hi = bootstrap_mean(values, rounds=2000, seed=0, confidence=0.95)
    assert mean == 0.25 and lo < 0.25 < hi and hi - lo == pytest.approx(2 * 1.96 * (0.25 * 0.75 / 100) ** 0.5, rel=0.25)


def test_repeats_are_pooled_per_problem(tmp_path, monkeypatch):
    from tasks.report import pooled_counts

    monkeypatch.chdir(tmp_path)

    def write(path, passed):
        path = tmp_path / path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"task_id": t, "passed": v}) + "\n" for t, v in passed))

    write(paths.eval_samples("base", "humaneval"), [("a", True), ("a", False), ("b", False), ("b", False)])
    write(paths.repeat_samples("base", "humaneval", 8), [("a", True), ("a", True), ("b", True), ("b", False)])
    write(paths.repeat_samples("base", "humaneval", 9), [("a", False), ("a", False), ("b", False), ("b", False)])
    assert pooled_counts("base", "humaneval", SimpleNamespace(seed=7, repeats=3)) == {"a": (6, 3), "b": (6, 1)}
    assert pooled_counts("base", "humaneval", SimpleNamespace(seed=7, repeats=1)) == {"a": (2, 1), "b": (2, 0)}


def test_each_difficulty_band_has_its_own_ci():
    from tasks.report import bands_with_cis

    pass_1 = {"e1": 1.0, "e2": 0.0, "e3": 1.0, "h1": 0.0}
    bands = bands_with_cis(pass_1, {"e1": "easy", "e2": "easy", "e3": "easy", "h1": "hard"},
                           SimpleNamespace(bootstrap=500, seed=0, confidence=0.95))
    assert list(bands) == ["easy", "hard"]
    assert bands["easy"][0] == pytest.approx(2 / 3) and bands["easy"][1] < bands["easy"][0] < bands["easy"][2]
    assert bands["hard"] == [0.0, 0.0, 0.0]  # one problem: no spread (the report marks it "few")


def test_a_pooled_difference_over_positions_resamples_problems():
    from tasks.core.metrics import paired_pooled_bootstrap

    rng = np.random.default_rng(4)
    counts = rng.integers(5, 50, size=60)
    base = counts * rng.uniform(0.8, 1.0, size=60)
    shift = 0.02 + rng.normal(0, 0.01, size=60)  # each problem's positions move together
    arm = base + counts * shift
    delta, lo, hi = paired_pooled_bootstrap(list(arm), list(base), list(counts), 2000, 0, 0.95)
    assert delta == pytest.approx((arm.sum() - base.sum()) / counts.sum())
    assert 0 < lo < delta < hi and lo < 0.02 < hi
    noise = base + counts * rng.normal(0, 0.01, size=60)
    _, lo, hi = paired_pooled_bootstrap(list(noise), list(base), list(counts), 2000, 0, 0.95)
    assert lo < 0 < hi
    assert paired_pooled_bootstrap([0.0], [0.0], [0], 100, 0, 0.95) is None


def test_the_mechanism_compares_each_arm_with_the_base_and_the_null_control():
    from tasks.core.files import DataError
    from tasks.report import mechanism

    def diagnostics(kept: list[float]):
        return {"lock": {"per_problem": {"positions": [2, 3], "kept_mass": kept, "entropy": [0.0, 0.0]}}}

    config = lambda t, k, p: SimpleNamespace(temperature=t, top_k=k, top_p=p, min_p=0.0)  # noqa: E731
    params = SimpleNamespace(arms={"ssd-none": SimpleNamespace(sample="ssd"), "null-none": SimpleNamespace(sample="null")},
                             sample=SimpleNamespace(configs={"ssd": config(0.8, 20, 0.8), "null": config(1.0, 0, 1.0)}))
    rep = SimpleNamespace(bootstrap=200, seed=0, confidence=0.95)
    found = mechanism({"base": diagnostics([1.8, 2.7]), "ssd-none": diagnostics([1.9, 2.9]),
                       "null-none": diagnostics([1.7, 2.6])}, params, rep)
    assert set(found["ssd-none"]) == {"base", "null-none"} and set(found["null-none"]) == {"base"}
    assert found["ssd-none"]["base"]["lock.kept_mass"][0] == pytest.approx(0.3 / 5)
    assert found["ssd-none"]["null-none"]["lock.kept_mass"][0] == pytest.approx(0.5 / 5)
    assert "fork.entropy" not in found["ssd-none"]["base"]  # no fork positions: nothing claimed
    moved = diagnostics([1.9, 2.9])
    moved["lock"]["per_problem"]["positions"] = [3, 2]
    with pytest.raises(DataError, match="positions differ per problem"):
        mechanism({"base": diagnostics([1.8, 2.7]), "ssd-none": moved, "null-none": diagnostics([1.7, 2.6])},
                  params, rep)
