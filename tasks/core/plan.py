"""What a run will cost, before it runs (`selfdistill plan`): per stage, the work (problems x
samples, tokens to decode at most), the memory by component, the disk, and the time at stated
throughputs.

It needs no data and no weights: the counts come from the params (a problems file is counted if
it is there), the architecture from the model's config.json or the shipped table
(tasks/core/shapes.py). Each stage's memory follows what its code does:

- decoding (`sample`, `evaluate`), per backend: the weights at the dtype the backend holds them
  in, the KV cache of the sequences decoded at once at the longest sequence (the longest prompt
  plus max_new_tokens), the prefill's logits and MLP activations;
- training (tasks/training/sft.py): fp32 weights, their gradients and AdamW's two moments (LoRA:
  the adapters'), the bf16 copies autocast makes of the weights during the forward, one
  micro-batch's activations (a checkpoint per layer and one layer recomputed, or every layer's),
  the chunked loss; divided over the processes where the accelerate config shards them (FSDP,
  DeepSpeed ZeRO), not under DDP;
- `model` and `diagnose`: fp32 weights (and diagnose's logits).
A stage's peak is the largest sum over its phases (prefill / decode; forward / backward /
optimizer step). A stage that does not fit its device (one GPU's memory, or RAM for what runs
on the CPU) names the param to change and the largest value that fits.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from tasks.core import paths
from tasks.core.config import EMBEDDED_MODEL
from tasks.core.shapes import BYTES, ModelShape

GiB = 1024 ** 3

# What a process holds before any tensor. In RAM, the libraries it imports: measured as ru_maxrss
# after the imports (this project's 2-core machine, torch 2.13, transformers 5.25; docs/results/training.md):
# torch + transformers 0.24 GiB (decoding, model, diagnose); the train stage with TRL's
# SFTTrainer, datasets, accelerate and peft 0.44 GiB. On a GPU, the CUDA context and cuBLAS
# workspace: about 0.5 GiB (typical for recent torch on H100-class GPUs; not measured here).
RUNTIME = {"cpu": 0.24 * GiB, "cpu-train": 0.44 * GiB, "gpu": 0.5 * GiB}
LOSS_CHUNK = 256  # tasks/training/sft.py LOSS_CHUNK (tests/test_plan.py checks the two agree)
CHECKPOINTS_KEPT = 2  # tasks/training/sft.py training_args: save_total_limit
PREFILL_TOKENS = 2048  # the continuous backends prefill in ~2k-token forwards (docs/sampling.md)
TEXT_BYTES_PER_TOKEN = 4  # JSONL text: ~4 characters per token of code
HUMANEVAL_PROBLEMS = 164
CODEIO_PROBLEMS_AT_MOST = 3240  # distinct problems in reasoning-gym's CodeIO files (SSD-NOTES)
SMOLLM2 = 134_515_008  # parameters of the model every throughput below was measured on
# RSS over live tensors of the default train@ssd-none on CPU (docs/results/training.md): the stage's peak RSS
# 3.55 GiB against its live peak 2.94 GiB (every tensor over 128 KiB mmapped), despite the per-layer
# malloc_trim: freed pages glibc keeps. GPU stages count no allocator overhead (not measured).
CPU_HEAP_RETAINED = 3.55 / 2.94 - 1


@dataclass(frozen=True)
class Rate:
    """A measured throughput (tokens/s). CPU rates were bound by compute: scaled to the planned
    model by its active parameters and to the machine by its cores. The GPU rates were measured
    on SmolLM2-135M, bound by per-step overhead, not compute: taken as they are (no GPU
    measurement of a larger model yet); `--sample-tps` / `--train-tps` state your own."""

    tokens_per_s: float
    source: str
    parameters: int | None = None  # scale by parameters measured / planned (compute-bound)
    cores: int | None = None  # scale by cores planned / measured

    def for_model(self, active_parameters: int, cores: int) -> float:
        rate = self.tokens_per_s
        if self.parameters:
            rate *= self.parameters / active_parameters
        if self.cores:
            rate *= cores / self.cores
        return rate


_CPU_BENCH = "docs/results/sampling.md: SmolLM2-135M, 2 CPU cores, 2026-11-28"
RATES = {
    ("cpu", "continuous-int8"): Rate(835.8, "docs/results/sampling.md: SmolLM2-135M, 2 CPU cores with AMX, 2026-12-07 "
                                            "(454.5 on 2026-11-28, before the AMX kernels)", SMOLLM2, 2),
    ("cpu", "continuous"): Rate(263.3, _CPU_BENCH, SMOLLM2, 2),
    ("cpu", "transformers"): Rate(76.8, _CPU_BENCH, SMOLLM2, 2),
    ("cpu", "ctranslate2"): Rate(94.0, "docs/results/sampling.md: CTranslate2 int8, batch 32, SmolLM2-135M, 2 CPU "
                                       "cores (ctranslate2-float32: not measured, this rate)", SMOLLM2, 2),
    ("gpu", "transformers"): Rate(2100.0, "SSD-NOTES: SmolLM2-135M on one H200, three jobs sharing it, 2026-11-28 "
                                          "(vllm: not measured, this rate)"),
    ("cpu", "train"): Rate(62.0, "docs/results/training.md: the stage as shipped, answer tokens/s, SmolLM2-135M, 2 CPU "
                                 "cores", SMOLLM2, 2),
    ("gpu", "train"): Rate(8500.0, "SSD-NOTES: answer tokens/s, SmolLM2-135M on one H200"),
}
RATES[("cpu", "ctranslate2-float32")] = RATES[("cpu", "ctranslate2")]
RATES[("gpu", "vllm")] = RATES[("gpu", "transformers")]
# Sandboxed programs checked per second per core: ~1,400/s on 16 cores (SSD-NOTES, the H200 machine).
PROGRAMS_PER_S_PER_CORE = 1400 / 16
GPU_BACKENDS = ("transformers", "vllm")  # the others run on the CPU even where a GPU exists


@dataclass(frozen=True)
class Machine:
    gpu: float | None  # bytes of one GPU's memory; None: no GPU, every stage on the CPU
    ram: float  # bytes
    cores: int


@dataclass(frozen=True)
class Part:
    label: str
    bytes: float
    phases: tuple[str, ...] = ()  # the phases it is held in; (): all of them


@dataclass(frozen=True)
class Disk:
    label: str
    bytes: float
    transient: bool = False  # removed when the stage has finished


@dataclass
class StagePlan:
    stages: list[str]  # the DVC stages it stands for, each costing the same
    device: str  # "gpu" or "cpu": whose memory it must fit
    engine: str
    work: list[str]
    memory: list[Part]
    disk: list[Disk]  # what it writes
    seconds: float | None = None  # per stage; None: a count is not known yet
    rate: str = ""  # the throughput the time assumes, and where it was measured
    fix: str = ""  # when it does not fit: the param to change
    share: float = 1.0  # of the device's memory it may take (vLLM: gpu_memory_utilization)
    notes: list[str] = field(default_factory=list)

    def peak(self) -> tuple[float, str]:
        """The largest sum over the stage's phases, and that phase ("" with one phase)."""
        phases = sorted({p for part in self.memory for p in part.phases}) or [""]
        sums = {phase: sum(part.bytes for part in self.memory if not part.phases or phase in part.phases)
                for phase in phases}
        phase = max(sums, key=sums.get)
        return sums[phase], phase

    def budget(self, machine: Machine) -> float:
        return (machine.gpu if self.device == "gpu" else machine.ram) * self.share

    def fits(self, machine: Machine) -> bool:
        return self.peak()[0] <= self.budget(machine)


