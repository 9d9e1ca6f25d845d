"""Plain SFT on TRL's SFTTrainer (transformers Trainer + accelerate underneath), answer tokens only.

What this adds to TRL's defaults, and why:
- Packing per micro-batch: the micro-batch's examples are concatenated into rows of at most
  `train.pack_tokens` tokens (first fit, longest first; 0: all in one row), with position ids
  restarting at 0 for each example and no attention mask; a shorter row is filled with a pad
  block that is its own "example". transformers (>= 5) reads that layout as packed sequences
  and builds a block-diagonal causal mask (sdpa, eager) or varlen attention (flash-attention),
  so no token attends across examples: the loss equals the unpacked, padded micro-batch's
  (tests/test_training.py). Packing per micro-batch, not over the dataset, keeps the seeded
  order of examples and the number of optimizer steps. The row cap bounds a row's length, and
  with it the cost of attention over a whole row (the row's length squared); with
  `packed_attention` below attention costs each example's own length squared, so it matters less.
- A lean loss: the model returns its final hidden states where its LM head would be, only at the
  positions whose next token is an answer token; `LinearCrossEntropy` then runs the LM head and
  cross-entropy over them in chunks of `LOSS_CHUNK` tokens and takes each chunk's gradient at
  once, so no [tokens x vocab] tensor outlives its chunk (Liger's fused linear cross-entropy does
  this with triton, which has no CPU backend). Cross-entropy is summed and divided by the step's
  answer tokens across micro-batches and processes (every answer token weighs the same).
- Attention per example: with packing, the model runs `packed_attention` (one causal SDPA call
  per example of a row, flash kernel, no mask) instead of SDPA over the row with transformers'
  block-diagonal mask; same loss, attention costs the examples' squared lengths, not the row's.
- The heap trimmed before each decoder layer (glibc's `malloc_trim`): on CPU, the churn of
  activations between 128 KiB and 32 MiB fragments glibc's heap, whose freed pages then count in
  RSS for the rest of the run; trimming keeps the default run's peak RSS near its live memory.
- Resume only from a checkpoint of the same run: the checkpoint dir holds the run's resume key
  (tasks/core/files.py `resume_key`), and only checkpoints marked complete after their save count.
- The curve through dvclive (`live_callback`): loss, learning rate and answer tokens per optimizer
  step, numbered by the trainer's step, refilled from the checkpoint's log history on resume.
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.nn import functional as F

from tasks.core.config import ParamsError
from tasks.core.files import DataError, atomic_path, key_differences
from tasks.core.modeling import chat_token_ids

IGNORE = -100
KEY_FILE = "resume_key.json"
COMPLETE = "complete"
LOSS_CHUNK = 256  # answer tokens per LM-head chunk: 256 x 49k vocabulary x 4 bytes = 50 MB at most


def encode(tokenizer, messages: list[dict], max_length: int, open_end: bool = False) -> tuple[list[int], list[int]]:
    """Token ids of the whole chat and labels that mask everything but the assistant's answer.

    `open_end`: the answer was cut off (at sample.max_new_tokens), so what the chat template
    appends after it (the end-of-turn token) is masked too: the model is not taught to stop
    where the sampler did."""
    prompt = chat_token_ids(tokenizer, messages[:-1], add_generation_prompt=True)
    full = chat_token_ids(tokenizer, messages, add_generation_prompt=False)
    if full[: len(prompt)] != prompt:
        raise DataError("chat template renders the prompt differently inside the full chat")
    answer = full[len(prompt):]
    if open_end:
        answer = answer[:answer_length(tokenizer, answer, messages[-1]["content"])]
    labels = [IGNORE] * len(prompt) + answer + [IGNORE] * (len(full) - len(prompt) - len(answer))
    return full[:max_length], labels[:max_length]


def answer_length(tokenizer, completion: list[int], answer: str) -> int:
    """How many tokens of `completion` (the chat's tokens after the prompt) it takes to spell
    `answer`: the fewest whose text holds all of it (without the whitespace at its ends where
    the template strips that). Past them comes what the chat template appends."""
    def spelled(n: int) -> bool:
        return text in tokenizer.decode(completion[:n], clean_up_tokenization_spaces=False)

    text = answer
    if not spelled(len(completion)):
        text = answer.strip()
    if not spelled(len(completion)):
        raise DataError("the chat template renders a cut-off answer differently, so where it ends is unknown; "
                        "set filter.truncated: drop")
    low, high = 0, len(completion)
    while low < high:  # `spelled` only turns true as n grows: bisect for the first n
        mid = (low + high) // 2
        low, high = (low, mid) if spelled(mid) else (mid + 1, high)
    return low


class Collator:
    """Micro-batch of {"input_ids", "labels"} -> model inputs: packed rows of at most
    `row_tokens` tokens (position ids restarting per example, no attention mask; 0: one row)
    or, without packing, one padded row per example with an attention mask."""

    def __init__(self, pad_id: int, pack: bool, row_tokens: int = 0):
        self.pad_id, self.pack, self.row_tokens = pad_id, pack, row_tokens

    def rows(self, features: list[dict]) -> list[list[dict]]:
        """First-fit-decreasing bins of at most `row_tokens` tokens (an example longer than
        that gets a row of its own)."""
        if not self.row_tokens:
            return [features]
        rows, sizes = [], []
        for f in sorted(features, key=lambda f: -len(f["input_ids"])):
            n = len(f["input_ids"])
            fit = next((i for i, size in enumerate(sizes) if size + n <= self.row_tokens), None)
            if fit is None:
                rows.append([f])
                sizes.append(n)
            else:
                rows[fit].append(f)
                sizes[fit] += n
        return rows

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if self.pack:
            packed = []
            for row in self.rows(features):
                ids, labels, positions = [], [], []
                for f in row:
                    ids += f["input_ids"]
                    labels += [IGNORE] + list(f["labels"][1:])  # never predict an example's first token from the previous one
                    positions += range(len(f["input_ids"]))
                packed.append((ids, labels, positions))
            width = max(len(ids) for ids, _, _ in packed)
            for ids, labels, positions in packed:
                pad = width - len(ids)  # a block of its own: positions restart, nothing to predict
                ids += [self.pad_id] * pad
                labels += [IGNORE] * pad
                positions += range(pad)
            return {"input_ids": torch.tensor([p[0] for p in packed]), "labels": torch.tensor([p[1] for p in packed]),
                    "position_ids": torch.tensor([p[2] for p in packed])}
        width = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), width), self.pad_id)
        labels = torch.full((len(features), width), IGNORE)
        attention = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[i, :n] = torch.tensor(f["input_ids"])
            labels[i, :n] = torch.tensor(f["labels"])
            attention[i, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of the logits `hidden @ weight.T` against `target`, chunk by chunk.

    Each chunk's logits are built in the compute dtype (bf16 under autocast, as the LM head
    would), turned into fp32 log-probabilities and at once into their gradient (softmax minus
    one-hot), which is multiplied out into the gradients of `hidden` and `weight` and dropped.
    Backward only scales what forward kept, so nothing is computed twice."""

    @staticmethod
    def forward(ctx, hidden, weight, target, chunk):
        kind = hidden.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else weight.dtype
        want_h, want_w = ctx.needs_input_grad[:2]
        exact = torch.promote_types(dtype, torch.float32)  # log-probabilities and sums: fp32 at least
        w = weight.to(dtype)
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=exact, device=weight.device) if want_w else None
        loss = torch.zeros((), dtype=exact, device=hidden.device)
        for start in range(0, hidden.size(0), chunk):
            h, t = hidden[start:start + chunk].to(dtype), target[start:start + chunk]
            logits = (h @ w.T).to(exact)
            lse = torch.logsumexp(logits, -1)
            loss += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if want_h or want_w:
                grad = logits.sub_(lse[:, None]).exp_()
                grad[torch.arange(len(t), device=t.device), t] -= 1
                grad = grad.to(dtype)
                if want_h:
                    grad_h[start:start + chunk] = grad @ w
                if want_w:
                    grad_w += (grad.T @ h).to(exact)
        ctx.save_for_backward(grad_h, None if grad_w is None else grad_w.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return (None if grad_h is None else grad_h * grad_loss.to(grad_h.dtype),
                None if grad_w is None else grad_w * grad_loss, None, None)


@contextmanager
def hidden_states_for_logits(model):
    """Inside: the model's LM head passes its input through, so `logits` are the final hidden
    states (the model's own forward still runs, under any DDP wrapper). Yields the head's weight."""
    inner = model
    while hasattr(inner, "module"):  # DDP and accelerate wrappers
        inner = inner.module
    head = inner.get_output_embeddings()
    wrapped = head.__dict__.get("forward")  # a hook library's instance-level forward, if any
    head.forward = lambda hidden: hidden
    try:
        yield head.weight
    finally:
        if wrapped is None:
            del head.forward
        else:
            head.forward = wrapped


PACKED_ATTENTION = "selfdistill_packed_sdpa"


def packed_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, position_ids=None,
                     **kwargs):
    """Causal attention inside each example of a packed row, one SDPA call per example.

    Registered as an attention implementation without a mask function, so transformers builds
    no [rows x L x L] block-diagonal mask; the examples are the runs of `position_ids` that
    start at 0. `is_causal` with no mask lets SDPA use its flash kernel (CPU too), whose cost
    is the sum of the squares of the examples' lengths, not the square of the row's."""
    if attention_mask is not None or position_ids is None or query.size(2) != key.size(2):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = query.size(1) // key.size(1)
    if groups > 1:
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    length = query.size(2)
    rows = []
    for b, positions in enumerate(position_ids.expand(query.size(0), -1)):
        starts = (positions == 0).nonzero().flatten().tolist()
        if not starts or starts[0] != 0:
            starts = [0] + starts
        bounds = list(zip(starts, starts[1:] + [length]))
        rows.append(torch.cat([F.scaled_dot_product_attention(
            query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e], dropout_p=dropout,
            scale=scaling, is_causal=True) for s, e in bounds], dim=2))
    return torch.cat(rows).transpose(1, 2).contiguous(), None


