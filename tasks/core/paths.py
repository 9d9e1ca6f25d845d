"""Every artifact path of the pipeline, defined once. dvc.yaml spells the same paths (it is the
DAG's definition); tests/test_layout.py checks that the two agree."""
from __future__ import annotations

BASE_MODEL = "models/base"
TRAIN_PROBLEMS = "data/train.jsonl"
EVAL_PROBLEMS = "data/eval.jsonl"
DATA_SOURCE = "data/source.json"
SAMPLES = "samples/samples.jsonl"
SAMPLE_STATS = "samples/stats.json"
REPORT_JSON = "report/summary.json"
REPORT_MD = "report/summary.md"
CHECKPOINTS = "checkpoints"  # not a DVC out: survives DVC clearing outs, so training resumes


def filtered_samples(arm: str) -> str:
    return f"filtered/{arm}/train.jsonl"


def filter_stats(arm: str) -> str:
    return f"filtered/{arm}/stats.json"


def trained_model(arm: str) -> str:
    return f"models/{arm}"


def train_curve(arm: str) -> str:
    return f"plots/train/{arm}.csv"


def eval_dir(name: str) -> str:
    """eval/base for the base model, eval/<arm> for a trained arm."""
    return f"eval/{name}"


def eval_samples(name: str) -> str:
    return f"{eval_dir(name)}/samples.jsonl"


def eval_metrics(name: str) -> str:
    return f"{eval_dir(name)}/metrics.json"
