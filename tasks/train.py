"""Stage `train`: plain SFT of the base model on one filter arm's samples.

The engine is TRL's SFTTrainer on transformers' Trainer and accelerate (tasks/training/sft.py):
cross-entropy on the assistant tokens only, AdamW (train.beta1/beta2, weight decay), cosine to
train.min_lr after a linear warm-up, gradient accumulation, bf16 autocast, full fine-tune (or
LoRA with `train.method: lora`), each micro-batch packed into rows of at most train.pack_tokens
with attention kept inside each example, logits only at answer positions and in chunks. `train.accelerate` names an accelerate config
(multi-GPU, FSDP, DeepSpeed): the stage then relaunches itself under `accelerate launch`.
Checkpoints go to checkpoints/<arm>/ (not a DVC out, so it survives DVC clearing outs) and
a rerun with the same data and params resumes from there.

Outputs: models/<arm>/ (safetensors, tokenizer, generation_config.json carrying the
evaluation decoding settings, README.md model card) and plots/train/<arm>.csv.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import shutil
import sys
from pathlib import Path

import torch

from tasks.core import paths
from tasks.core.config import load_params, named, run_stage
from tasks.core.files import DataError, atomic_path, dir_sha256, file_sha256, read_jsonl, resume_key, write_text
from tasks.core.modeling import load_pretrained, use_all_cores
from tasks.training.sft import IGNORE, encode, fit

LAUNCHED = "SELFDISTILL_ACCELERATE_LAUNCHED"


def model_card(arm: str, params, data_file: str, n_examples: int, final_loss: float | None) -> str:
    source = json.loads((Path(paths.BASE_MODEL) / "source.json").read_text())
    ev = params.evaluate
    spec = params.arms[arm]
    sampled = params.sample.configs[spec.sample]
    return f"""---
base_model: {source['base']}
tags: [selfdistill, simple-self-distillation, code]
---
# selfdistill: {arm}

Fine-tuned by simple self-distillation (SSD, arXiv 2604.01193) with selfdistill.

- Base model: `{source['base']}`{f" (GGUF `{source['file']}`, sha256 `{source['sha256']}`)" if 'sha256' in source else ''}
- Training data: `{data_file}` (sha256 `{file_sha256(data_file)}`), {n_examples} samples: arm `{arm}`, sampling config `{spec.sample}`, filter `{spec.filter}`
- Sampled at temperature {sampled.temperature}, top-k {sampled.top_k}, top-p {sampled.top_p}, min-p {sampled.min_p}
- Training: {params.train.model_dump_json()}
- Final training loss: {final_loss if final_loss is None else round(final_loss, 4)}
- Decode with temperature {ev.temperature}, top-k {ev.top_k}, top-p {ev.top_p} (in generation_config.json)

Lineage: `selfdistill lineage models/{arm}`.
"""


def train(arm: str) -> int:
    params = load_params()
    named(params.arms, arm, "arms")
    cfg = params.train
    if cfg.accelerate and not os.environ.get(LAUNCHED):
        # Multi-process (multi-GPU, FSDP, DeepSpeed): the same stage, under accelerate launch.
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", cfg.accelerate,
               "-m", "tasks.train", "--arm", arm]
        print(f"train[{arm}]: {' '.join(cmd[1:])}", flush=True)
        return subprocess.run(cmd, env={**os.environ, LAUNCHED: "1"}).returncode
    use_all_cores()
    torch.manual_seed(cfg.seed)
    data_file = paths.filtered_samples(arm)
    rows = read_jsonl(data_file)
    if not rows:
        raise DataError(f"{data_file}: arm {arm!r} has 0 samples to train on")
    model, tokenizer = load_pretrained(paths.BASE_MODEL)
    examples = [encode(tokenizer, r["messages"], cfg.max_length) for r in rows]
    examples = [e for e in examples if any(label != IGNORE for label in e[1])]
    if not examples:
        raise DataError(f"{data_file}: arm {arm!r} has no sample with answer tokens within train.max_length")
    if cfg.method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    # Resume only from a checkpoint of this exact data and config.
    ckpt_dir = Path(paths.CHECKPOINTS) / arm
    key = resume_key(data=file_sha256(data_file), model=dir_sha256(paths.BASE_MODEL), train=cfg.model_dump())
    trainer, curve = fit(model, tokenizer, examples, cfg, ckpt_dir, key, name=f"train[{arm}]")

    ev = params.evaluate
    final = curve[-1]["loss"] if curve else None
    out_dir = paths.trained_model(arm)
    model = trainer.accelerator.unwrap_model(trainer.model)
    if cfg.method == "lora":
        model = model.merge_and_unload()
    model.generation_config.update(do_sample=ev.temperature > 0, temperature=ev.temperature, top_k=ev.top_k,
                                   top_p=ev.top_p, min_p=ev.min_p or None, max_new_tokens=ev.max_new_tokens)
    if cfg.method == "full" and trainer.accelerator.num_processes > 1:
        # Sharded (FSDP / DeepSpeed) weights are gathered by the trainer; every process takes part.
        tmp_dir = Path(str(out_dir) + ".gathered")
        trainer.save_model(str(tmp_dir))
    if not trainer.is_world_process_zero():
        return 0
    # Done with the optimizer's state (twice the weights in fp32) and the gradients: free them
    # before writing the model, which otherwise sets the run's peak RSS.
    trainer.accelerator.free_memory()
    trainer.optimizer = trainer.lr_scheduler = None
    model.zero_grad(set_to_none=True)
    gc.collect()
    model.to("cpu").eval()
    with atomic_path(out_dir, is_dir=True) as tmp:
        if cfg.method == "full" and trainer.accelerator.num_processes > 1:
            for item in tmp_dir.iterdir():
                shutil.move(str(item), tmp / item.name)
            shutil.rmtree(tmp_dir)
            model.generation_config.save_pretrained(tmp)
        else:
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(arm, params, data_file, len(examples), final))
    write_text(paths.train_curve(arm), "step,loss,lr,tokens\n" + "".join(
        f"{c['step']},{c['loss']},{c['lr']:.3e},{c['tokens']}\n" for c in curve))
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    print(f"train[{arm}]: {len(curve)} steps on {len(examples)} samples, final loss {final:.4f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.train")
    parser.add_argument("--arm", required=True, help="a key of arms in params.yaml")
    return train(parser.parse_args(argv).arm)


if __name__ == "__main__":
    sys.exit(run_stage(main))
