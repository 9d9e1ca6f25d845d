"""Stage `codeio`: reasoning-gym's CodeIO problems as selfdistill problems with tests.

The PyPI package `reasoning-gym` (Apache-2.0) ships about 3,200 distinct CodeIO problems, each a
description, an input/output spec, a reference program defining `main_solution` and a
generator of inputs. Each becomes a `call` problem: a prompt asking for `main_solution` (no
reference code in it) and `codeio.tests` tests whose expected values come from running the
reference on seeded generated inputs in the sandbox. Problems whose reference is
nondeterministic, fails, times out or returns what JSON cannot carry are dropped and counted
(tasks/problemsets/codeio.py). Runs once: DVC caches the result.

Outputs: data/codeio/problems.jsonl, data/codeio/source.json (package version, file sha256s,
kept and dropped by reason).
"""
from __future__ import annotations

import sys

from tasks.core import paths
from tasks.core.config import load_params, run_stage
from tasks.core.files import write_json, write_jsonl
from tasks.problemsets.codeio import convert


def main() -> int:
    params = load_params()
    cfg = params.codeio
    problems, report = convert(tests=cfg.tests, limit=cfg.max_problems or None, seed=cfg.seed,
                               timeout_s=cfg.timeout_s, memory_mb=params.sandbox.memory_mb,
                               workers=params.sandbox.workers, progress=True)
    write_jsonl(paths.CODEIO_PROBLEMS, problems)
    write_json(paths.CODEIO_SOURCE, report.counts())
    print(f"codeio: {report.kept} problems with tests in {paths.CODEIO_PROBLEMS}; dropped {dict(report.dropped)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