def transformers_model(model):
    """The transformers model itself, under a LoRA (peft) wrapper or not."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def use_packed_attention(model) -> str:
    """Switch the model to `packed_attention`; returns the implementation it had."""
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_attention)
    base = transformers_model(model)
    before = base.config._attn_implementation
    base.set_attn_implementation(PACKED_ATTENTION)
    return before


def check_against_reference(model, pad_id: int, cfg, plain_attention: str | None) -> None:
    """Once before training: the configured loss (packed rows, per-example attention, chunked LM
    head) on three short seeded examples must equal the plain one (padded rows with a mask, the
    model's own attention, full logits). A model whose forward does more than its LM head (logit
    soft-capping or scaling) or a transformers that stops passing position ids to attention would
    otherwise train on a wrong loss without a sign."""
    gen = torch.Generator().manual_seed(0)
    feats = []
    for n in (9, 6, 12):
        ids = torch.randint(0, model.config.vocab_size, (n,), generator=gen).tolist()
        feats.append({"input_ids": ids, "labels": [IGNORE] * (n // 2) + ids[n // 2:]})
    base = transformers_model(model)
    mode, configured = base.training, base.config._attn_implementation
    base.eval()
    try:
        with torch.no_grad():
            ours = answer_loss_sum(model, Collator(pad_id, cfg.packing, cfg.pack_tokens)(feats), cfg.lean_loss)[0].item()
            if plain_attention:
                base.set_attn_implementation(plain_attention)
            reference = answer_loss_sum(model, Collator(pad_id, pack=False)(feats), lean=False)[0].item()
    finally:
        base.set_attn_implementation(configured)
        base.train(mode)
    if abs(ours - reference) > 1e-3 * max(1.0, abs(reference)):
        raise ParamsError(
            f"train.packing={cfg.packing}, train.lean_loss={cfg.lean_loss}: the stage's loss on a seeded check "
            f"batch is {ours:.6f}, the plain loss {reference:.6f}: this model or transformers computes them "
            "differently (e.g. logit soft-capping); set train.lean_loss: false (or train.packing: false)")


def trim_heap_per_layer(model) -> int:
    """Hook glibc's malloc_trim before every decoder layer (forward and its recomputation in
    backward); returns how many layers were hooked (0 without glibc, e.g. macOS or musl)."""
    import ctypes
    import ctypes.util

    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return 0
    layer_classes = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]

    def before_layer(module, args):
        trim(0)  # returns None: a pre-hook's return value would replace the layer's inputs

    for layer in layers:
        layer.register_forward_pre_hook(before_layer)
    return len(layers)


def answer_loss_sum(model, inputs: dict, lean: bool = True) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the answer tokens of one micro-batch, and their count."""
    labels = inputs["labels"]
    target = labels[:, 1:]
    mask = target != IGNORE
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    if lean:
        # Hidden states only at the columns where some row's next token is an answer token.
        keep = mask.any(0).nonzero().squeeze(-1)
        chosen = mask[:, keep]
        with hidden_states_for_logits(model) as weight:
            hidden = model(**model_inputs, use_cache=False, logits_to_keep=keep).logits[chosen]
        return LinearCrossEntropy.apply(hidden, weight, target[:, keep][chosen], LOSS_CHUNK), int(mask.sum())
    # The pre-TRL stage's loss: every position's logits in fp32.
    logits = model(**model_inputs, use_cache=False).logits[:, :-1]
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=IGNORE,
                           reduction="sum"), int(mask.sum())


