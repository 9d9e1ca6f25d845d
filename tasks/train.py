"""Stage `train`: plain SFT of the base model on one filter arm's samples.

The engine is TRL's SFTTrainer on transformers' Trainer and accelerate (tasks/training/sft.py):
cross-entropy on the assistant tokens only (after an answer cut off at sample.max_new_tokens,
not on the end-of-turn token the chat template appends), AdamW (train.beta1/beta2, weight decay), cosine to
train.min_lr after a linear warm-up, gradient accumulation, bf16 autocast, full fine-tune (or
LoRA with `train.method: lora`), each micro-batch packed into rows of at most train.pack_tokens
with attention kept inside each example, logits only at answer positions and in chunks. `train.accelerate` names an accelerate config
(multi-GPU, FSDP, DeepSpeed): the stage then relaunches itself under `accelerate launch`.
Checkpoints go to checkpoints/<arm>/ (not a DVC out, so it survives DVC clearing outs) and
a rerun with the same data and params resumes from there. A sample with no answer token within
train.max_length is dropped and counted; a run whose learning rate never leaves 0, or whose
weights end equal to the base's, is refused.

Outputs: models/<arm>/ (safetensors, tokenizer, README.md model card), train/<arm>/live/ (dvclive's
files, written as it trains: loss, learning rate and answer tokens per optimizer step, a resumed
run's included) and train/<arm>/stats.json (samples trained on and dropped by reason, steps,
answer tokens, final loss).
Decoding settings are not set here: `publish` writes them, at the T_eval `evaluate` chose for
this model, so no `evaluate.*` value reruns training.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from tasks.core import paths
from tasks.core.config import EXIT_NO_RETRY, NO_RETRY_FILE_ENV, ParamsError, load_params, named, run_stage
from tasks.core.files import DataError, atomic_path, dir_sha256, file_sha256, read_jsonl, resume_key, write_json
from tasks.core.modeling import load_pretrained, use_all_cores
from tasks.core.stack import code_fingerprint, versions
from tasks.training.sft import IGNORE, encode, fit

TRAINING_LIBRARIES = ("torch", "transformers", "trl", "accelerate", "peft", "datasets")
LAUNCHED = "SELFDISTILL_ACCELERATE_LAUNCHED"
NO_ANSWER = "no answer token within train.max_length"


def launch_command(accelerate_config: str, arm: str) -> list[str]:
    """`accelerate launch` of this stage under `accelerate_config`. On one machine with no
    main_process_port of the config's own, a free port: torchrun's default (29500) would make two
    launches at once on one machine (two train stages, two workspaces) collide."""
    import socket

    import yaml

    try:
        config = yaml.safe_load(Path(accelerate_config).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ParamsError(f"train.accelerate: {accelerate_config}: not a readable accelerate config ({err})") from None
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", accelerate_config]
    if int(config.get("num_machines") or 1) <= 1 and not config.get("main_process_port"):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            cmd += ["--main_process_port", str(probe.getsockname()[1])]
    return cmd + ["-m", "tasks.train", "--arm", arm]


def same_weights(model_dir: str | os.PathLike, base_dir: str | os.PathLike) -> bool:
    """Whether every tensor of `model_dir`'s safetensors equals the base's tensor of that name."""
    from safetensors import safe_open

    def files(directory) -> dict[str, Path]:
        found = {}
        for file in sorted(Path(directory).glob("*.safetensors")):
            with safe_open(file, "pt") as f:
                found.update(dict.fromkeys(f.keys(), file))
        return found

    ours, base = files(model_dir), files(base_dir)
    common = sorted(ours.keys() & base.keys())
    for name in common:
        with safe_open(ours[name], "pt") as a, safe_open(base[name], "pt") as b:
            ours_t = a.get_tensor(name)
            # The base rounded as the model was saved: a bf16 save of unchanged weights is no change.
            if not torch.equal(ours_t.float(), b.get_tensor(name).to(ours_t.dtype).float()):
                return False
    return bool(common)


def cast_saved_weights(model_dir: Path, dtype: torch.dtype) -> None:
    """The floating tensors of every safetensors file in `model_dir` rewritten in `dtype` (what a
    sharded run's gathered state dict is saved as is the trainer's choice, not train.save_dtype)."""
    from safetensors.torch import load_file, save_file

    for file in sorted(model_dir.glob("*.safetensors")):
        tensors = {name: t.to(dtype) if t.is_floating_point() else t for name, t in load_file(file).items()}
        save_file(tensors, file, metadata={"format": "pt"})


def model_card(arm: str, params, data_file: str, n_examples: int, final_loss: float | None) -> str:
    source = json.loads((Path(paths.BASE_MODEL) / "source.json").read_text())
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

Lineage: `selfdistill lineage models/{arm}`.
"""