# --- the counts: how many problems each set will have (tasks/prepare.py's split, without data) ---

def source_ids(source: str, workspace: Path) -> list[str] | None:
    """The task_ids of a source's problems where its file is here (CodeIO: every problem of the
    `codeio` stage's catalog it did not drop, the unconverted ones counted as kept: an upper
    bound), else None."""
    from tasks.core.files import iter_jsonl
    from tasks.core.problems import humaneval_path

    catalog = workspace / paths.CODEIO_CATALOG
    if source == "codeio" and catalog.is_file():
        return [row["task_id"] for _, row in iter_jsonl(catalog) if row.get("status") != "dropped"]
    file = humaneval_path() if source == "humaneval" else workspace / (
        paths.CODEIO_PROBLEMS if source == "codeio" else source)
    if not file.is_file():
        return None
    return [row.get("task_id") for _, row in iter_jsonl(file)]


def source_size(source: str, params, workspace: Path) -> int | None:
    """Problems a source holds: counted where its file is here, else what is known of it."""
    if source == "humaneval":
        return HUMANEVAL_PROBLEMS
    ids = source_ids(source, workspace)
    if ids is not None:
        return len(ids)
    if source == "codeio":
        return params.codeio.max_problems or CODEIO_PROBLEMS_AT_MOST
    return None  # a problems file not made yet


def held_out_count(source: str, size: int, data, workspace: Path) -> int:
    """Problems the split holds out of `source` (tasks/core/problems.py's split_problems): counted
    by is_held_out where the task_ids are here, else the expected share."""
    from tasks.core.problems import is_held_out

    ids = source_ids(source, workspace)
    if ids is None:
        return max(1, round(size * data.eval_fraction))
    return max(1, sum(is_held_out(str(t), data.eval_fraction, data.split_seed) for t in ids))