def _trainer_class():
    from trl import SFTTrainer

    class AnswerSFTTrainer(SFTTrainer):
        """SFTTrainer whose loss is `answer_loss_sum` over the step's answer tokens; logs the
        step's learning rate and answer-token count with its loss."""

        loss_is_scaled_for_ga = True

        def __init__(self, *args, lean_loss: bool = True, **kwargs):
            super().__init__(*args, **kwargs)
            self.lean_loss = lean_loss
            self._step_info = {"tokens": 0, "lr": 0.0}

        def _get_num_items_in_batch(self, batch_samples, device):
            n = sum((b["labels"][..., 1:] != IGNORE).sum() for b in batch_samples).to(device)
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                n = self.accelerator.gather(n).sum()
            return n

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss_sum, n = answer_loss_sum(model, inputs, self.lean_loss)
            denom = num_items_in_batch if num_items_in_batch is not None else n
            loss = loss_sum / torch.as_tensor(denom).clamp(min=1)
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes
            if model.training:
                self._step_info = {"tokens": int(denom), "lr": self.optimizer.param_groups[0]["lr"]}
            return (loss, None) if return_outputs else loss

        def log(self, logs, start_time=None):
            if "loss" in logs:
                logs = {**logs, **self._step_info}
            super().log(logs, start_time)

    return AnswerSFTTrainer