def train(arm: str) -> int:
    params = load_params()
    named(params.arms, arm, "arms")
    cfg = params.train
    if cfg.accelerate and not os.environ.get(LAUNCHED):
        # Multi-process (multi-GPU, FSDP, DeepSpeed): the same stage, under accelerate launch.
        cmd = launch_command(cfg.accelerate, arm)
        print(f"train[{arm}]: {' '.join(cmd[1:])}", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            reasons = Path(tmp) / "no-retry"
            code = subprocess.run(cmd, env={**os.environ, LAUNCHED: "1", NO_RETRY_FILE_ENV: str(reasons)}).returncode
            # A process that failed as a rerun would fail again (bad params or data, the loss
            # check, out of GPU memory) makes the stage's failure one too.
            return EXIT_NO_RETRY if code and reasons.exists() else code
    use_all_cores()
    torch.manual_seed(cfg.seed)
    data_file = paths.filtered_samples(arm)
    rows = read_jsonl(data_file)
    if not rows:
        raise DataError(f"{data_file}: arm {arm!r} has 0 samples to train on")
    model, tokenizer = load_pretrained(paths.BASE_MODEL)
    # A sample cut off at sample.max_new_tokens trains no end-of-turn label (filter.truncated).
    encoded = [encode(tokenizer, r["messages"], cfg.max_length, open_end=r["finish_reason"] == "length") for r in rows]
    used = [i for i, (_, labels) in enumerate(encoded) if any(label != IGNORE for label in labels)]
    examples = [encoded[i] for i in used]
    stats = {"arm": arm, "samples": len(rows), "trained": len(examples),
             "dropped": {NO_ANSWER: len(rows) - len(used)} if len(used) < len(rows) else {},
             "trained_open": sum(rows[i]["finish_reason"] == "length" for i in used)}
    print(f"train[{arm}]: training on {len(examples)} of {len(rows)} samples ({stats['trained_open']} cut off at "
          f"sample.max_new_tokens, with no end-of-turn label); dropped {stats['dropped']}", flush=True)
    if not examples:
        raise DataError(f"{data_file}: arm {arm!r} has no sample with answer tokens within train.max_length "
                        f"(dropped all {len(rows)})")
    if cfg.method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    # Resume only from a checkpoint of this exact data and config.
    ckpt_dir = Path(paths.CHECKPOINTS) / arm
    # The code that trains (every project module this process loaded) and the libraries that
    # compute: a checkpoint of other code or another engine is discarded, naming what differs.
    # save_dtype only rounds the weights at the end: a checkpoint serves every value of it.
    key = resume_key(data=file_sha256(data_file), model=dir_sha256(paths.BASE_MODEL),
                     train=cfg.model_dump(exclude={"save_dtype"}),
                     code=code_fingerprint(Path(__file__).resolve().parent), libraries=versions(*TRAINING_LIBRARIES))
    trainer, curve = fit(model, tokenizer, examples, cfg, ckpt_dir, key, name=f"train[{arm}]",
                         live_dir=paths.train_live_dir(arm))

    final = curve[-1]["loss"] if curve else None
    out_dir = paths.trained_model(arm)
    model = trainer.accelerator.unwrap_model(trainer.model)
    if cfg.method == "lora":
        model = model.merge_and_unload()
    if cfg.method == "full" and trainer.accelerator.num_processes > 1:
        # Sharded (FSDP / DeepSpeed) weights are gathered by the trainer; every process takes part.
        tmp_dir = Path(str(out_dir) + ".gathered")
        trainer.save_model(str(tmp_dir))
    if trainer.accelerator.num_processes > 1:
        # Every process leaves the process group together, before rank 0 writes the model: a
        # process that exits with the group alive can abort in gloo's teardown (SIGABRT), and
        # torchrun then kills the others, failing a run that trained.
        trainer.accelerator.wait_for_everyone()
        trainer.accelerator.end_training()
    if not trainer.is_world_process_zero():
        return 0
    # Done with the optimizer's state (twice the weights in fp32) and the gradients: free them
    # before writing the model, which otherwise sets the run's peak RSS.
    trainer.accelerator.free_memory()
    trainer.optimizer = trainer.lr_scheduler = None
    model.zero_grad(set_to_none=True)
    gc.collect()
    save_dtype = getattr(torch, cfg.saved_dtype)
    model.to("cpu", save_dtype).eval()
    with atomic_path(out_dir, is_dir=True) as tmp:
        if cfg.method == "full" and trainer.accelerator.num_processes > 1:
            for item in tmp_dir.iterdir():
                shutil.move(str(item), tmp / item.name)
            shutil.rmtree(tmp_dir)
            cast_saved_weights(tmp, save_dtype)
            model.config.save_pretrained(tmp)
            model.generation_config.save_pretrained(tmp)
        else:
            model.save_pretrained(tmp)
        if same_weights(tmp, paths.BASE_MODEL):
            raise ParamsError(f"train[{arm}]: the trained weights equal the base's after {len(curve)} steps "
                              f"(learning rates {sorted({c['lr'] for c in curve})}): nothing was learned; check "
                              "train.lr and train.warmup_steps")
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(arm, params, data_file, len(examples), final))
    stats.update(steps=len(curve), answer_tokens=sum(c["tokens"] for c in curve), final_loss=final)
    write_json(paths.train_stats(arm), stats)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    print(f"train[{arm}]: {len(curve)} steps on {len(examples)} of {len(rows)} samples (dropped {stats['dropped']}), "
          f"final loss {final:.4f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.train")
    parser.add_argument("--arm", required=True, help="a key of arms in params.yaml")
    return train(parser.parse_args(argv).arm)


if __name__ == "__main__":
    sys.exit(run_stage(main))
