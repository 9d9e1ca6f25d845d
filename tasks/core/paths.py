"""Every artifact path of the pipeline, defined once. dvc.yaml spells the same paths (it is the
DAG's definition); tests/test_layout.py checks that the two agree."""
from __future__ import annotations

CODEIO_PROBLEMS = "data/codeio/problems.jsonl"
CODEIO_SOURCE = "data/codeio/source.json"
BASE_MODEL = "models/base"
TRAIN_PROBLEMS = "data/train.jsonl"
VALIDATION_PROBLEMS = "data/validation.jsonl"  # where each model's T_eval is chosen
EVAL_PROBLEMS = "data/eval"  # one <set>.jsonl per eval set
DATA_SOURCE = "data/source.json"
REPORT_JSON = "report/summary.json"
REPORT_MD = "report/summary.md"
REPORT_FIGURES = "report/figures"  # PNGs, linked from summary.md
CHECKPOINTS = "checkpoints"  # not a DVC out: survives DVC clearing outs, so training resumes


def samples(config: str) -> str:
    """The raw samples of one sampling config (sample.configs.<config>)."""
    return f"samples/{config}/samples.jsonl"


def sample_stats(config: str) -> str:
    return f"samples/{config}/stats.json"


def filtered_samples(arm: str) -> str:
    return f"filtered/{arm}/train.jsonl"


def filter_stats(arm: str) -> str:
    return f"filtered/{arm}/stats.json"


def trained_model(arm: str) -> str:
    return f"models/{arm}"


def train_curve(arm: str) -> str:
    return f"plots/train/{arm}.csv"


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


def eval_metrics(name: str) -> str:
    """Per eval set: pass@k, pass@k per difficulty band, counts of each verdict."""
    return f"{eval_dir(name)}/metrics.json"


def diagnose_metrics(name: str) -> str:
    return f"diagnose/{name}/metrics.json"


def diagnose_classes() -> str:
    """The base model's lock / fork / other class of each diagnosed position."""
    return "diagnose/base/classes.json"
