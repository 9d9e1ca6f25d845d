"""Stage `publish`: release/<arm>/, a trained model as a user takes it away (to a hub, say).

Runs after `evaluate@<arm>`, because the decoding a model ships with is the one it was measured
at: `train` sets none (so no `evaluate.*` value reruns training), and this stage writes
- the weights and tokenizer of models/<arm>/, hard-linked (copied where the filesystem refuses a
  link); DVC then stores release/<arm> as the repo's `cache.type` says: with hardlink or symlink
  there is no second copy on disk, with the default (reflink, copy) DVC makes its own copy;
- generation_config.json at the T_eval that evaluate's validation sweep chose for this model (the
  T its test sets were decoded at, read from eval/<arm>/metrics.json; `evaluate.temperature` is
  only the sweep's tie-breaker), with evaluate.top_k, top_p, min_p and max_new_tokens;
- README.md, the model card: pass@1 per eval set at that T, the sweep behind the choice, and the
  lineage (base model, sampling config and T_train, filter, dvc.lock's record of the training
  run, the git commit).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from transformers import GenerationConfig

from tasks.core import paths
from tasks.core.config import load_params, named, run_stage
from tasks.core.files import DataError, atomic_path, read_json

# Written here as new files: written through a hard link, they would change models/<arm> too.
OWN_FILES = ("README.md", "generation_config.json")


def chosen_temperature(metrics: dict, where: str) -> float:
    """The T_eval the model was tested at: its validation sweep's choice (or, without a sweep,
    evaluate.temperature), the same for every eval set."""
    tested = {s["temperature"] for s in metrics["sets"].values()}
    if len(tested) != 1:
        raise DataError(f"{where}: eval sets tested at different T_eval {sorted(tested)}: rerun evaluate")
    (t,) = tested
    chosen = metrics.get("validation", {}).get("chosen_temperature", t)
    if chosen != t:
        raise DataError(f"{where}: validation chose T={chosen:g} but the test sets ran at T={t:g}: rerun evaluate")
    return t


def link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(src, dst)


def generation_config(model_dir: str, temperature: float, ev):
    """The model's generation config with the decoding it was measured at."""
    gen = GenerationConfig.from_pretrained(model_dir)
    if temperature > 0:
        gen.update(do_sample=True, temperature=temperature, top_k=ev.top_k, top_p=ev.top_p, min_p=ev.min_p or None)
    else:  # greedy: sampling settings would only be ignored (transformers refuses to save them)
        gen.update(do_sample=False, temperature=None, top_k=None, top_p=None, min_p=None)
    gen.update(max_new_tokens=ev.max_new_tokens)
    return gen


def training_record(arm: str) -> dict | None:
    """dvc.lock's entry for the run that made models/<arm>, or None (stages run without DVC).
    Read, not a dep: dvc.lock is rewritten whenever any stage runs."""
    try:
        return yaml.safe_load(Path("dvc.lock").read_text())["stages"][f"train@{arm}"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def results(metrics: dict, temperature: float) -> str:
    lines = ["| eval set | problems | samples per problem | pass@1 | pass@1 per seed |", "|---|---|---|---|---|"]
    for name, s in metrics["sets"].items():
        seeds = ", ".join(f"{v:.3f}" for v in s.get("pass@1_by_seed", {}).values()) or "-"
        lines.append(f"| {name} | {s['problems']} | {s['samples'] // s['problems']} | {s['pass@1']:.3f} | {seeds} |")
    validation = metrics.get("validation")
    if validation is None:
        choice = f"T_eval {temperature:g} was set, not chosen (no validation sweep)."
    else:
        by_t = validation["pass@1_by_temperature"]
        choice = (f"T_eval {temperature:g} was chosen on {validation['problems']} validation problems, disjoint "
                  f"from every test set, by pass@1 at each T: "
                  + ", ".join(f"T={t} {v:.3f}" for t, v in by_t.items()) + ".")
        if len(by_t) > 1 and len(set(by_t.values())) == 1:
            choice += " Validation could not tell them apart (equal pass@1): the sweep's tie-breaker chose."
    return "\n".join(lines) + (f"\n\n{choice} No confidence interval here (evaluate records none): selfdistill's "
                                "report compares each model with its base, with a paired bootstrap CI.")


def model_card(arm: str, params, metrics: dict, temperature: float) -> str:
    source = read_json(Path(paths.BASE_MODEL) / "source.json")
    spec = params.arms[arm]
    sampled = params.sample.configs[spec.sample]
    ev = params.evaluate
    record, commit = training_record(arm), git_commit()
    recorded = (f"dvc.lock's record of the training run (`train@{arm}`):\n\n```yaml\n"
                f"{yaml.safe_dump(record, sort_keys=False)}```" if record else "No dvc.lock record (trained without DVC).")
    decoding = (f"temperature {temperature:g}, top-k {ev.top_k}, top-p {ev.top_p}, min-p {ev.min_p}"
                if temperature > 0 else "greedy")
    return f"""---
base_model: {source['base']}
library_name: transformers
tags: [selfdistill, simple-self-distillation, code]
---
# selfdistill: {arm}

`{source['base']}` fine-tuned by simple self-distillation (SSD, arXiv 2604.01193) with selfdistill.
Decode with {decoding}, at most {ev.max_new_tokens} new tokens (generation_config.json): the
settings it was measured at.

## Results

{results(metrics, temperature)}

## Lineage

- Base model: `{source['base']}`{f" (GGUF `{source['file']}`, sha256 `{source['sha256']}`)" if 'sha256' in source else ''}
- Arm `{arm}`: answers sampled from the base model with sampling config `{spec.sample}` (T_train {sampled.temperature}, top-k {sampled.top_k}, top-p {sampled.top_p}, min-p {sampled.min_p}), kept by filter `{spec.filter}`, then plain SFT
- Published from {f"git commit `{commit}`" if commit else "a directory outside git"}; in that repository `selfdistill lineage {paths.release_dir(arm)}` audits it

{recorded}
"""


def publish(arm: str) -> int:
    params = load_params()
    named(params.arms, arm, "arms")
    model_dir, out_dir = paths.trained_model(arm), paths.release_dir(arm)
    metrics = read_json(paths.eval_metrics(arm))
    if Path(metrics["model"]) != Path(model_dir):
        raise DataError(f"{paths.eval_metrics(arm)}: measures {metrics['model']}, not {model_dir}")
    temperature = chosen_temperature(metrics, paths.eval_metrics(arm))
    card = model_card(arm, params, metrics, temperature)
    gen = generation_config(model_dir, temperature, params.evaluate)
    with atomic_path(out_dir, is_dir=True) as tmp:
        shutil.copytree(model_dir, tmp, copy_function=link_or_copy, ignore=shutil.ignore_patterns(*OWN_FILES),
                        dirs_exist_ok=True)
        gen.save_pretrained(tmp)
        (tmp / "README.md").write_text(card)
    print(f"publish[{arm}]: {out_dir} at T_eval {temperature:g}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.publish")
    parser.add_argument("--arm", required=True, help="a key of arms in params.yaml")
    return publish(parser.parse_args(argv).arm)


if __name__ == "__main__":
    sys.exit(run_stage(main))
