"""Stage `train`: plain SFT of the base model on one filter arm's samples.

Cross-entropy on the assistant tokens only, AdamW, cosine schedule with linear warm-up,
gradient accumulation, bf16 autocast, full fine-tune (or LoRA with `train.method: lora`).
Checkpoints go to checkpoints/<arm>/ (not a DVC out, so it survives DVC clearing outs) and
a rerun with the same data and params resumes from there.

Outputs: models/<arm>/ (safetensors, tokenizer, generation_config.json carrying the
evaluation decoding settings, README.md model card) and plots/train/<arm>.csv.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from tasks.core import paths
from tasks.core.config import FILTER_ARMS, load_params, run_stage
from tasks.core.files import (DataError, atomic_path, dir_sha256, file_sha256, key_differences, read_jsonl,
                              resume_key, write_text)
from tasks.core.modeling import chat_token_ids, device, load_pretrained, use_all_cores

IGNORE = -100


def encode(tokenizer, messages: list[dict], max_length: int) -> tuple[list[int], list[int]]:
    """Token ids of the whole chat and labels that mask everything but the assistant's answer."""
    prompt = chat_token_ids(tokenizer, messages[:-1], add_generation_prompt=True)
    full = chat_token_ids(tokenizer, messages, add_generation_prompt=False)
    if full[: len(prompt)] != prompt:
        raise DataError("chat template renders the prompt differently inside the full chat")
    full = full[:max_length]
    labels = [IGNORE] * min(len(prompt), len(full)) + full[len(prompt):]
    return full, labels


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int):
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), IGNORE)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (ids, labs) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(labs)] = torch.tensor(labs)
        attention[i, : len(ids)] = 1
    return input_ids, labels, attention


def lr_at(step: int, total: int, cfg) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def micro_batches(n_examples: int, cfg, total_steps: int):
    """The whole run's order of examples, fixed by the seed, so resuming replays it exactly."""
    rng = random.Random(cfg.seed)
    order: list[int] = []
    need = total_steps * cfg.grad_accum * cfg.micro_batch_size
    while len(order) < need:
        epoch = list(range(n_examples))
        rng.shuffle(epoch)
        order += epoch
    size = cfg.micro_batch_size
    return [order[i: i + size] for i in range(0, need, size)]


def model_card(arm: str, params, data_file: str, n_examples: int, final_loss: float | None) -> str:
    source = json.loads((Path(paths.BASE_MODEL) / "source.json").read_text())
    ev = params.evaluate
    return f"""---
base_model: {source['base']}
tags: [selfdistill, simple-self-distillation, code]
---
# selfdistill: {arm}

Fine-tuned by simple self-distillation (SSD, arXiv 2604.01193) with selfdistill.

- Base model: `{source['base']}`{f" (GGUF `{source['file']}`, sha256 `{source['sha256']}`)" if 'sha256' in source else ''}
- Training data: `{data_file}` (sha256 `{file_sha256(data_file)}`), {n_examples} samples, filter arm `{arm}`
- Sampled at temperature {params.sample.temperature}, top-k {params.sample.top_k}, top-p {params.sample.top_p}, min-p {params.sample.min_p}
- Training: {params.train.model_dump_json()}
- Final training loss: {final_loss if final_loss is None else round(final_loss, 4)}
- Decode with temperature {ev.temperature}, top-k {ev.top_k}, top-p {ev.top_p} (in generation_config.json)

Lineage: `selfdistill lineage models/{arm}`.
"""


