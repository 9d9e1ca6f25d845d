"""CodeIO problems from the PyPI package reasoning-gym (Apache-2.0), as call-kind problems.

reasoning-gym ships `reasoning_gym/data/codeio.jsonl.gz` (JSONL, 3,002 rows) and
`codeio-hq.jsonl.gz` (one JSON array, 2,750 rows; 2,508 of its references are also in the first
file). Each row has `task_description`, `input_output_spec`, `code_sample` (a reference program
defining `main_solution`), `input_generator` (defining `generate_inputs(rng)`, or
`generate_input(rng)` in -hq, returning main_solution's keyword arguments as a dict); most rows
also have the scores `difficulty` (1-10), `clarity`, `practice`, `educational`, `safety` and the
counts `unique_inputs`, `unique_outputs`, `total_generations` (the -hq rows also `prompt` and
`output`). Rows carry no id: a problem is named `codeio/<first 12 hex of sha256(code_sample)>`
and the two files are deduplicated by the reference program.

Tests are made in the sandbox, never in this process (the references import numpy, sympy, ...
and some write files):
  pass 1  one run per problem: for seeds s = seed*1000003 + i (i < 2 * tests), the generator is
          called with random.Random(s) (the `random` module and numpy's global generator are
          seeded with s too), its dict goes through JSON and the reference is called with it; the
          arguments and the returned value come back as plain data (sandbox.ValuesJob).
  here    the dict becomes positional args in main_solution's parameter order (from its `ast`
          signature); a case is kept when args and value survive JSON unchanged; the first
          `tests` distinct cases are the tests.
  pass 2  a fresh sandbox (new processes, so other random state and hash seed) checks the
          reference against those tests as `selfdistill score` would (sandbox.CallJob, the same
          timeout, CodeIO's float tolerance tasks.core.jobs.DEFAULT_ATOL): a reference that now
          disagrees is nondeterministic and dropped.
A problem that keeps no case is dropped, counted by reason.
"""
from __future__ import annotations

import ast
import collections
import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import sys
import time
import warnings
from pathlib import Path

from tasks import sandbox
from tasks.core import files
from tasks.core.files import DataError
from tasks.core.jobs import DEFAULT_ATOL
from tasks.core.overlap import near_duplicate_key
from tasks.core.problems import Draw, is_held_out, rank_key
from tasks.problemsets import MalformedRow, Report, json_roundtrip, read_local
from tasks.sandbox.jail import compare

PACKAGE = "reasoning_gym"
DISTRIBUTION = "reasoning-gym"
DATA_FILES = ("codeio.jsonl.gz", "codeio-hq.jsonl.gz")
REQUIRED = ("task_description", "input_output_spec", "code_sample", "input_generator")
ENTRY_POINT = "main_solution"
CASE_FUNCTION = "__selfdistill_case__"
MAX_CASE_BYTES = 20_000  # one test's JSON (args + expected): bigger inputs make poor prompts' tests

# Why a problem was dropped, in the order a problem's most common reason is reported.
REASONS = (
    "missing field", "reference does not parse", "no main_solution", "unsupported signature",
    "no input generator", "missing module", "reference fails to load", "generator fails",
    "inputs do not match signature", "reference fails", "not JSON-comparable", "tests too large",
    "timed out", "memory limit", "output limit", "nondeterministic", "sandbox error")

QUESTION = """{description}

Write a Python function `main_solution` that solves this.

The input and output requirements are as follows:

{spec}

Your function must have exactly this signature (it is called with the inputs as arguments, and
its return value is compared with the expected one):

```python
{signature}
```"""

HARNESS = """from random import Random
{code}


{generator}


def {case}(seed):
    import json as _json, random as _random, sys as _sys
    _random.seed(seed)
    if "numpy" in _sys.modules:
        _sys.modules["numpy"].random.seed(seed % (1 << 32))
    try:
        _inputs = {generator_name}(Random(seed))
    except BaseException as _err:
        return ["generator", type(_err).__name__ + ": " + str(_err)[:300]]
    try:
        _text = _json.dumps(_inputs, allow_nan=False)
    except BaseException as _err:
        return ["inputs", type(_err).__name__ + ": " + str(_err)[:300]]
    if not isinstance(_inputs, dict):
        return ["inputs", "the generator returned a " + type(_inputs).__name__ + ", not a dict"]
    try:
        __import__("inspect").signature({entry}).bind(**_inputs)
    except TypeError as _err:
        return ["signature", str(_err)[:300]]
    _result = {entry}(**_json.loads(_text))  # its own copy: a reference may change its arguments
    return ["ok", _json.loads(_text), _result]
"""


