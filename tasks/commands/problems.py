"""`selfdistill problems`: build problem sets (tasks/problemsets/).

    selfdistill problems codeio [-o problems/codeio.jsonl] [--tests 5] [--limit N]
    selfdistill problems import --format rstar-coder|livecodebench|evalplus SRC -o problems/NAME.jsonl
                                [--since YYYY-MM-DD] [--until YYYY-MM-DD] [--version-tag release_v6]

`codeio` turns the CodeIO problems shipped in the PyPI package reasoning-gym into call-based
problems, making their tests in the sandbox. `import` converts rStar-Coder seed problems,
LiveCodeBench code_generation_lite rows, or evalplus's released HumanEval+ / MBPP+ files from
SRC: a local JSONL / JSON / parquet file or a folder of them (a folder laid out like the hub repo
is read as the hub snapshot would be), or a hub dataset id whose data files are read through
huggingface_hub (no `datasets`, no dataset script). Each writes the problems (atomically; every
row loads with tasks.core.problems.load_problems) and, beside them, NAME.source.json: where the
data came from (package version, hub commit, file sha256s), what was kept, and every dropped
problem with its reason and file line. When nothing is kept, nothing is written and the error
says why.
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

FORMATS = ("rstar-coder", "livecodebench", "evalplus")


def _date(text: str) -> datetime.date:
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a YYYY-MM-DD date: {text!r}") from None


def _finish(problems: list[dict], report, out: Path, provenance: Path | None, fmt: str) -> int:
    from tasks.problemsets import provenance_path, write_problems

    if not problems:
        raise DataError(report.nothing_kept(fmt))
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
    return _finish(problems, report, args.out, args.provenance, "codeio")


def source_paths(args, module) -> tuple[list[Path], dict]:
    """The files to read and where they came from: SRC itself (a file, a folder of rows, or a
    folder laid out like the hub repo), or a snapshot of the hub repo SRC names."""
    from tasks import problemsets
    from tasks.problemsets import hub

    selection = args.version_tag if args.format == "livecodebench" else args.config
    if problemsets.is_local(args.src):
        root = Path(args.src)
        layout = module.repo_files(root, selection) if root.is_dir() and hasattr(module, "repo_files") else None
        paths = layout or problemsets.local_files(args.src)
        return paths, problemsets.source_files_provenance(paths)
    if not hasattr(module, "hub_patterns"):
        raise DataError(f"{args.src}: no such file or folder ({args.format} reads local files: evalplus releases "
                        "HumanEvalPlus-*.jsonl.gz and MbppPlus-*.jsonl.gz on GitHub, "
                        "github.com/evalplus/humanevalplus_release and mbppplus_release)")
    selection = selection or getattr(module, "HUB_CONFIG", None)
    root, commit = hub.snapshot(args.src, args.revision, module.hub_patterns(selection))
    paths = module.repo_files(root, selection)
    if not paths:
        raise DataError(f"hub dataset {args.src!r}: its snapshot holds none of {module.hub_patterns(selection)}")
    return paths, hub.provenance(args.src, args.revision, commit, root, paths)


def run_import(args) -> int:
    from tasks import problemsets
    from tasks.problemsets import evalplus, livecodebench, rstar_coder

    module = {"rstar-coder": rstar_coder, "livecodebench": livecodebench, "evalplus": evalplus}[args.format]
    if args.format != "livecodebench" and (args.since or args.until or args.version_tag):
        raise DataError("--since/--until/--version-tag select LiveCodeBench contest dates and releases; "
                        f"{args.format} has none")
    if args.format != "rstar-coder" and args.config:
        raise DataError("--config names an rStar-Coder config (its folder of parquet shards)")
    paths, source = source_paths(args, module)
    if args.format == "evalplus":
        others = [p for p in paths if not p.name.endswith((".jsonl", ".jsonl.gz"))]
        if others:
            raise DataError(f"{others[0]}: evalplus releases JSONL files (HumanEvalPlus-*.jsonl.gz, "
                            "MbppPlus-*.jsonl.gz); this is another format")
    records = problemsets.read_paths(paths)
    report = problemsets.Report(source=dict(source=args.format, format=args.format, **source))
    if module is livecodebench:
        problems = livecodebench.convert(records, report, since=args.since, until=args.until,
                                         max_tests=args.max_tests, limit=args.limit)
    elif module is rstar_coder:
        max_tests = args.max_tests if args.max_tests is not None else rstar_coder.DEFAULT_MAX_TESTS
        problems = rstar_coder.convert(records, report, max_tests=max_tests or None, limit=args.limit)
    else:
        problems = evalplus.convert(records, report, timeout_s=args.timeout, memory_mb=args.memory_mb,
                                    workers=args.workers, max_tests=args.max_tests or None,
                                    limit=args.limit, progress=True)
    return _finish(problems, report, args.out, args.provenance, args.format)


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

    imp = sub.add_parser("import", help="import rStar-Coder, LiveCodeBench or evalplus (HumanEval+, MBPP+) problems")
    imp.add_argument("src", help="a local .jsonl/.json/.parquet file or folder (a folder may be laid out like "
                                 "the hub repo), or a hub dataset id (rStar-Coder, LiveCodeBench)")
    imp.add_argument("--format", required=True, choices=FORMATS)
    imp.add_argument("-o", "--out", type=Path, required=True)
    imp.add_argument("--since", type=_date, default=None, help="LiveCodeBench: first contest date kept")
    imp.add_argument("--until", type=_date, default=None, help="LiveCodeBench: last contest date kept")
    imp.add_argument("--max-tests", type=int_at_least(0), default=None,
                     help="tests kept per problem (0: all; default: all for LiveCodeBench and evalplus "
                          "(base inputs first), 20 for rStar-Coder, official ones first)")
    imp.add_argument("--limit", type=int_at_least(1), default=None, help="stop after N problems")
    imp.add_argument("--config", default=None,
                     help="rStar-Coder: the config folder read (default seed_testcase)")
    imp.add_argument("--version-tag", default=None,
                     help="LiveCodeBench release: release_v6 (test.jsonl .. test6.jsonl), v6, v5_v6, "
                          "release_latest (default: every test*.jsonl)")
    imp.add_argument("--revision", default=None, help="hub id: a commit, tag or branch (default: main)")
    imp.add_argument("--timeout", type=seconds, default=5.0,
                     help="evalplus: seconds a canonical solution may take for all its inputs (default 5, as `score`)")
    imp.add_argument("--memory-mb", type=int_at_least(64), default=1024)
    imp.add_argument("--workers", type=int_at_least(0), default=0, help="evalplus: parallel programs (0: cores)")
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