def _cut(pool: int | None, max_problems: int) -> int | None:
    if pool is None:
        return max_problems or None
    return min(pool, max_problems) if max_problems else pool


def problem_counts(params, workspace: Path) -> dict:
    """Train, validation, each eval set's and diagnose's problems as `prepare` would cut them;
    None where a source's file is not here and its max_problems is 0 (all)."""
    data = params.data
    pools = {s: source_size(s, params, workspace)
             for s in dict.fromkeys([data.train.source, data.validation.source, *(e.source for e in data.eval)])}
    for_eval = dict(pools)
    for_train = pools[data.train.source]
    if any(e.source == data.train.source for e in data.eval) and for_train is not None:
        held_out = held_out_count(data.train.source, for_train, data, workspace)
        for_train, for_eval[data.train.source] = for_train - held_out, held_out
    from_train = data.validation.source == data.train.source
    validation = _cut(for_train if from_train else for_eval[data.validation.source], data.validation.max_problems)
    if from_train and for_train is not None:
        for_train -= validation or 0
    elif not from_train and for_eval[data.validation.source] is not None:
        for_eval[data.validation.source] -= validation or 0
    evals = {e.name: _cut(for_eval[e.source], e.max_problems) for e in data.eval}
    return {"train": _cut(for_train, data.train.max_problems), "validation": validation, "eval": evals,
            "diagnose": _cut(evals[params.diagnose.eval_set], params.diagnose.max_problems)}


# --- memory of each kind of stage ---

def runtime(device: str, training: bool = False) -> Part:
    if device == "gpu":
        return Part("runtime: the CUDA context", RUNTIME["gpu"])
    return Part("runtime: the libraries imported", RUNTIME["cpu-train" if training else "cpu"])


def decoding_memory(backend: str, at_once: int, prompt: int, new: int, shape: ModelShape, device: str,
                    tensor_parallel: int = 1) -> list[Part]:
    """A decoding stage's memory with `at_once` sequences decoded together, as the backend holds them
    (vllm: per GPU, the engine's own needs; its KV pool is the rest of its share)."""
    P, vocab, kv = shape.parameters(), shape.vocab, shape.kv_bytes_per_token
    longest = prompt + new
    width = shape.mlp_width()
    parts = [runtime(device)]
    if backend == "transformers":  # tasks/sampling/backend_transformers.py: bf16, prompts left-padded
        parts += [
            Part("weights, bf16", 2 * P),
            Part(f"KV cache, bf16: {at_once} x {prompt:,} prompt tokens", at_once * prompt * kv(2), ("prefill",)),
            Part(f"prefill MLP activations of one layer, bf16: {at_once} x {prompt:,} x {width:,} x 3",
                 at_once * prompt * width * 3 * 2, ("prefill",)),
            Part(f"prefill logits at the last position only (logits_to_keep=1): {at_once} x {vocab:,}, bf16 and fp32",
                 at_once * vocab * (2 + 4), ("prefill",)),
            Part(f"KV cache, bf16: {at_once} sequences x {longest:,} tokens", at_once * longest * kv(2), ("decode",)),
            Part("decode step: fp32 logits, warped, probabilities", at_once * vocab * 4 * 3, ("decode",))]
    elif backend.startswith("continuous"):  # tasks/sampling/backend_continuous.py, on the CPU
        if backend == "continuous-int8":  # loaded in fp32, then its linears quantized to int8
            parts += [Part("weights as loaded, fp32", 4 * P, ("load",)),
                      Part("weights, int8 linears (fp32 embedding)", (P - shape.embedding()) + 4 * shape.embedding(),
                           ("decode",))]
        else:
            parts.append(Part("weights, bf16", 2 * P))
        parts += [Part(f"KV cache, bf16: {at_once} slots x {longest:,} tokens", at_once * longest * kv(2), ("decode",)),
                  Part(f"prefill: {PREFILL_TOKENS:,}-token forwards, MLP activations, fp32",
                       PREFILL_TOKENS * width * 3 * 4, ("decode",))]
    elif backend.startswith("ctranslate2"):  # CTranslate2 on the CPU, computing in fp32
        parts += [Part("weights, " + ("fp32" if backend.endswith("float32") else "int8"),
                       (4 if backend.endswith("float32") else 1) * P),
                  Part(f"KV cache, fp32: {at_once} x {longest:,} tokens", at_once * longest * kv(4))]
    elif backend == "vllm":  # one request at max_model_len (the longest prompt + max_new_tokens) must fit
        split = f" / {tensor_parallel} GPUs" if tensor_parallel > 1 else ""
        parts += [Part(f"weights, bf16{split}", 2 * P / tensor_parallel),
                  Part(f"KV cache of one request at max_model_len {longest:,}, bf16{split}",
                       longest * kv(2) / tensor_parallel)]
    return parts