def data_files() -> list[Path]:
    """reasoning-gym's CodeIO files, found without importing the package (its __init__ pulls in
    dependencies the data does not need)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError("CodeIO needs the PyPI package reasoning-gym "
                        "(pip install --no-deps reasoning-gym)")
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    found = [data / name for name in DATA_FILES]
    missing = [p.name for p in found if not p.is_file()]
    if missing:
        raise DataError(f"reasoning-gym at {data.parent} lacks {', '.join(missing)}")
    return found


def package_version() -> str | None:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None


def problem_id(code: str) -> str:
    return "codeio/" + hashlib.sha256(code.strip().encode()).hexdigest()[:12]


class Candidate:
    """A distinct CodeIO row that passed the static checks, on its way through the sandbox."""

    def __init__(self, task_id: str, where: str, row: dict, params: list[str], required: int,
                 signature: str, generator_name: str):
        self.task_id, self.where, self.row = task_id, where, row
        self.params, self.required = params, required
        self.signature, self.generator_name = signature, generator_name
        self.tests: list[dict] = []


def _parse(code: str) -> ast.Module:
    with warnings.catch_warnings():  # invalid escape sequences in the references' strings
        warnings.simplefilter("ignore")
        return ast.parse(code)


def parse_signature(code: str) -> tuple[list[str], int, str]:
    """(parameter names in order, how many are required, the `def` line) of main_solution;
    ValueError naming the reason when it cannot be called with positional arguments."""
    try:
        tree = _parse(code)
    except (SyntaxError, ValueError) as err:
        raise ValueError("reference does not parse", str(err)) from None
    defs = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.name == ENTRY_POINT]
    if not defs:
        raise ValueError("no main_solution", "no top-level def main_solution")
    fn = defs[-1]  # the one a module defining it twice ends up with
    args = fn.args
    if isinstance(fn, ast.AsyncFunctionDef) or args.vararg or args.kwarg or args.posonlyargs \
            or any(d is None for d in args.kw_defaults) or args.kwonlyargs:
        raise ValueError("unsupported signature", ast.unparse(args))
    params = [a.arg for a in args.args]
    returns = f" -> {ast.unparse(fn.returns)}" if fn.returns is not None else ""
    signature = f"def {ENTRY_POINT}({ast.unparse(args)}){returns}:"
    return params, len(params) - len(args.defaults), signature


def generator_function(code: str) -> str:
    try:
        tree = _parse(code)
    except (SyntaxError, ValueError) as err:
        raise ValueError("no input generator", f"does not parse: {err}") from None
    names = [n.name for n in tree.body if isinstance(n, ast.FunctionDef)]
    for name in ("generate_inputs", "generate_input"):
        if name in names:
            return name
    others = [n for n in names if n.startswith("generate")]
    if others:
        return others[0]
    raise ValueError("no input generator", f"defines {names or 'no functions'}")


def question_text(row: dict, signature: str) -> str:
    return QUESTION.format(description=row["task_description"].strip(),
                           spec=row["input_output_spec"].strip(), signature=signature)


def harness(candidate: Candidate) -> str:
    return HARNESS.format(code=candidate.row["code_sample"], generator=candidate.row["input_generator"],
                          case=CASE_FUNCTION, generator_name=candidate.generator_name,
                          entry=ENTRY_POINT)


def read_distinct(paths: list[Path], report: Report, limit: int | None) -> list[tuple[str, str, dict]]:
    """(task_id, where, row) for each distinct reference, the first file's rows first; rows
    missing a field are counted drops."""
    seen: dict[str, str] = {}
    out = []
    per_file = collections.Counter()
    duplicates = 0
    for path in paths:
        for where, row in read_local(path):
            where = where.replace(str(path), path.name, 1)
            report.read += 1
            per_file[path.name] += 1
            if isinstance(row, MalformedRow) or not isinstance(row, dict):
                if limit is None or len(out) < limit:
                    report.drop(None, where, "missing field", row if isinstance(row, MalformedRow)
                                else "not a JSON object")
                continue
            code = row.get("code_sample")
            task_id = problem_id(code) if isinstance(code, str) and code.strip() else None
            missing = [f for f in REQUIRED if not isinstance(row.get(f), str) or not row[f].strip()]
            if task_id in seen:
                duplicates += 1
                continue
            if missing:  # not marked seen: a complete copy in the other file may follow
                if limit is None or len(out) < limit:
                    report.drop(task_id, where, "missing field",
                                f"missing or empty: {', '.join(missing)}")
                continue
            seen[task_id] = where
            if limit is None or len(out) < limit:
                out.append((task_id, where, row))
    report.notes["rows_per_file"] = dict(per_file)
    report.notes["distinct"] = len(seen)
    report.notes["duplicates"] = duplicates
    return out


def static_checks(rows: list[tuple[str, str, dict]], report: Report) -> list[Candidate]:
    candidates = []
    for task_id, where, row in rows:
        try:
            params, required, signature = parse_signature(row["code_sample"])
            generator_name = generator_function(row["input_generator"])
        except ValueError as err:
            reason, detail = err.args
            report.drop(task_id, where, reason, detail)
            continue
        candidates.append(Candidate(task_id, where, row, params, required, signature, generator_name))
    return candidates


def load_failure(result: str) -> str:
    """A reason from the sandbox's words for a run that did not get to the calls."""
    if result in ("timed out", "memory limit", "output limit"):
        return result
    if "ModuleNotFoundError" in result or "ImportError" in result:
        return "missing module"
    if result == "syntax error":
        return "reference does not parse"
    if "sandbox error" in result:
        return "sandbox error"
    return "reference fails to load"


