"""Stage `codeio`: reasoning-gym's CodeIO problems as selfdistill problems with tests.

The PyPI package `reasoning-gym` (Apache-2.0) ships about 3,200 distinct CodeIO problems, each a
description, an input/output spec, a reference program defining `main_solution` and a
generator of inputs. Each becomes a `call` problem: a prompt asking for `main_solution` (no
reference code in it) and `codeio.tests` tests whose expected values come from running the
reference on seeded generated inputs in the sandbox. Problems whose reference is
nondeterministic, fails, times out or returns what JSON cannot carry are dropped and counted
(tasks/problemsets/codeio.py). Runs once: DVC caches the result.

`codeio.convert: needed` converts only what the data.* sets draw: prepare takes each set's
problems in data.split_seed's seeded order, so this stage converts in that order, part by part
(held-out share, the rest), until each part holds what its sets take (train with
`codeio.margin` more), and what prepare chooses is what a full conversion would lead it to
(tasks/problemsets/codeio.py says why; prepare checks it). A set of size 0 (all) converts all.
`codeio.convert: all` converts every problem of the pool (`codeio.max_problems`).

Outputs: data/codeio/problems.jsonl; data/codeio/catalog.jsonl (every distinct problem's prompt
and status: kept, dropped, unconverted); data/codeio/source.json (package version, file
sha256s, the mode, converted / kept / dropped by reason / unconverted).
"""
from __future__ import annotations

import sys

from tasks.core import paths
from tasks.core.config import load_params, run_stage
from tasks.core.files import write_json, write_jsonl
from tasks.core.problems import source_draw
from tasks.problemsets.codeio import Needed, convert_needed


def main() -> int:
    params = load_params()
    cfg, data = params.codeio, params.data
    needed = None if cfg.convert == "all" else Needed(
        draw=source_draw(data, "codeio"), split_seed=data.split_seed, eval_fraction=data.eval_fraction,
        margin=cfg.margin)
    problems, report, catalog = convert_needed(
        tests=cfg.tests, limit=cfg.max_problems or None, seed=cfg.seed, timeout_s=cfg.timeout_s,
        memory_mb=params.sandbox.memory_mb, workers=params.sandbox.workers, progress=True, needed=needed)
    write_jsonl(paths.CODEIO_PROBLEMS, problems)
    write_jsonl(paths.CODEIO_CATALOG, catalog)
    write_json(paths.CODEIO_SOURCE, report.counts())
    mode = report.notes["convert"]["mode"]
    print(f"codeio: {report.kept} problems with tests in {paths.CODEIO_PROBLEMS} (convert: {mode}; "
          f"{report.notes['converted']} converted, {report.notes['unconverted']} not); dropped {dict(report.dropped)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
