"""`selfdistill runs [--repo DIR] [--json] [-n N]`: the flow runs recorded in this repository.

Each flow run is saved as a DVC experiment named after it (flows/records.py); this is a view
over `dvc exp show --json --all-commits`, newest first: the experiment, when, the Prefect flow
run and its status (from the experiment's message), pass@1 per model and the command that audits
an output as it was in that run. `dvc exp show` itself shows every param and metric.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from flows.gitrepo import git, git_toplevel, parse_trailers
from flows.records import T_AT, T_ID, T_NAME, T_STATUS

# The report's metrics (tasks/report.py): report/headline.json, flat keys `<set>.<model>.pass@1`;
# a record without it has pass@1 in report/summary.json, under `models`.
HEADLINE, SUMMARY = "report/headline.json", "report/summary.json"


def pass_at_1(metrics: dict) -> dict[str, float]:
    """{'humaneval.base': 0.02, ...} from an experiment's metrics as `dvc exp show --json` gives them."""
    data = lambda name: ((metrics.get(name) or {}).get("data") or {})  # noqa: E731
    flat = {k: v for k, v in data(HEADLINE).items() if k.endswith(".pass@1") and isinstance(v, (int, float))}
    if flat:
        return {k.removesuffix(".pass@1"): v for k, v in flat.items()}
    models = data(SUMMARY).get("models") or {}
    return {name: m["pass@1"] for name, m in models.items() if isinstance(m, dict) and "pass@1" in m}


def exp_show(root: Path) -> list[dict]:
    proc = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json", "--all-commits"], cwd=root,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"dvc exp show: {(proc.stderr or proc.stdout).strip()[-500:]}")
    return json.loads(proc.stdout or "[]")


def list_runs(repo_dir: str | Path = ".") -> list[dict]:
    """The experiments flow runs saved, oldest first."""
    from dvc.repo import Repo

    root = Path(Repo.find_root(str(repo_dir))).resolve()
    top = git_toplevel(root)
    if top is None:
        return []
    rows, seen = [], set()
    for baseline in exp_show(root):
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs") or []:
                if rev["rev"] in seen:
                    continue
                seen.add(rev["rev"])
                trailers = parse_trailers(git(top, "log", "-1", "--format=%B", rev["rev"]))
                if T_ID not in trailers:
                    continue  # a `selfdistill grid` or hand-made experiment
                rows.append({"name": rev.get("name") or exp.get("name"), "commit": rev["rev"],
                             "baseline": baseline["rev"], "recorded_at": trailers.get(T_AT),
                             "flow_run_id": trailers[T_ID], "flow_run_name": trailers.get(T_NAME, ""),
                             "status": trailers.get(T_STATUS, ""),
                             "pass@1": pass_at_1((rev.get("data") or {}).get("metrics") or {})})
    return sorted(rows, key=lambda r: (r["recorded_at"] or "", r["name"]))


def render(rows: list[dict]) -> str:
    if not rows:
        return ("No recorded runs. A flow run saves itself as a DVC experiment when it ends "
                "(selfdistill flow run, or a deployment's run); `dvc exp show` lists experiments.")
    lines = []
    for row in reversed(rows):
        when = (row["recorded_at"] or "?").replace("T", " ")[:19] + " UTC"
        scores = ", ".join(f"{name} {value:.3f}" for name, value in row["pass@1"].items()) or "(no pass@1)"
        lines += [f"{row['name']}  ({row['commit'][:7]}, on {row['baseline'][:7]})",
                  f"  when:    {when}   flow run {row['flow_run_name']} ({row['flow_run_id']})   {row['status']}",
                  f"  pass@1:  {scores}",
                  f"  audit:   selfdistill lineage PATH --rev {row['name']}", ""]
    return "\n".join(lines).rstrip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="selfdistill runs",
                                     description="List the recorded flow runs (DVC experiments), newest first.")
    parser.add_argument("--repo", default=".", help="the DVC workspace (default: .)")
    parser.add_argument("-n", "--limit", type=int, help="only the N newest runs")
    parser.add_argument("--json", action="store_true", help="print the runs as JSON (oldest first)")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    from dvc.exceptions import NotDvcRepoError

    try:
        rows = list_runs(args.repo)
    except (NotDvcRepoError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.limit is not None:
        rows = rows[-args.limit:] if args.limit > 0 else []
    try:
        print(json.dumps(rows, indent=2) if args.json else render(rows), flush=True)
    except BrokenPipeError:
        from flows.lineage import reader_gone

        return reader_gone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