def positional(kwargs: dict, candidate: Candidate) -> list:
    """main_solution's keyword arguments as positional ones; ValueError if they do not fit."""
    extra = [k for k in kwargs if k not in candidate.params]
    if extra:
        raise ValueError(f"unknown parameters {extra}")
    present = [p in kwargs for p in candidate.params]
    count = sum(present)
    if present[:count] != [True] * count or count < candidate.required:
        raise ValueError(f"gives {sorted(kwargs)}; main_solution takes {candidate.params}")
    return [kwargs[p] for p in candidate.params[:count]]


def collect_cases(candidate: Candidate, values: sandbox.Values,
                  tests: int) -> tuple[str, str] | None:
    """Fill candidate.tests from pass 1; (drop reason, detail) when no case is usable."""
    if not values.ok:
        return load_failure(values.result), values.result
    failures = collections.Counter()
    first_error: dict[str, str] = {}
    seen = set()
    for outcome in values.outcomes:
        if len(candidate.tests) >= tests:
            break
        if not outcome.returned:
            if outcome.error.startswith("unsupported"):
                reason = "not JSON-comparable"
            elif outcome.error.startswith(("ModuleNotFoundError", "ImportError")):
                reason = "missing module"  # imported inside main_solution
            else:
                reason = "reference fails"
            failures[reason] += 1
            first_error.setdefault(reason, outcome.error)
            continue
        reply = outcome.value
        if not isinstance(reply, list) or not reply or \
                reply[0] not in ("ok", "generator", "inputs", "signature"):
            failures["reference fails"] += 1
            continue
        if reply[0] == "generator":
            failures["generator fails"] += 1
            first_error.setdefault("generator fails", str(reply[1]))
            continue
        if reply[0] == "signature":
            failures["inputs do not match signature"] += 1
            first_error.setdefault("inputs do not match signature", str(reply[1]))
            continue
        if reply[0] == "inputs":
            failures["not JSON-comparable"] += 1
            first_error.setdefault("not JSON-comparable", f"inputs: {reply[1]}")
            continue
        _, kwargs, result = reply
        try:
            args = positional(kwargs, candidate)
        except ValueError as err:
            failures["inputs do not match signature"] += 1
            first_error.setdefault("inputs do not match signature", str(err))
            continue
        try:
            expected = json_roundtrip(result)
            args = json_roundtrip(args)
        except (ValueError, TypeError):
            failures["not JSON-comparable"] += 1
            continue
        if not compare.values_match(result, expected):  # e.g. int dict keys turned into str
            failures["not JSON-comparable"] += 1
            continue
        case = {"args": args, "expected": expected}
        text = json.dumps(case, sort_keys=True)
        if len(text) > MAX_CASE_BYTES:
            failures["tests too large"] += 1
            continue
        key = json.dumps(args, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        candidate.tests.append(case)
    if candidate.tests:
        return None
    if not failures:
        return "generator fails", "no input came back"
    top = max(failures.values())
    reason = next(r for r in REASONS if failures.get(r) == top)
    counts = ", ".join(f"{r}: {n}" for r, n in failures.items())
    return reason, f"{counts}; {first_error.get(reason, '')}".rstrip("; ")


def verify_failure(result: str) -> str:
    if result.startswith("failed: wrong answer"):
        return "nondeterministic"
    if result in ("timed out", "memory limit", "output limit"):
        return result
    if "ModuleNotFoundError" in result or "ImportError" in result:
        return "missing module"
    if "sandbox error" in result:
        return "sandbox error"
    return "reference fails"


def problem_row(candidate: Candidate) -> dict:
    row = candidate.row
    out = {"task_id": candidate.task_id, "kind": "call",
           "question": question_text(row, candidate.signature), "entry_point": ENTRY_POINT,
           "tests": candidate.tests}
    difficulty = row.get("difficulty")
    if isinstance(difficulty, int) and not isinstance(difficulty, bool) and 1 <= difficulty <= 10:
        out["difficulty"] = difficulty
    out["canonical_solution"] = row["code_sample"]
    out["source"] = "codeio"
    return out


def run_candidates(candidates: list[Candidate], tests: int, seed: int, timeout_s: float, memory_mb: int,
                   workers: int, report: Report, progress: bool) -> list[Candidate]:
    """Pass 1 and pass 2 over `candidates` (each problem's outcome depends on itself alone: every
    program runs in a process of its own, forked fresh); the kept ones, in the given order. Drops
    are counted in `report`."""
    if not candidates:
        return []
    log = _logger(progress)
    jobs = [sandbox.ValuesJob(harness(c), CASE_FUNCTION,
                              [[seed * 1_000_003 + i] for i in range(2 * tests)])
            for c in candidates]
    with sandbox.Sandbox(workers=workers) as box:
        results = box.call_values(jobs, timeout_s=2 * timeout_s, memory_mb=memory_mb, progress=progress)
        report.source["isolation"] = box.level
    generated = []
    for candidate, values in zip(candidates, results):
        dropped = collect_cases(candidate, values, tests)
        if dropped:
            report.drop(candidate.task_id, candidate.where, *dropped)
        else:
            generated.append(candidate)
    log(f"pass 2: check {len(generated)} references against their tests in a fresh sandbox")
    checks = [sandbox.CallJob(c.row["code_sample"], ENTRY_POINT,
                              [sandbox.CallCase(t["args"], t["expected"]) for t in c.tests],
                              atol=DEFAULT_ATOL["codeio"])
              for c in generated]
    with sandbox.Sandbox(workers=workers) as box:
        verdicts = box.check(checks, timeout_s=timeout_s, memory_mb=memory_mb, progress=progress)
    kept = []
    for candidate, verdict in zip(generated, verdicts):
        if verdict.passed:
            kept.append(candidate)
        else:
            report.drop(candidate.task_id, candidate.where, verify_failure(verdict.result), verdict.result)
    return kept


def _logger(progress: bool):
    if progress:
        return lambda text: print(f"codeio: {text}", file=sys.stderr, flush=True)
    return lambda text: None


@dataclasses.dataclass(frozen=True)
class Needed:
    """Which problems a run needs: prepare's Draw from the codeio source (tasks/core/problems.py)
    under data.split_seed and data.eval_fraction, and `margin`, the share of the train prompts
    converted beyond the Draw for the ones prepare drops to decontamination."""
    draw: Draw | None
    split_seed: int
    eval_fraction: float
    margin: float

    def targets(self) -> dict[str, int | None] | None:
        """Per part of the seeded order ("held-out", "rest"): how many problems must survive
        conversion (and near-duplicate removal) among its first converted ones; None for a part
        that needs all; None in all when no part can stop early."""
        draw = self.draw
        if draw is None:
            return {}
        rest = None if draw.rest is None else draw.rest + math.ceil(self.margin * draw.train)
        out = {"rest": rest}
        if draw.split:
            out["held-out"] = draw.held_out
        return out

    def part(self, task_id: str) -> str:
        if self.draw is not None and self.draw.split and \
                is_held_out(task_id, self.eval_fraction, self.split_seed):
            return "held-out"
        return "rest"


def catalog_row(candidate: Candidate, status: str) -> dict:
    """A distinct problem's prompt and what conversion made of it (kept, dropped, unconverted):
    prepare reads the prompts of every problem, converted or not, for the choices that must
    not depend on which ones were converted (tasks/prepare.py)."""
    return {"task_id": candidate.task_id, "kind": "call", "question": question_text(candidate.row, candidate.signature),
            "status": status}


def convert_needed(tests: int = 5, limit: int | None = None, seed: int = 0, timeout_s: float = 5.0,
                   memory_mb: int = 1024, workers: int = 0, paths: list[Path] | None = None,
                   progress: bool = False, needed: Needed | None = None
                   ) -> tuple[list[dict], Report, list[dict]]:
    """CodeIO -> (problems, report, catalog). `paths` defaults to reasoning-gym's two files;
    `limit` takes the first N distinct problems (the pool). `needed` None converts every problem
    of the pool; else only the first ones of the seeded order each part of prepare's draw needs
    (see convert_in_rank_order). The problems and the catalog are in file order either way."""
    if tests < 1:
        raise DataError("--tests must be at least 1")
    started = time.monotonic()
    paths = list(paths) if paths is not None else data_files()
    report = Report(source={
        "source": "codeio", "package": DISTRIBUTION, "version": package_version(),
        "license": "Apache-2.0",
        "files": {p.name: files.file_sha256(p) for p in paths},
        "tests_per_problem": tests, "seed": seed, "timeout_s": timeout_s, "memory_mb": memory_mb,
        "limit": limit})
    rows = read_distinct(paths, report, limit)
    candidates = static_checks(rows, report)
    log = _logger(progress)
    log(f"{report.notes['distinct']} distinct problems in {report.read} rows; "
        f"{len(candidates)} pass the static checks")
    run = dict(tests=tests, seed=seed, timeout_s=timeout_s, memory_mb=memory_mb, workers=workers,
               report=report, progress=progress)
    targets = needed.targets() if needed is not None else None
    if targets is None or None in targets.values():
        why = "codeio.convert is all" if targets is None else \
            "a set takes all of its part (a data.*.max_problems is 0)"
        report.notes["convert"] = {"mode": "all", "why": why}
        log(f"converting all {len(candidates)} ({why}; pass 1: generate inputs and run the references)")
        kept = set(c.task_id for c in run_candidates(candidates, **run))
        attempted = {c.task_id for c in candidates}
    else:
        kept, attempted, parts = convert_in_rank_order(candidates, needed, targets, run, log)
        report.notes["convert"] = {"mode": "needed", "split_seed": needed.split_seed,
                                   "eval_fraction": needed.eval_fraction, "margin": needed.margin,
                                   "parts": parts}
    problems = [problem_row(c) for c in candidates if c.task_id in kept]
    catalog = [catalog_row(c, "kept" if c.task_id in kept else "dropped" if c.task_id in attempted
                           else "unconverted") for c in candidates]
    report.kept = len(problems)
    report.notes["converted"] = len(attempted)
    report.notes["unconverted"] = len(candidates) - len(attempted)
    report.notes["problems_with_fewer_tests"] = sum(len(p["tests"]) < tests for p in problems)
    report.notes["seconds"] = round(time.monotonic() - started, 1)
    log(f"converted {len(attempted)} of {len(candidates)}: kept {report.kept}; dropped {dict(report.dropped)} "
        f"in {report.notes['seconds']} s")
    return problems, report, catalog


def convert_in_rank_order(candidates: list[Candidate], needed: Needed, targets: dict[str, int],
                          run: dict, log) -> tuple[set[str], set[str], dict]:
    """Convert the candidates of each part in the seeded order prepare draws in (rank_key with
    data.split_seed), in rounds, until the first converted ones of each part hold its target of
    problems that prepare keeps, or the part runs out. Exactly what prepare would draw from a full
    conversion, because:
      - which part a problem is in depends on its own task_id (is_held_out), and each set takes
        the first survivors of its part in that order, so a part's problems past its converted
        prefix are never reached (prepare checks that: tasks/prepare.py);
      - a problem's conversion depends on it alone (run_candidates);
      - near-duplicate removal keeps the smallest task_id of each group that survived
        conversion: every problem converted brings its whole group with it (the groups come from
        the prompts, which need no sandbox), so that choice is the one a full conversion makes.
    (kept task_ids, converted task_ids, per part: target, converted, kept.)"""
    groups: dict[tuple, list[Candidate]] = collections.defaultdict(list)
    if needed.draw is not None and needed.draw.near_duplicates:
        for c in candidates:
            key = near_duplicate_key(catalog_row(c, ""))
            if key:
                groups[key].append(c)
    partners = {c.task_id: groups[key] for key, members in groups.items() for c in members if len(members) > 1}
    order = {part: [] for part in targets}
    for c in sorted(candidates, key=lambda c: rank_key(c.task_id, needed.split_seed)):
        part = needed.part(c.task_id)
        if part in order:
            order[part].append(c)
    kept: set[str] = set()
    attempted: set[str] = set()
    reached = {part: 0 for part in order}  # how many of the part's first problems are converted

    def survivors(part: str) -> int:
        """Problems prepare keeps among the part's first `reached` (near-duplicates resolved)."""
        count = 0
        for c in order[part][:reached[part]]:
            if c.task_id in kept and not any(o.task_id in kept and o.task_id < c.task_id
                                            for o in partners.get(c.task_id, ())):
                count += 1
        return count

    rounds = 0
    while True:
        batch: list[Candidate] = []
        # the share conversion keeps so far (a prior of 80% at the start): sizes each round
        rate = max(0.3, (len(kept) + 8) / (len(attempted) + 10))
        for part, target in targets.items():
            missing = target - survivors(part)
            if missing <= 0 or reached[part] >= len(order[part]):
                continue
            want = math.ceil(missing / rate)
            while want > 0 and reached[part] < len(order[part]):
                c = order[part][reached[part]]
                reached[part] += 1
                if c.task_id not in attempted:
                    batch.append(c)
                    want -= 1
        if not batch:
            break
        chosen = {c.task_id for c in batch}
        for c in list(batch):
            for other in partners.get(c.task_id, ()):
                if other.task_id not in attempted and other.task_id not in chosen:
                    chosen.add(other.task_id)
                    batch.append(other)
        rounds += 1
        log(f"round {rounds}: converting {len(batch)} problems (the next of the seeded order "
            f"{', '.join(f'{part} {reached[part]}/{len(order[part])}' for part in order)}, near-duplicates with them)")
        attempted |= chosen
        kept |= {c.task_id for c in run_candidates(batch, **run)}
    parts = {part: {"target": targets[part], "first_converted": reached[part], "of": len(order[part]),
                    "kept": survivors(part)} for part in order}
    parts["rounds"] = rounds
    return kept, attempted, parts


def convert(tests: int = 5, limit: int | None = None, seed: int = 0, timeout_s: float = 5.0,
            memory_mb: int = 1024, workers: int = 0, paths: list[Path] | None = None,
            progress: bool = False) -> tuple[list[dict], Report]:
    """CodeIO -> (problems, report), every problem converted. `paths` defaults to reasoning-gym's
    two files; `limit` takes the first N distinct problems (for a quick run)."""
    problems, report, _ = convert_needed(tests=tests, limit=limit, seed=seed, timeout_s=timeout_s,
                                         memory_mb=memory_mb, workers=workers, paths=paths,
                                         progress=progress)
    return problems, report