def lora_parameters(shape: ModelShape, rank: int) -> int:
    """LoRA adapters (r x (in + out)) on every linear of every layer (peft's "all-linear")."""
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    attention = (shape.hidden + q) * 2 + (shape.hidden + kv) * 2
    experts = shape.experts or 1
    mlp = experts * 3 * (shape.hidden + (shape.expert_intermediate if shape.experts else shape.intermediate))
    return rank * shape.layers * (attention + mlp)


def layer_activation_bytes(shape: ModelShape) -> int:
    """What one token leaves saved for backward in one decoder layer under bf16 autocast: the two
    RMSNorms' fp32 input and output (16 h), the bf16 inputs of q, k, v, gate and up (10 h);
    q and k around RoPE, v, the attention output and o's input (2 (4 H + 3 K) d); the MLP's gate,
    up, gated product and down's input (8 i)."""
    h, d, H, K = shape.hidden, shape.head_dim, shape.heads, shape.kv_heads
    return 26 * h + 2 * (4 * H + 3 * K) * d + 8 * shape.mlp_width()


def accelerate_layout(path: str, workspace: Path) -> tuple[int, frozenset[str], str]:
    """(processes, what each process keeps only a share of, a description) for train.accelerate."""
    import yaml

    if not path:
        return 1, frozenset(), "one process"
    file = workspace / path
    if not file.is_file():
        return 1, frozenset(), f"train.accelerate={path} is not there: planned as one process"
    config = yaml.safe_load(file.read_text()) or {}
    processes = int(config.get("num_processes") or 1)
    kind = str(config.get("distributed_type", "NO")).upper()
    everything = frozenset({"weights", "gradients", "optimizer"})
    if kind == "FSDP":
        fsdp = config.get("fsdp_config") or {}
        if str(fsdp.get("fsdp_version", 1)) == "2":
            full = fsdp.get("fsdp_reshard_after_forward", True) is not False
        else:
            full = str(fsdp.get("fsdp_sharding_strategy", "FULL_SHARD")).upper() in ("1", "FULL_SHARD", "HYBRID_SHARD", "4")
        no_shard = str(fsdp.get("fsdp_sharding_strategy", "")).upper() in ("3", "NO_SHARD")
        sharded = frozenset() if no_shard else everything if full else frozenset({"gradients", "optimizer"})
        return processes, sharded, f"FSDP over {processes} processes"
    if kind == "DEEPSPEED":
        stage = int((config.get("deepspeed_config") or {}).get("zero_stage", 0))
        sharded = [frozenset(), frozenset({"optimizer"}), frozenset({"gradients", "optimizer"}), everything][stage]
        return processes, sharded, f"DeepSpeed ZeRO-{stage} over {processes} processes"
    return processes, frozenset(), f"{kind} over {processes} processes (each holds everything)"