def train(arm: str) -> None:
    params = load_params()
    cfg = params.train
    use_all_cores()
    torch.manual_seed(cfg.seed)
    data_file = paths.filtered_samples(arm)
    rows = read_jsonl(data_file)
    if not rows:
        raise DataError(f"{data_file}: filter arm {arm!r} has 0 samples to train on")
    dev = device()
    model, tokenizer = load_pretrained(paths.BASE_MODEL)
    model.to(dev)
    examples = [encode(tokenizer, r["messages"], cfg.max_length) for r in rows]
    examples = [e for e in examples if any(label != IGNORE for label in e[1])]
    if not examples:
        raise DataError(f"{data_file}: arm {arm!r} has no sample with answer tokens within train.max_length")
    if cfg.method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    per_step = cfg.micro_batch_size * cfg.grad_accum
    total_steps = max(1, math.ceil(cfg.epochs * len(examples) / per_step))
    batches = micro_batches(len(examples), cfg, total_steps)

    # Resume only from a checkpoint of this exact data and config.
    ckpt_dir = Path(paths.CHECKPOINTS) / arm
    key = resume_key(data=file_sha256(data_file), model=dir_sha256(paths.BASE_MODEL), train=cfg.model_dump())
    start, curve = 0, []
    state_file = ckpt_dir / "state.pt"
    if state_file.exists():
        state = torch.load(state_file, weights_only=False, map_location=dev)
        if state.get("resume_key") == key:
            model.load_state_dict(state["model"], strict=False)
            optimizer.load_state_dict(state["optimizer"])
            start, curve = state["step"], state["curve"]
            print(f"train[{arm}]: resuming at step {start}/{total_steps}")
        else:
            why = "; ".join(key_differences(state.get("resume_key"), key))
            print(f"train[{arm}]: discarding the checkpoint in {ckpt_dir}: another run's ({why})")

    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    bar = tqdm(range(start, total_steps), initial=start, total=total_steps, desc=f"train[{arm}]", unit="step")
    for step in bar:
        lr = lr_at(step, total_steps, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss = 0.0
        accum = batches[step * cfg.grad_accum: (step + 1) * cfg.grad_accum]
        n_tokens = sum(sum(l != IGNORE for l in examples[i][1][1:]) for mb in accum for i in mb)
        for mb in accum:
            batch = collate([examples[i] for i in mb], tokenizer.pad_token_id)
            input_ids, labels, attention = (t.to(dev) for t in batch)
            with autocast:
                logits = model(input_ids=input_ids, attention_mask=attention).logits
            # Sum over tokens, divided by the step's answer tokens: every token weighs the same.
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)),
                                                     labels[:, 1:].reshape(-1), ignore_index=IGNORE,
                                                     reduction="sum") / max(1, n_tokens)
            loss.backward()
            step_loss += loss.item()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        curve.append({"step": step + 1, "loss": round(step_loss, 5), "lr": lr, "tokens": n_tokens})
        bar.set_postfix(loss=f"{step_loss:.3f}")
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < total_steps:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            with atomic_path(state_file) as tmp:
                torch.save({"resume_key": key, "step": step + 1, "curve": curve,
                            "model": model.state_dict(), "optimizer": optimizer.state_dict()}, tmp)

    if cfg.method == "lora":
        model = model.merge_and_unload()
    model.to("cpu").eval()
    ev = params.evaluate
    model.generation_config.update(do_sample=ev.temperature > 0, temperature=ev.temperature, top_k=ev.top_k,
                                   top_p=ev.top_p, min_p=ev.min_p or None, max_new_tokens=ev.max_new_tokens)
    out_dir = paths.trained_model(arm)
    with atomic_path(out_dir, is_dir=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        final = curve[-1]["loss"] if curve else None
        (tmp / "README.md").write_text(model_card(arm, params, data_file, len(examples), final))
    write_text(paths.train_curve(arm), "step,loss,lr,tokens\n" + "".join(
        f"{c['step']},{c['loss']},{c['lr']:.3e},{c['tokens']}\n" for c in curve))
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    print(f"train[{arm}]: {total_steps} steps on {len(examples)} samples, final loss {curve[-1]['loss']:.4f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.train")
    parser.add_argument("--arm", required=True, choices=FILTER_ARMS)
    train(parser.parse_args(argv).arm)
    return 0


if __name__ == "__main__":
    sys.exit(run_stage(main))
