"""Useful tokens/s of each sampling backend against transformers, same prompts, same run.

    python -m bench.bench_sampling [--model models/base] [--backends transformers.generate,continuous-int8]
                                   [--prompts 0] [--rounds 2] [--batch-size 0] [--slots 0] [--pass-at-1 0]

Prompts are a fixed workload: HumanEval split 98 prompts / 66 held-out (seed 0), in the project's chat
format; decoding is params.yaml's `sample` config (its first named config, ssd: temperature, top-k,
top-p; and max_new_tokens, batch_size, slots) unless flags say otherwise. Work is planned as generate_jsonl plans it
(sorted by prompt length, cut into batches, one seed per batch) and every backend gets the
same plan, except the baseline `transformers.generate`, which decodes static batches of
--generate-batch-size (32, the setting the issue's ~65 tok/s figure was taken at).
Rounds alternate backend by backend so that load from other work on the machine hits all
alike; each backend's best round is reported with its ratio to the first backend listed
(the baseline) and to the `transformers` reference backend.
"Useful" tokens are the completions' tokens (EOS included, as in num_tokens): no padding,
and nothing decoded after an EOS; prefill time counts in the wall time.

A ctranslate2* backend needs a conversion; a missing one is made first (timed, reported).
--pass-at-1 N additionally samples N answers for each of the first --eval-problems held-out
HumanEval problems with every backend at the `evaluate` decoding config and scores them in the
sandbox (pass@1 per backend: what quantisation costs).
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tasks.core.config import load_params, sampling_decoding  # noqa: E402
from tasks.sampling.backends import BACKENDS, batch_seed, load_backend  # noqa: E402
from tasks.sampling.generate import plan_batches  # noqa: E402
from tasks.core.problems import chat_messages, load_problems, split_problems  # noqa: E402


BENCH_EVAL_FRACTION = 0.4
DEFAULT_BACKENDS = ["transformers.generate", "transformers", "continuous", "continuous-int8", "ctranslate2"]


def load_baseline(name: str, model_dir: str):
    """`continuous-int8@baseline` / `continuous@baseline`: the frozen copy of the continuous backends
    in bench/baseline_continuous.py (today's shipped backend measured against in the same run),
    after the same load-time self-check as a product backend."""
    from bench import baseline_continuous
    from tasks.sampling.backends import self_check

    cls = {"continuous-int8@baseline": baseline_continuous.ContinuousInt8Backend,
           "continuous@baseline": baseline_continuous.ContinuousBackend}[name]
    backend = cls(model_dir)
    self_check(backend)
    return backend


class GenerateBaseline:
    """transformers' own `model.generate` on the reference backend's model (bf16, same chat
    template): a static, left-padded batch whose rows decode until its longest row ends.
    The baseline the issue's target is stated against; not a product backend."""

    name = "transformers.generate"

    def __init__(self, model_dir: str):
        from tasks.sampling.backend_transformers import TransformersBackend

        self.reference = TransformersBackend(model_dir)
        self.encode_chat = self.reference.encode_chat

    def generate_batch(self, prompts, cfg, seed: int):
        import torch

        from tasks.sampling.backends import Completion

        ref = self.reference
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[ref.pad_id] * (width - len(p)) + p for p in prompts], device=ref.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=ref.device)
        torch.manual_seed(seed)
        sampling = {"do_sample": True, "temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p,
                    "min_p": cfg.min_p or None} if cfg.temperature > 0 else {"do_sample": False}
        with torch.inference_mode():
            out = ref.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=cfg.max_new_tokens,
                                     eos_token_id=sorted(ref.eos), pad_token_id=ref.pad_id, **sampling)
        completions = []
        for row in out[:, width:].tolist():
            end = next((i for i, t in enumerate(row) if t in ref.eos), None)
            text_ids = row if end is None else row[:end]
            completions.append(Completion(ref.tokenizer.decode(text_ids, skip_special_tokens=True),
                                          len(text_ids) + (end is not None), "length" if end is None else "eos"))
        return completions


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def plan(prompts: list[list[int]], n: int, batch_size: int) -> list[list[int]]:
    """generate_jsonl's own plan of batches, as request indices."""
    return [[r for r, _ in batch] for batch in plan_batches([len(p) for p in prompts], n, batch_size)]