def training_memory(cfg, shape: ModelShape, micro_batch: int, length: int, device: str,
                    processes: int = 1, sharded: frozenset = frozenset()) -> list[Part]:
    """One training process's memory (tasks/training/sft.py under transformers' Trainer), by phase:
    the model's forward (under accelerate's bf16 autocast, which wraps only the model's forward),
    the loss after it (outside autocast: in fp32), backward, the optimizer step."""
    P = shape.parameters()
    trainable = P if cfg.method == "full" else lora_parameters(shape, cfg.lora_r)

    def share(what: str) -> int:
        return processes if what in sharded else 1

    tokens = micro_batch * length
    h, vocab = shape.hidden, shape.vocab
    parts = [Part("weights, fp32", 4 * P / share("weights")),
             Part("gradients, fp32" + ("" if cfg.method == "full" else " (LoRA adapters)"),
                  4 * trainable / share("gradients")),
             Part("AdamW's two moments, fp32", 8 * trainable / share("optimizer"))]
    if cfg.bf16 and cfg.method == "full":  # autocast caches its casts of leaf weights that require grad
        parts.append(Part("bf16 copies of the weights autocast keeps until the forward returns",
                          2 * P / share("weights"), ("forward",)))
    if cfg.gradient_checkpointing:
        parts += [Part(f"activation checkpoints, fp32: {shape.layers} layers x {tokens:,} tokens x {h:,}",
                       shape.layers * tokens * h * 4, ("forward", "loss", "backward")),
                  Part(f"one layer recomputed and its gradients: {tokens:,} tokens",
                       2 * tokens * layer_activation_bytes(shape), ("backward",))]
    else:
        parts.append(Part(f"activations: {shape.layers} layers x {tokens:,} tokens",
                          shape.layers * tokens * layer_activation_bytes(shape), ("forward", "loss", "backward")))
    if cfg.lean_loss:  # LinearCrossEntropy, in fp32 (the weights' dtype) outside autocast
        head = 2 * 4 * vocab * h if cfg.method == "full" else 0  # a frozen head (LoRA) gets no gradient
        parts += [Part("loss: the LM head's fp32 gradient and one chunk's product", head, ("loss",)),
                  Part(f"loss: one {LOSS_CHUNK}-token chunk's fp32 logits", LOSS_CHUNK * vocab * 4, ("loss",)),
                  Part("loss: answer positions' hidden states and their gradient, fp32", 2 * tokens * h * 4,
                       ("loss",))]
    else:  # every position's logits: bf16 from the forward, then fp32 and their gradient
        parts += [Part(f"logits, bf16: {tokens:,} x {vocab:,}", tokens * vocab * 2, ("forward", "loss")),
                  Part(f"logits in fp32 and their gradient: {tokens:,} x {vocab:,}", tokens * vocab * 8, ("loss",))]
    if device == "gpu":  # torch's foreach AdamW (its default on CUDA) holds a moment-sized temporary
        parts.append(Part("optimizer step: AdamW's foreach temporary, fp32", 4 * trainable / share("optimizer"),
                          ("step",)))
    else:  # one parameter at a time: temporaries the size of the largest (the embedding)
        parts.append(Part("optimizer step: AdamW's temporaries for the largest parameter, fp32",
                          2 * 4 * shape.embedding(), ("step",)))
    if device == "cpu":  # glibc keeps freed heap pages in RSS
        parts.append(Part(f"heap glibc keeps beyond the live tensors (+{CPU_HEAP_RETAINED:.0%})",
                          CPU_HEAP_RETAINED * sum_peak(parts)))
    return [runtime(device, training=True)] + parts


# --- disk ---

def dvc_cache_type(workspace: Path) -> str:
    """cache.type from the workspace's .dvc/config.local or .dvc/config; DVC's default otherwise."""
    for name in ("config.local", "config"):
        file = workspace / ".dvc" / name
        section = None
        if file.is_file():
            for line in file.read_text().splitlines():
                header = re.match(r"\s*\[\s*'?\"?([^\]'\"]+)", line)
                if header:
                    section = header.group(1).strip()
                    continue
                setting = re.match(r"\s*type\s*=\s*(\S.*)", line)
                if section == "cache" and setting:
                    return setting.group(1).strip()
    return "reflink,copy"


def cache_copies(cache_type: str) -> int:
    """Extra copies DVC keeps of a cached output: none where the list names a hardlink or symlink
    (DVC takes the first type that works), one where it can only copy (a reflink shares blocks
    only on filesystems that have them: counted as a copy)."""
    return 0 if {t.strip() for t in cache_type.split(",")} & {"hardlink", "symlink"} else 1


# --- the plan ---

def at_most(n: int | None) -> str:
    return "?" if n is None else f"{n:,}"


def _product(*factors: int | None) -> int | None:
    return None if any(f is None for f in factors) else math.prod(factors)


