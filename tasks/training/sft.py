"""Plain SFT on TRL's SFTTrainer (transformers Trainer + accelerate underneath), answer tokens only.

What this adds to TRL's defaults, and why:
- Packing per micro-batch: the micro-batch's examples are concatenated into rows of at most
  `train.pack_tokens` tokens (first fit, longest first; 0: all in one row), with position ids
  restarting at 0 for each example and no attention mask; a shorter row is filled with a pad
  block that is its own "example". transformers (>= 5) reads that layout as packed sequences
  and builds a block-diagonal causal mask (sdpa, eager) or varlen attention (flash-attention),
  so no token attends across examples: the loss equals the unpacked, padded micro-batch's
  (tests/test_training.py). Packing per micro-batch, not over the dataset, keeps the seeded
  order of examples and the number of optimizer steps. The row cap matters on CPU, where the
  block-diagonal mask is applied densely: attention costs the square of the row's length.
- A lean loss: the model's LM head runs only at the positions whose next token is an answer
  token (`logits_to_keep` with those indices), so neither the prompt's logits nor a
  [tokens x vocab] fp32 tensor for them is ever built; cross-entropy is summed and divided by
  the step's answer tokens across micro-batches and processes (every answer token weighs the same).
- Resume only from a checkpoint of the same run: the checkpoint dir holds the run's resume key
  (tasks/core/files.py `resume_key`), and only checkpoints marked complete after their save count.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch.nn import functional as F

from tasks.core.files import DataError, atomic_path, key_differences
from tasks.core.modeling import chat_token_ids

IGNORE = -100
KEY_FILE = "resume_key.json"
COMPLETE = "complete"


def encode(tokenizer, messages: list[dict], max_length: int) -> tuple[list[int], list[int]]:
    """Token ids of the whole chat and labels that mask everything but the assistant's answer."""
    prompt = chat_token_ids(tokenizer, messages[:-1], add_generation_prompt=True)
    full = chat_token_ids(tokenizer, messages, add_generation_prompt=False)
    if full[: len(prompt)] != prompt:
        raise DataError("chat template renders the prompt differently inside the full chat")
    full = full[:max_length]
    labels = [IGNORE] * min(len(prompt), len(full)) + full[len(prompt):]
    return full, labels


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


def answer_loss_sum(model, inputs: dict, lean: bool = True) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the answer tokens of one micro-batch, and their count."""
    labels = inputs["labels"]
    target = labels[:, 1:]
    mask = target != IGNORE
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    if lean:
        # The LM head only at the columns where some row's next token is an answer token.
        keep = mask.any(0).nonzero().squeeze(-1)
        chosen = mask[:, keep]
        logits = model(**model_inputs, use_cache=False, logits_to_keep=keep).logits[chosen]
        tgt = target[:, keep][chosen]
    else:  # the pre-TRL stage's loss: every position's logits in fp32
        logits = model(**model_inputs, use_cache=False).logits[:, :-1]
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=IGNORE,
                               reduction="sum"), int(mask.sum())
    return F.cross_entropy(logits.float(), tgt, reduction="sum"), int(mask.sum())


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


def training_args(cfg, output_dir: Path):
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(output_dir), per_device_train_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=cfg.grad_accum, num_train_epochs=cfg.epochs,
        learning_rate=cfg.lr, lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr": cfg.min_lr},
        warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay, adam_beta1=cfg.beta1, adam_beta2=cfg.beta2,
        optim="adamw_torch", max_grad_norm=1.0, bf16=cfg.bf16, seed=cfg.seed, data_seed=cfg.seed,
        activation_checkpointing=cfg.gradient_checkpointing, logging_steps=1, save_strategy="steps",
        save_steps=cfg.checkpoint_every, save_total_limit=2, report_to="none", remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True}, max_length=None, packing=False, dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
    )


def build_trainer(model, tokenizer, examples: list[tuple[list[int], list[int]]], cfg, output_dir: Path):
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
                            callbacks=[_mark_complete_callback()], lean_loss=cfg.lean_loss)


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


def fit(model, tokenizer, examples, cfg, output_dir: Path, key: dict, name: str):
    """Train; returns (trainer, curve): curve rows {step, loss, lr, tokens}, resumed runs included."""
    output_dir = Path(output_dir)
    trainer = build_trainer(model, tokenizer, examples, cfg, output_dir)
    resume = find_resume(trainer, output_dir, key, name)
    if resume and trainer.is_world_process_zero():
        state = json.loads((Path(resume) / "trainer_state.json").read_text())
        print(f"{name}: resuming at step {state['global_step']}/{state['max_steps']}")
    trainer.train(resume_from_checkpoint=resume)
    curve = [{"step": h["step"], "loss": h["loss"], "lr": h["lr"], "tokens": h["tokens"]}
             for h in trainer.state.log_history if "tokens" in h and "loss" in h]
    return trainer, curve