def _mark_complete_callback():
    from transformers import TrainerCallback

    class MarkComplete(TrainerCallback):
        """A checkpoint counts only once its save finished: a kill mid-save leaves no marker."""

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                (Path(args.output_dir) / f"checkpoint-{state.global_step}" / COMPLETE).write_text("")

    return MarkComplete()


# dvclive's name of each per-step curve -> the key the trainer logs it under (AnswerSFTTrainer.log).
LIVE_CURVES = {"loss": "loss", "lr": "lr", "answer_tokens": "tokens"}


def curve_rows(log_history: list[dict]) -> list[dict]:
    """The optimizer steps' rows of a trainer's log history: {step, loss, lr, tokens}."""
    return [{"step": h["step"], **{key: h[key] for key in LIVE_CURVES.values()}}
            for h in log_history if all(key in h for key in LIVE_CURVES.values())]


def live_callback(live_dir: str | Path):
    """transformers' DVCLive integration, writing dvclive's files in `live_dir`, one row per
    optimizer step, numbered by the trainer's global step.

    The stock callback numbers rows by its own counter and appends; a run resumed from a
    checkpoint older than the kill would repeat the steps after it, and under `dvc repro` the
    directory (a DVC out) is gone before the rerun. So the directory is started afresh at
    train begin and first refilled from the trainer's log history, which the checkpoint
    restores: a resumed run's curve is the uninterrupted one's. No DVC experiment is saved, no
    dvc.yaml is written (dvc.yaml declares these files), nothing is posted to DVC Studio."""
    from unittest import mock

    from transformers.integrations import DVCLiveCallback

    class StepCurves(DVCLiveCallback):
        def setup(self, args, state, model):
            from dvclive import Live

            self._initialized = True
            if state.is_world_process_zero:
                # dvclive decides once, here, whether it posts to Studio: offline, whatever DVC's config says.
                with mock.patch.dict(os.environ, {"DVC_STUDIO_OFFLINE": "true"}):
                    self.live = Live(str(live_dir), resume=False, save_dvc_exp=False, dvcyaml=None, report=None)
                for row in curve_rows(state.log_history):
                    self.log_row(row)

        def log_row(self, row: dict) -> None:
            self.live.step = row["step"]
            for name, key in LIVE_CURVES.items():
                self.live.log_metric(name, row[key])
            self.live.make_summary()

        def on_log(self, args, state, control, model=None, logs=None, **kwargs):
            if not self._initialized:
                self.setup(args, state, model)
            if state.is_world_process_zero:
                for row in curve_rows([{**logs, "step": state.global_step}]):
                    self.log_row(row)

    return StepCurves(log_model=False)