def plan(params, shape: ModelShape, machine: Machine, prompt_tokens: int = 1024, workspace: str | Path = ".",
         sample_tps: float | None = None, train_tps: float | None = None) -> list[StagePlan]:
    """Every stage kind of the DAG with its work, memory, disk and time (per stage)."""
    workspace = Path(workspace)
    counts = problem_counts(params, workspace)
    copies = cache_copies(dvc_cache_type(workspace))
    gpu = machine.gpu is not None
    P, active = shape.parameters(), shape.parameters(active=True)
    arms = list(params.arms)

    def rate(device: str, what: str, stated: float | None) -> tuple[float | None, str]:
        if stated:
            return stated, f"{stated:,.0f} tokens/s (stated)"
        measured = RATES.get((device, what))
        if measured is None:
            return None, f"no measured rate for {what} on a {device.upper()}"
        tps = measured.for_model(active, machine.cores)
        scaled = f", scaled to {active / 1e9:.2f}B active parameters and {machine.cores} cores" if measured.parameters else ""
        return tps, f"{tps:,.0f} tokens/s (measured {measured.tokens_per_s:,.0f}: {measured.source}{scaled})"

    def decoding(prefix: str, cfg, names: list[str], sequences: int | None, per_model: str) -> StagePlan:
        device = "gpu" if gpu and cfg.backend in GPU_BACKENDS else "cpu"
        longest = prompt_tokens + cfg.max_new_tokens
        tp = params.vllm.tensor_parallel_size if cfg.backend == "vllm" else 1
        if cfg.backend.startswith("continuous"):
            at_once = min(cfg.slots, cfg.batch_size)
        elif cfg.backend == "transformers" and cfg.max_batch_tokens:  # sub-batches of rows x longest <= it
            at_once = max(1, min(cfg.batch_size, cfg.max_batch_tokens // longest))
        else:
            at_once = cfg.batch_size
        tokens = _product(sequences, cfg.max_new_tokens)
        tps, source = rate(device, cfg.backend, sample_tps)
        stage = StagePlan(names, device, f"backend {cfg.backend} on the {device.upper()}",
                          [per_model, f"tokens to decode: at most {at_most(tokens)} ({at_most(sequences)} x "
                                      f"{cfg.max_new_tokens:,} max_new_tokens)"],
                          decoding_memory(cfg.backend, at_once, prompt_tokens, cfg.max_new_tokens, shape, device, tp),
                          [], None if tokens is None or tps is None else tokens / tps, source)
        if cfg.backend == "vllm":
            stage.share = params.vllm.gpu_memory_utilization
            if not gpu:
                stage.memory.append(Part("no GPU: vllm runs on GPUs only", math.inf))
                stage.fix = f"{prefix}.backend: a CPU backend (continuous-int8), or plan with --gpu-memory"
                return stage
            pool = stage.budget(machine) - stage.peak()[0]
            per_sequence = longest * shape.kv_bytes_per_token(2) / tp
            stage.notes.append(f"vLLM's KV pool, the rest of vllm.gpu_memory_utilization {stage.share:g} of the GPU: "
                               f"{max(pool, 0) / GiB:.1f} GiB, {max(int(pool // per_sequence), 0)} sequences of "
                               f"{longest:,} tokens at once")
            stage.fix = ("vllm.gpu_memory_utilization higher, vllm.tensor_parallel_size (GPUs per engine), "
                         f"or {prefix}.max_new_tokens lower")
        elif not stage.fits(machine):
            fitting = max((n for n in _downward(at_once)
                           if sum_peak(decoding_memory(cfg.backend, n, prompt_tokens, cfg.max_new_tokens, shape,
                                                       device)) <= stage.budget(machine)), default=0)
            if not fitting:
                stage.fix = f"{prefix}.backend or model.base: the weights alone do not fit"
            elif cfg.backend == "transformers":
                stage.fix = (f"{prefix}.max_batch_tokens: {fitting * longest} or less ({fitting} sequences of "
                             f"{longest:,} tokens at once; or {prefix}.batch_size: {fitting})")
            else:
                stage.fix = f"{prefix}.{'slots' if cfg.backend.startswith('continuous') else 'batch_size'}: {fitting} or less"
        return stage

    plans = []
    # model: the base as an fp32 HF dir (tasks/model.py loads it in fp32 on the CPU)
    hub = [] if params.model.base == EMBEDDED_MODEL or (workspace / params.model.base).is_dir() else [
        Disk(f"Hugging Face cache: the weights at {shape.dtype}", P * BYTES.get(shape.dtype, 4))]
    plans.append(StagePlan(
        ["model"], "cpu", "transformers, fp32, on the CPU", [f"{params.model.base}: {P / 1e9:.2f}B parameters"],
        [runtime("cpu"), Part("weights, fp32", 4 * P)],
        hub + [Disk("models/base, fp32, and its DVC cache copy", (1 + copies) * 4 * P)],
        fix="model.base: a smaller model (the model stage loads it in fp32 in RAM)"))

    sample, train_problems = params.sample, counts["train"]
    samples = _product(train_problems, sample.n)
    if sample.shards == 1:
        for_config, per_stage, work = [f"sample@{name}" for name in sample.configs], samples, ""
    else:  # shard i decodes the batches b % shards == i of the config's plan; the merge writes them again
        for_config = [f"sample-shard@{name}-{i}" for name in sample.configs for i in range(sample.shards)]
        batches = None if samples is None else math.ceil(samples / sample.batch_size)
        per_stage = None if samples is None else min(samples, math.ceil(batches / sample.shards) * sample.batch_size)
        work = f"; in sample.shards {sample.shards} shards of at most {at_most(per_stage)} each"
    stage = decoding("sample", sample, for_config, per_stage,
                     f"problems x samples: at most {at_most(train_problems)} train prompts x {sample.n} = "
                     f"{at_most(samples)}{work}")
    row_bytes = (prompt_tokens + 2 * sample.max_new_tokens) * TEXT_BYTES_PER_TOKEN
    stage.disk = [Disk("samples/<config>/samples.jsonl and its DVC cache copy" if sample.shards == 1 else
                       "samples/<config>/shards/<i>.jsonl and its DVC cache copy",
                       (1 + copies) * (per_stage or 0) * row_bytes)]
    if sample.shards > 1 and batches is not None and batches < sample.shards:
        stage.notes.append(f"{batches} batch(es) of sample.batch_size {sample.batch_size} for {sample.shards} shards: "
                           f"{sample.shards - batches} shard(s) get none (lower sample.batch_size or sample.shards)")
    if sample.shards > 1:
        stage.notes.append(f"sample-merge@<config> (CPU, seconds) then writes samples/<config>/samples.jsonl: "
                           f"{(1 + copies) * (samples or 0) * row_bytes / GiB:.2f} GiB more per config")
    plans.append(stage)

    cfg = params.train
    processes, sharded, layout = accelerate_layout(cfg.accelerate, workspace)
    device = "gpu" if gpu else "cpu"
    length = min(cfg.max_length, prompt_tokens + sample.max_new_tokens)
    answer = min(sample.max_new_tokens, cfg.max_length)
    answer_tokens = None if samples is None else int(samples * answer * cfg.epochs)
    steps = None if samples is None else math.ceil(
        math.ceil(samples / (cfg.micro_batch_size * processes)) / cfg.grad_accum * cfg.epochs)
    tps, source = rate(device, "train", train_tps)
    if tps and processes > 1 and not train_tps:
        tps, source = tps * processes, source + f" x {processes} processes"
    method = "full fine-tune" if cfg.method == "full" else f"LoRA r={cfg.lora_r}"
    saved_bytes = BYTES[cfg.saved_dtype]
    stage = StagePlan(
        [f"train@{arm}" for arm in arms], device, f"{method}, AdamW, {layout}, on the {device.upper()}",
        [f"samples: at most {at_most(samples)} (the filter keeps fewer); {cfg.epochs:g} epoch(s), ~{at_most(steps)} "
         f"optimizer steps of {cfg.micro_batch_size} x {cfg.grad_accum} x {processes} samples",
         f"answer tokens: at most {at_most(answer_tokens)}; micro-batch: {cfg.micro_batch_size} x {length:,} tokens "
         f"(train.max_length {cfg.max_length:,}, or the longest prompt + sample.max_new_tokens)"],
        training_memory(cfg, shape, cfg.micro_batch_size, length, device, processes, sharded),
        [Disk(f"models/<arm>, {cfg.saved_dtype}, and its DVC cache copy", (1 + copies) * saved_bytes * P),
         Disk(f"checkpoints/<arm>: {CHECKPOINTS_KEPT} kept while it trains (weights and AdamW state), removed after",
              CHECKPOINTS_KEPT * (4 * P + 8 * (P if cfg.method == "full" else lora_parameters(shape, cfg.lora_r))),
              transient=True)],
        None if answer_tokens is None or tps is None else answer_tokens / tps, source)
    if cfg.lean_loss and sharded:
        stage.notes.append("train.lean_loss: the stage refuses it under FSDP / DeepSpeed: set train.lean_loss: false")
    if not stage.fits(machine):
        fitting = max((n for n in _downward(cfg.micro_batch_size)
                       if sum_peak(training_memory(cfg, shape, n, length, device, processes, sharded))
                       <= stage.budget(machine)), default=0)
        stage.fix = (f"train.micro_batch_size: {fitting} or less (train.grad_accum "
                     f"{math.ceil(cfg.micro_batch_size * cfg.grad_accum / fitting)} keeps the batch)" if fitting else
                     "train.gradient_checkpointing: true" if not cfg.gradient_checkpointing else
                     "train.max_length, train.method: lora, or train.accelerate (shard over GPUs)")
    plans.append(stage)

    ev, n_sweep = params.evaluate, max(len(params.evaluate.sweep), 1)
    validation = _product(counts["validation"], n_sweep, ev.n)
    tested = [_product(n, ev.n, ev.repeats) for n in counts["eval"].values()]
    decoded = None if validation is None or None in tested else validation + sum(tested)
    models = params.evaluated()
    if ev.shards == 1:
        for_model, per_stage, work = [f"evaluate@{m}" for m in models], decoded, ""
    else:  # shard i of each part decodes the batches b % shards == i of each of its passes; the merge joins them
        def shard_share(samples: int) -> int:
            return min(samples, math.ceil(math.ceil(samples / ev.batch_size) / ev.shards) * ev.batch_size)
        for_model = [f"evaluate-{part}@{m}-{i}" for m in models for part in ("validation", "test")
                     for i in range(ev.shards)]
        test_pass = None if None in tested else sum(tested) // ev.repeats
        per_stage = None if decoded is None else max(shard_share(validation) if ev.sweep else 0,
                                                     ev.repeats * shard_share(test_pass))
        work = f"; in evaluate.shards {ev.shards} shards per part of at most {at_most(per_stage)} each"
    stage = decoding("evaluate", ev, for_model, per_stage,
                     f"samples per model: {at_most(counts['validation'])} validation x {n_sweep} T_eval x {ev.n}"
                     + "".join(f" + {name} {at_most(n)} x {ev.n} x {ev.repeats}" for name, n in counts["eval"].items())
                     + f" = {at_most(decoded)}{work}")
    if ev.shards > 1:
        stage.notes.append("evaluate-merge@<model> (CPU, seconds) then writes eval/<model>/samples and metrics.json")
    workers = params.sandbox.workers or machine.cores
    if decoded is not None and stage.seconds is not None:
        stage.seconds += per_stage / (PROGRAMS_PER_S_PER_CORE * workers)
        stage.rate += f"; programs checked at {PROGRAMS_PER_S_PER_CORE * workers:,.0f}/s ({workers} sandbox workers)"
    stage.notes.append(f"sandbox: {workers} programs at once, each at most {params.sandbox.memory_mb:,} MiB of address "
                       "space, in RAM")
    stage.disk = [Disk("eval/<model>/samples and the DVC cache copy" + (" (of the sets counted)" if decoded is None else ""),
                       (1 + copies) * ((validation or 0) + sum(t or 0 for t in tested))
                       * (prompt_tokens + 2 * ev.max_new_tokens) * TEXT_BYTES_PER_TOKEN)]
    plans.append(stage)

    # diagnose: each reference solution teacher-forced once, fp32 model, full logits (tasks/diagnose.py)
    sequence = prompt_tokens + ev.max_new_tokens
    plans.append(StagePlan(
        ["diagnose-base", *(f"diagnose@{arm}" for arm in arms)], device, f"fp32 forward on the {device.upper()}",
        [f"{at_most(counts['diagnose'])} reference solutions of {params.diagnose.eval_set}, one forward each"],
        [runtime(device), Part("weights, fp32", 4 * P),
         Part(f"logits and their statistics, fp32: {sequence:,} positions x {shape.vocab:,} x 4", sequence * shape.vocab * 16)],
        [], fix="model.base (diagnose runs the model in fp32)"))

    # publish: release/<arm> hard-links models/<arm>; DVC stores it as cache.type says
    plans.append(StagePlan([f"publish@{arm}" for arm in arms], "cpu", "files", ["weights hard-linked from models/<arm>"],
                           [], [Disk("release/<arm> beyond models/<arm>: a copy where DVC copies",
                                     copies * BYTES[params.train.saved_dtype] * P)]))
    return plans


def _downward(n: int) -> range:
    """n and every value below it, largest first: where to look for the largest that fits."""
    return range(n, 0, -1)


def sum_peak(parts: list[Part]) -> float:
    return StagePlan([], "", "", [], parts, []).peak()[0]


def refusals(plans: list[StagePlan], machine: Machine) -> list[str]:
    """One line per stage kind that does not fit its device, naming the param to change."""
    lines = []
    for stage in plans:
        if not stage.memory or stage.fits(machine):
            continue
        need, _ = stage.peak()
        where = "GPU memory" if stage.device == "gpu" else "RAM"
        share = f" ({stage.share:g} of {machine.gpu / GiB:.1f})" if stage.share < 1 else ""
        lines.append(f"{', '.join(stage.stages)}: needs {need / GiB:,.1f} GiB of {where}, "
                     f"{stage.budget(machine) / GiB:,.1f} GiB there{share}: set {stage.fix}")
    return lines


def total_seconds(plans: list[StagePlan]) -> tuple[float, bool]:
    """Every stage's time summed, and whether every one was known."""
    known = [s for s in plans if s.seconds is not None]
    timed = [s for s in plans if s.rate]
    return sum(s.seconds * len(s.stages) for s in known), len(known) == len(timed)


def total_disk(plans: list[StagePlan]) -> float:
    """What the whole run keeps, plus the largest transient (one arm's training checkpoints: the
    stages run one at a time)."""
    kept = sum(d.bytes * len(s.stages) for s in plans for d in s.disk if not d.transient)
    return kept + max((d.bytes for s in plans for d in s.disk if d.transient), default=0)