def run_once(backend, prompts, batches, cfg) -> dict:
    wall, cpu = time.perf_counter(), cpu_seconds()
    outs = []
    for b, batch in enumerate(batches):
        outs += backend.generate_batch([prompts[r] for r in batch], cfg, seed=batch_seed(cfg.seed, b))
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    tokens = sum(o.num_tokens for o in outs)
    return {"wall": wall, "cpu": cpu, "tokens": tokens, "samples": len(outs),
            "eos": sum(o.finish_reason == "eos" for o in outs), "outs": outs}


def ensure_converted(model: str, name: str) -> float:
    from tasks.sampling import convert_ctranslate2 as convert

    quantization = {"ctranslate2": "int8", "ctranslate2-float32": "float32"}.get(name)
    if quantization is None:
        return 0.0
    try:
        convert.resolve(model, quantization)
        return 0.0
    except Exception:  # missing or stale: convert now
        started = time.perf_counter()
        convert.convert(model, None, quantization)
        return time.perf_counter() - started


def pass_at_1(backends: dict, cfg, problems: list[dict], n: int) -> dict:
    from tasks import sandbox
    from tasks.core.metrics import mean_pass_at_k, per_problem_counts
    from tasks.core.jobs import answer_job

    cfg = cfg.model_copy(update={"n": n})
    result = {}
    for name, backend in backends.items():
        prompts = [backend.encode_chat(chat_messages(p)) for p in problems]
        batches = plan(prompts, n, cfg.batch_size)
        outs = run_once(backend, prompts, batches, cfg)["outs"]
        rows = [r for batch in batches for r in batch]
        jobs = [answer_job(problems[r], o.text) for r, o in zip(rows, outs)]
        verdicts = sandbox.check_programs(jobs, timeout_s=5.0)
        counts = per_problem_counts([{"task_id": r, "passed": v.passed} for r, v in zip(rows, verdicts)]).values()
        result[name] = (mean_pass_at_k(list(counts), 1), sum(c for _, c in counts), sum(n for n, _ in counts))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/base", help="HF model dir")
    parser.add_argument("--backends", default=",".join(DEFAULT_BACKENDS),
                        help=f"first is the baseline; known: {', '.join([GenerateBaseline.name, *BACKENDS])}, "
                        "continuous-int8@baseline and continuous@baseline (bench/baseline_continuous.py)")
    parser.add_argument("--prompts", type=int, default=0, help="HumanEval train-split prompts (0: all, "
                        "as the sample stage)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--config", default="", help="params' sample.configs entry (default: the first, ssd)")
    parser.add_argument("--batch-size", type=int, default=0, help="0: params' sample.batch_size")
    parser.add_argument("--slots", type=int, default=0, help="0: params' sample.slots")
    parser.add_argument("--generate-batch-size", type=int, default=32,
                        help="transformers.generate's static batch (the issue's baseline: 32)")
    parser.add_argument("--max-new-tokens", type=int, default=0, help="0: params' sample.max_new_tokens")
    parser.add_argument("--pass-at-1", type=int, default=0, help="samples per held-out problem (0: skip)")
    parser.add_argument("--eval-problems", type=int, default=66)
    parser.add_argument("--skip-speed", action="store_true", help="only the pass@1 comparison")
    args = parser.parse_args()

    # The workspace's params, else the project's defaults.
    params = load_params() if Path("params.yaml").exists() else load_params(REPO / "params.yaml")
    cfg = sampling_decoding(params.sample, args.config or next(iter(params.sample.configs)))
    update = {}
    if args.batch_size:
        update["batch_size"] = args.batch_size
    if args.slots:
        update["slots"] = args.slots
    if args.max_new_tokens:
        update["max_new_tokens"] = args.max_new_tokens
    cfg = cfg.model_copy(update=update)
    # A fixed workload, so figures stay comparable across changes of the pipeline's data params:
    # HumanEval split 98 prompts / 66 held-out problems (seed 0), the default `sample` stage's
    # prompts when these figures were first measured.
    train, held_out = split_problems(load_problems("humaneval"), BENCH_EVAL_FRACTION, 0)
    train = train[:args.prompts or None]
    names = [n.strip() for n in args.backends.split(",") if n.strip()]
    print(f"model {args.model}; {len(train)} prompts; T={cfg.temperature} top_k={cfg.top_k} top_p={cfg.top_p} "
          f"min_p={cfg.min_p} max_new_tokens={cfg.max_new_tokens} batch_size={cfg.batch_size} slots={cfg.slots} "
          f"(transformers.generate: static batches of {args.generate_batch_size}); "
          f"{os.cpu_count()} CPUs; {args.rounds} rounds, interleaved")

    backends, prompts = {}, {}
    for name in names:
        converted = ensure_converted(args.model, name)
        started = time.perf_counter()
        # vllm: an engine sized for the longest prompt here plus the longer max_new_tokens of the two runs.
        backends[name] = GenerateBaseline(args.model) if name == GenerateBaseline.name else load_baseline(
            name, args.model) if name.endswith("@baseline") else load_backend(
            name, args.model, engine={"vllm": params.vllm.model_dump()},
            conversations=[chat_messages(p) for p in train + held_out[:args.eval_problems]],
            max_new_tokens=max(cfg.max_new_tokens, params.evaluate.max_new_tokens))
        print(f"  {name}: loaded in {time.perf_counter() - started:.1f}s"
              + (f" (converted first, {converted:.0f}s)" if converted else ""), flush=True)
        prompts[name] = [backends[name].encode_chat(chat_messages(p)) for p in train]
    reference = prompts[names[0]]
    for name in names:
        if prompts[name] != reference:
            raise SystemExit(f"{name} encodes the chat differently from {names[0]}")
    batches = plan(reference, cfg.n, cfg.batch_size)
    generate_batches = plan(reference, cfg.n, args.generate_batch_size)

    best: dict[str, dict] = {}
    for rnd in range(0 if args.skip_speed else args.rounds):
        for name in names:
            r = run_once(backends[name], reference, generate_batches if name == GenerateBaseline.name else batches,
                         cfg)
            print(f"  round {rnd} {name:20s} {r['tokens']:6d} tokens {r['wall']:7.1f}s wall "
                  f"{r['tokens'] / r['wall']:6.1f} tok/s  (cpu {r['cpu']:.0f}s, eos {r['eos']}/{r['samples']})",
                  flush=True)
            if name not in best or r["tokens"] / r["wall"] > best[name]["tokens"] / best[name]["wall"]:
                best[name] = r

    if best:
        base_name = names[0]
        base = best[base_name]["tokens"] / best[base_name]["wall"]
        reference = best.get("transformers")
        print(f"\nbest round per backend (ratios: tok/s over {base_name}'s"
              + (", and over the transformers backend's)" if reference and base_name != "transformers" else ")"))
        print(f"  {'backend':22s} {'tok/s':>7s} {'s/1000 samples':>15s} {'tok/cpu-s':>9s} {'x ' + base_name:>24s}"
              f" {'x transformers':>15s}")
    for name in best:
        r = best[name]
        rate = r["tokens"] / r["wall"]
        per_1000 = r["wall"] / r["samples"] * 1000
        over_reference = f"{rate / (reference['tokens'] / reference['wall']):.2f}x" if reference else "-"
        print(f"  {name:22s} {rate:7.1f} {per_1000:15.0f} {r['tokens'] / r['cpu']:9.1f} {rate / base:23.2f}x"
              f" {over_reference:>15s}")

    if args.pass_at_1:
        eval_cfg = params.evaluate
        scored = pass_at_1(backends, eval_cfg, held_out[:args.eval_problems], args.pass_at_1)
        print(f"\npass@1 on {min(args.eval_problems, len(held_out))} held-out problems, {args.pass_at_1} samples "
              f"each, T={eval_cfg.temperature} top_k={eval_cfg.top_k} top_p={eval_cfg.top_p}:")
        for name, (p1, passed, total) in scored.items():
            print(f"  {name:20s} pass@1 {p1:.3f} ({passed}/{total} samples passed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
