"""`selfdistill runs [--repo DIR] [--json] [-n N]`: the flow runs recorded in this repository.

Each flow run records what it produced as a commit on its own branch `selfdistill/runs/...`
(flows/records.py). This lists them, newest first: when, the Prefect flow run (name and id) and
its status, the params that differ from the previous recorded run, and headline metrics
(pass@1 per model from report/summary.json when the run has one, else the values in the
metrics files dvc.yaml declares), with the command that audits an output as it was in that run.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flows.records import (REPORT_SUMMARY, T_METRICS, T_PARAMS, RunRecord, diff_params, git_toplevel, params_at,
                           read_at, recorded_runs)

# How many values of a metrics file to show when there is no report/summary.json.
MAX_METRIC_VALUES = 6


def headline_metrics(top: Path, run: RunRecord, prefix: str) -> dict[str, object]:
    """{'pass@1': {'base': 0.02, 'none': 0.03}} from the run's report/summary.json, else
    {'eval/base/metrics.json': {'pass@1': 0.02, ...}} from its metrics files (numbers only)."""
    from flows.lineage import flatten

    text = read_at(top, run.commit, prefix + REPORT_SUMMARY)
    if text is not None:
        try:
            models = json.loads(text).get("models", {})
            found = {name: m["pass@1"] for name, m in models.items() if isinstance(m, dict) and "pass@1" in m}
            if found:
                return {"pass@1": found}
        except (json.JSONDecodeError, AttributeError):
            pass
    metrics = {}
    for name in run.files(T_METRICS):
        text = read_at(top, run.commit, name)
        if text is None:
            metrics[name] = "(in the DVC cache, not in git)"
            continue
        try:
            import yaml

            data = yaml.safe_load(text)  # JSON is YAML
        except Exception:  # noqa: BLE001 - a metrics file in another format: named, not read
            metrics[name] = "(not JSON or YAML)"
            continue
        values = {k: v for k, v in flatten(data).items() if isinstance(v, (int, float)) and not isinstance(v, bool)} \
            if isinstance(data, dict) else {}
        metrics[name] = dict(list(values.items())[:MAX_METRIC_VALUES])
    return metrics


def list_runs(repo_dir: str | Path = ".") -> list[dict]:
    """The recorded runs, oldest first, each with its params diff against the previous one."""
    from dvc.repo import Repo

    root = Path(Repo.find_root(str(repo_dir))).resolve()
    top = git_toplevel(root)
    if top is None:
        return []
    prefix = "" if root == top else f"{root.relative_to(top)}/"
    rows, previous = [], None
    for run in recorded_runs(top):
        files = run.files(T_PARAMS)
        params = params_at(top, run.commit, files)
        if previous is None:
            changed = None
        else:
            changed = diff_params(params_at(top, previous.commit, previous.files(T_PARAMS) or files), params)
        rows.append({
            "branch": run.branch, "commit": run.commit, "recorded_at": run.trailers.get("Selfdistill-Recorded-At"),
            "flow_run_id": run.flow_run_id, "flow_run_name": run.flow_run_name, "status": run.status,
            "params_changed": changed, "metrics": headline_metrics(top, run, prefix),
        })
        previous = run
    return rows


def format_metrics(metrics: dict) -> str:
    if "pass@1" in metrics:
        return "pass@1 " + ", ".join(f"{name} {value:.3f}" for name, value in metrics["pass@1"].items())
    parts = []
    for name, values in metrics.items():
        shown = values if isinstance(values, str) else ", ".join(f"{k}={v:.4g}" for k, v in values.items())
        parts.append(f"{name}: {shown or '(no numbers)'}")
    return "; ".join(parts) or "(no metrics files)"


def render(rows: list[dict]) -> str:
    if not rows:
        return ("No recorded runs. A flow run records itself on a branch selfdistill/runs/... when it ends "
                "(selfdistill flow run, or a deployment's run).")
    lines = []
    for row in reversed(rows):
        when = (row["recorded_at"] or "?").replace("T", " ")[:19] + " UTC"
        lines.append(f"{row['branch']}")
        lines.append(f"  when:     {when}   flow run {row['flow_run_name']} ({row['flow_run_id']})   {row['status']}")
        if row["params_changed"] is None:
            lines.append("  params:   (the first recorded run)")
        elif row["params_changed"]:
            lines.append("  params:   vs the previous run: " + "; ".join(row["params_changed"]))
        else:
            lines.append("  params:   as in the previous run")
        lines.append(f"  metrics:  {format_metrics(row['metrics'])}")
        lines.append(f"  audit:    selfdistill lineage PATH --rev {row['branch']}")
        lines.append("")
    return "\n".join(lines).rstrip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="selfdistill runs",
                                     description="List the recorded flow runs (branches selfdistill/runs/...), newest first.")
    parser.add_argument("--repo", default=".", help="the DVC workspace (default: .)")
    parser.add_argument("-n", "--limit", type=int, help="only the N newest runs")
    parser.add_argument("--json", action="store_true", help="print the runs as JSON (oldest first)")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    from dvc.exceptions import NotDvcRepoError

    try:
        rows = list_runs(args.repo)
    except NotDvcRepoError as err:
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