def training_args(cfg, output_dir: Path):
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(output_dir), per_device_train_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=cfg.grad_accum, num_train_epochs=cfg.epochs,
        learning_rate=cfg.lr, lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr": cfg.min_lr},
        warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay, adam_beta1=cfg.beta1, adam_beta2=cfg.beta2,
        optim="adamw_torch", max_grad_norm=1.0, bf16=cfg.bf16, seed=cfg.seed, data_seed=cfg.seed,
        gradient_checkpointing=cfg.gradient_checkpointing, logging_steps=1, save_strategy="steps",
        save_steps=cfg.checkpoint_every, save_total_limit=2, report_to="none", remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True}, max_length=None, packing=False, dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
    )


def build_trainer(model, tokenizer, examples: list[tuple[list[int], list[int]]], cfg, output_dir: Path,
                  live_dir: str | Path | None = None):
    import hashlib

    from datasets import Dataset
    from datasets.table import InMemoryTable

    columns = {"input_ids": [e[0] for e in examples], "labels": [e[1] for e in examples]}
    # Our own fingerprint: datasets would hash the table with dill, which fails on some pyarrow
    # builds ("Can't pickle <class 'MonthDayNano'>", seen with wheels installed --target).
    fingerprint = hashlib.sha256(json.dumps(columns).encode()).hexdigest()[:16]
    dataset = Dataset(InMemoryTable.from_pydict(columns), fingerprint=fingerprint)
    return _trainer_class()(model=model, args=training_args(cfg, output_dir), train_dataset=dataset,
                            processing_class=tokenizer, data_collator=Collator(tokenizer.pad_token_id, cfg.packing, cfg.pack_tokens),
                            callbacks=[_mark_complete_callback()] + ([live_callback(live_dir)] if live_dir else []),
                            lean_loss=cfg.lean_loss)


