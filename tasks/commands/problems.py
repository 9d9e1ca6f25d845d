"""`selfdistill problems`: build problem sets (tasks/problemsets/).

    selfdistill problems codeio [-o problems/codeio.jsonl] [--tests 5] [--limit N]
    selfdistill problems import --format rstar-coder|livecodebench SRC -o problems/NAME.jsonl
                                [--since YYYY-MM-DD] [--until YYYY-MM-DD]

`codeio` turns the CodeIO problems shipped in the PyPI package reasoning-gym into call-based
problems, making their tests in the sandbox. `import` converts rStar-Coder seed problems or
LiveCodeBench code_generation_lite rows from SRC: a local JSONL / JSON / parquet file or a folder
of them, or else a hub id read through the `datasets` library. Each writes the problems
(atomically; every row loads with tasks.core.problems.load_problems) and, beside them,
NAME.source.json: where the data came from (package version or file sha256s), what was kept,
and every dropped problem with its reason and file line.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

from tasks.commands.args import int_at_least, seconds
from tasks.core import files
from tasks.core.files import DataError

FORMATS = ("rstar-coder", "livecodebench")


def _date(text: str) -> datetime.date:
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a YYYY-MM-DD date: {text!r}") from None


def _finish(problems: list[dict], report, out: Path, provenance: Path | None) -> int:
    from tasks.problemsets import provenance_path, write_problems

    written = write_problems(out, problems)
    target = provenance or provenance_path(out)
    files.write_json(target, report.as_json())
    summary = report.counts()
    summary.pop("files", None)
    print(json.dumps(dict(summary, out=str(out), provenance=str(target)), indent=2))
    return 0 if written else 2


def run_codeio(args) -> int:
    from tasks.problemsets import codeio

    problems, report = codeio.convert(tests=args.tests, limit=args.limit, seed=args.seed,
                                      timeout_s=args.timeout, memory_mb=args.memory_mb,
                                      workers=args.workers, progress=True)
    return _finish(problems, report, args.out, args.provenance)


def run_import(args) -> int:
    from tasks import problemsets
    from tasks.problemsets import livecodebench, rstar_coder

    if args.format == "rstar-coder" and (args.since or args.until):
        raise DataError("--since/--until filter LiveCodeBench contest dates; rStar-Coder has none")
    module = rstar_coder if args.format == "rstar-coder" else livecodebench
    if problemsets.is_local(args.src):
        records = problemsets.read_local(args.src)
        source = problemsets.source_files_provenance(problemsets.local_files(args.src))
    else:
        config = args.config if args.config is not None else getattr(module, "HUB_CONFIG", None)
        split = args.split or module.HUB_SPLIT
        extra = {"version_tag": args.version_tag, "trust_remote_code": True} if args.version_tag else {}
        records = problemsets.read_hub(args.src, config, split, **extra)
        source = problemsets.hub_provenance(args.src, config, split)
    report = problemsets.Report(source=dict(source="livecodebench" if module is livecodebench
                                            else "rstar-coder", format=args.format, **source))
    if module is livecodebench:
        problems = livecodebench.convert(records, report, since=args.since, until=args.until,
                                         max_tests=args.max_tests, limit=args.limit)
    else:
        max_tests = args.max_tests if args.max_tests is not None else rstar_coder.DEFAULT_MAX_TESTS
        problems = rstar_coder.convert(records, report, max_tests=max_tests or None, limit=args.limit)
    return _finish(problems, report, args.out, args.provenance)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="selfdistill problems", description=__doc__.split("\n\n")[0])
    sub = top.add_subparsers(dest="command", required=True)

    codeio = sub.add_parser("codeio", help="CodeIO problems from reasoning-gym, tests made in the sandbox")
    codeio.add_argument("-o", "--out", type=Path, default=Path("problems/codeio.jsonl"))
    codeio.add_argument("--tests", type=int_at_least(1), default=5, help="tests per problem (default 5)")
    codeio.add_argument("--limit", type=int_at_least(1), default=None, help="only the first N distinct problems")
    codeio.add_argument("--seed", type=int, default=0, help="seed of the input generators (default 0)")
    codeio.add_argument("--timeout", type=seconds, default=5.0,
                        help="seconds a reference may take for all its tests (default 5, as `score`)")
    codeio.add_argument("--memory-mb", type=int_at_least(64), default=1024)
    codeio.add_argument("--workers", type=int_at_least(0), default=0, help="parallel programs (0: cores)")
    codeio.add_argument("--provenance", type=Path, default=None,
                        help="where to write the provenance (default: OUT's NAME.source.json)")

    imp = sub.add_parser("import", help="import rStar-Coder or LiveCodeBench problems")
    imp.add_argument("src", help="a local .jsonl/.json/.parquet file or folder, or a hub dataset id")
    imp.add_argument("--format", required=True, choices=FORMATS)
    imp.add_argument("-o", "--out", type=Path, required=True)
    imp.add_argument("--since", type=_date, default=None, help="LiveCodeBench: first contest date kept")
    imp.add_argument("--until", type=_date, default=None, help="LiveCodeBench: last contest date kept")
    imp.add_argument("--max-tests", type=int_at_least(0), default=None,
                     help="tests kept per problem (0: all; default: all for LiveCodeBench, "
                          "20 for rStar-Coder, official ones first)")
    imp.add_argument("--limit", type=int_at_least(1), default=None, help="stop after N problems")
    imp.add_argument("--config", default=None, help="hub config (rStar-Coder: seed_testcase)")
    imp.add_argument("--split", default=None, help="hub split (default: test / train)")
    imp.add_argument("--version-tag", default=None, help="LiveCodeBench hub release, e.g. release_v6")
    imp.add_argument("--provenance", type=Path, default=None)
    return top


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if getattr(args, "since", None) and getattr(args, "until", None) and args.since > args.until:
        print("selfdistill problems: --since is after --until", file=sys.stderr)
        return 2
    try:
        return run_codeio(args) if args.command == "codeio" else run_import(args)
    except DataError as err:
        print(f"selfdistill problems: {err}", file=sys.stderr)
        return 2
