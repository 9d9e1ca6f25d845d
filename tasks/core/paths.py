"""Every artifact path of the pipeline, defined once. dvc.yaml spells the same paths (it is the
DAG's definition); tests/test_layout.py checks that the two agree."""
from __future__ import annotations

from pathlib import Path

CODEIO_PROBLEMS = "data/codeio/problems.jsonl"
CODEIO_SOURCE = "data/codeio/source.json"
CODEIO_CATALOG = "data/codeio/catalog.jsonl"  # every distinct problem's prompt and whether it was converted
BASE_MODEL = "models/base"
TRAIN_PROBLEMS = "data/train.jsonl"
VALIDATION_PROBLEMS = "data/validation.jsonl"  # where each model's T_eval is chosen
EVAL_PROBLEMS = "data/eval"  # one <set>.jsonl per eval set
DATA_SOURCE = "data/source.json"
REPORT_JSON = "report/summary.json"  # every number the report computed (an out, not DVC metrics)
REPORT_HEADLINE = "report/headline.json"  # the pipeline's only DVC metrics: flat, one line per number
REPORT_MD = "report/summary.md"
REPORT_FIGURES = "report/figures"  # PNGs, linked from summary.md
REPORT_T_EVAL = "report/t_eval"  # per model, validation pass@1 per T_eval: rows for `dvc plots`
CHECKPOINTS = "checkpoints"  # not a DVC out: survives DVC clearing outs, so training resumes
PARTIALS = f"{CHECKPOINTS}/partial"  # decoding's partial work, likewise (tasks/sampling/generate.py)


def partial_of(out: str | Path) -> Path:
    """Where the partial work of a resumable output lives while it is made: under PARTIALS, outside
    every DVC out, since DVC deletes a stage's outs before it runs it (`dvc repro`, the flow). An
    output outside the working directory keeps its partial beside itself."""
    out = Path(out)
    try:
        rel = out.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return out.with_name(out.name + ".partial")
    return Path(PARTIALS) / f"{rel.as_posix()}.partial"


def samples(config: str) -> str:
    """The raw samples of one sampling config (sample.configs.<config>)."""
    return f"samples/{config}/samples.jsonl"


def sample_stats(config: str) -> str:
    return f"samples/{config}/stats.json"


def sample_shards_dir(config: str) -> str:
    """sample.shards > 1: the shards of one sampling config, merged into samples(config)."""
    return f"samples/{config}/shards"


def sample_shard(config: str, shard: int | str) -> str:
    """Shard `shard`'s rows (its batches of the whole run's plan), as sample-shard@<config>-<shard> wrote them."""
    return f"{sample_shards_dir(config)}/{shard}.jsonl"


def filtered_samples(arm: str) -> str:
    return f"filtered/{arm}/train.jsonl"


def filter_stats(arm: str) -> str:
    return f"filtered/{arm}/stats.json"


def trained_model(arm: str) -> str:
    return f"models/{arm}"


def train_live_dir(arm: str) -> str:
    """dvclive's directory for the arm's training run (tasks/training/sft.py `live_callback`)."""
    return f"train/{arm}/live"


def train_curves(arm: str) -> str:
    """dvclive's per-step curves: one <name>.tsv (step, <name>) per value in sft.LIVE_CURVES."""
    return f"{train_live_dir(arm)}/plots/metrics"


def train_curve(arm: str, name: str = "loss") -> str:
    return f"{train_curves(arm)}/{name}.tsv"


def train_live_summary(arm: str) -> str:
    """dvclive's summary: each curve's last value and the last step."""
    return f"{train_live_dir(arm)}/metrics.json"


def train_stats(arm: str) -> str:
    """What the train stage trained on: samples used and dropped (by reason), steps, loss."""
    return f"train/{arm}/stats.json"


def release_dir(arm: str) -> str:
    """The model a user takes away: weights, tokenizer, decoding at its chosen T_eval, model card."""
    return f"release/{arm}"


def eval_problems(eval_set: str) -> str:
    return f"{EVAL_PROBLEMS}/{eval_set}.jsonl"


def eval_dir(name: str) -> str:
    """eval/base for the base model, eval/<arm> for a trained arm."""
    return f"eval/{name}"


def eval_samples_dir(name: str) -> str:
    return f"{eval_dir(name)}/samples"


def eval_samples(name: str, eval_set: str) -> str:
    return f"{eval_samples_dir(name)}/{eval_set}.jsonl"


def repeat_samples(name: str, eval_set: str, seed: int) -> str:
    """A repeat of a test set's decoding with another seed (evaluate.repeats)."""
    return f"{eval_samples_dir(name)}/repeats/{eval_set}.seed{seed}.jsonl"


def validation_samples(name: str, temperature: float) -> str:
    """A model's answers to the validation set at one T_eval of the sweep."""
    return f"{eval_samples_dir(name)}/validation/T{temperature:g}.jsonl"


def eval_pass(name: str, what: str) -> str:
    """One decoding pass of `evaluate` that fills several of its sample files at once (`validation`:
    the whole T_eval sweep; `test.seed<s>`: every test set at one seed): the name its partial work
    is kept under (partial_of), not a file that is written."""
    return f"{eval_samples_dir(name)}/{what}"


def eval_shards_dir(name: str) -> str:
    """evaluate.shards > 1: the shards of a model's evaluation, merged into its samples and metrics."""
    return f"{eval_dir(name)}/shards"


def eval_shard(name: str, part: str, shard: int | str) -> str:
    """Shard `shard`'s answers with their verdicts (its batches of each pass of `part`: validation,
    the whole T_eval sweep; test, every test set at each seed), as evaluate-<part>@<name>-<shard>
    wrote them."""
    return f"{eval_shards_dir(name)}/{part}/{shard}.jsonl"


def eval_metrics(name: str) -> str:
    """Per eval set: pass@k, pass@k per difficulty band, counts of each verdict."""
    return f"{eval_dir(name)}/metrics.json"


def diagnose_metrics(name: str) -> str:
    return f"diagnose/{name}/metrics.json"


def diagnose_classes() -> str:
    """The base model's lock / fork / other class of each diagnosed position."""
    return "diagnose/base/classes.json"


def t_eval_curve(name: str) -> str:
    """One model's validation pass@1 at each T_eval of the sweep, as rows {T_eval, pass@1}."""
    return f"{REPORT_T_EVAL}/{name}.json"