def find_resume(trainer, output_dir: Path, key: dict, name: str) -> str | None:
    """The last complete checkpoint of this run (same resume key) in `output_dir`, or None;
    another run's checkpoints are discarded with a line saying what differs."""
    main = trainer.is_world_process_zero()
    key_file = output_dir / KEY_FILE
    resume = None
    if output_dir.exists():
        recorded = json.loads(key_file.read_text()) if key_file.exists() else None
        if recorded == key:
            done = [p for p in output_dir.glob("checkpoint-*") if (p / COMPLETE).exists()]
            if done:
                resume = str(max(done, key=lambda p: int(p.name.rsplit("-", 1)[1])))
        elif any(output_dir.iterdir()):
            if main:
                print(f"{name}: discarding the checkpoint in {output_dir}: another run's "
                      f"({'; '.join(key_differences(recorded, key))})")
    trainer.accelerator.wait_for_everyone()
    if main:
        if resume is None:
            shutil.rmtree(output_dir, ignore_errors=True)
        output_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(key_file) as tmp:
            tmp.write_text(json.dumps(key, sort_keys=True))
    trainer.accelerator.wait_for_everyone()
    return resume


def learning_rates(trainer) -> list[float]:
    """The learning rate of each optimizer step the trainer will take: its own count of steps
    and its own schedule, stepped on a stand-in optimizer."""
    from transformers import get_scheduler

    import math

    args = trainer.args
    # As Trainer counts them (its helper for this is private, its signature not stable across 5.x).
    per_epoch = max(math.ceil(len(trainer.get_train_dataloader()) / args.gradient_accumulation_steps), 1)
    steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * per_epoch)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=args.learning_rate)
    schedule = get_scheduler(args.lr_scheduler_type, optimizer=optimizer, num_warmup_steps=args.get_warmup_steps(steps),
                             num_training_steps=steps, scheduler_specific_kwargs=args.lr_scheduler_kwargs)
    rates = []
    for _ in range(steps):
        rates.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    return rates


def fit(model, tokenizer, examples, cfg, output_dir: Path, key: dict, name: str, live_dir: str | Path | None = None):
    """Train; returns (trainer, curve): curve rows {step, loss, lr, tokens}, resumed runs included.
    With `live_dir`, dvclive writes the curve there as it trains (`live_callback`)."""
    output_dir = Path(output_dir)
    sharded = [v for v in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED") if os.environ.get(v, "").lower() == "true"]
    if cfg.lean_loss and sharded:
        raise ParamsError(f"train.lean_loss: the chunked loss reads the LM head's whole weight, which this accelerate "
                          f"config shards ({sharded[0]}=true); set train.lean_loss: false for it")
    attention = use_packed_attention(model) if cfg.packing else None
    check_against_reference(model, tokenizer.pad_token_id, cfg, attention)
    if not torch.cuda.is_available():
        trim_heap_per_layer(model)
    trainer = build_trainer(model, tokenizer, examples, cfg, output_dir, live_dir)
    rates = learning_rates(trainer)
    if not any(rates):  # linear warm-up starts at 0: a run no longer than it never moves the weights
        raise ParamsError(f"train.warmup_steps={cfg.warmup_steps}: none of the run's {len(rates)} optimizer steps "
                          f"({len(examples)} samples, train.micro_batch_size={cfg.micro_batch_size} x "
                          f"train.grad_accum={cfg.grad_accum}, train.epochs={cfg.epochs:g}) has a learning rate "
                          "above 0; lower train.warmup_steps or train more steps")
    resume = find_resume(trainer, output_dir, key, name)
    if resume and trainer.is_world_process_zero():
        state = json.loads((Path(resume) / "trainer_state.json").read_text())
        print(f"{name}: resuming at step {state['global_step']}/{state['max_steps']}")
    trainer.train(resume_from_checkpoint=resume)
    if attention:  # the saved model names the implementation it was loaded with
        transformers_model(model).set_attn_implementation(attention)
    return trainer, curve_rows(trainer.state.log_history)
