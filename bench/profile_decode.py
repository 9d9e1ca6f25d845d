"""Where a `continuous-int8` decode step spends its time, and the int8 GEMM roofline it runs against.

    python -m bench.profile_decode [--model models/base] [--backend continuous-int8] [--prompts 0]
                                   [--max-new-tokens 0] [--slots 0] [--roofline-only]

1. Roofline: torch._int_mm (the GEMM Int8Linear's eager path calls) at the decode shapes of the
   model (M = slots rows; q/k/v, o, gate/up, down, the LM head), in G multiply-adds/s, with the
   weight held as the backends hold it, and the LM head also cut into column chunks of
   LM_HEAD_CHUNK (what the fused kernel does); and the fused linears' GEMM on a weight packed
   for oneDNN's matmul (the compiled kernels' PackedWeight), and the kernels' own AMX tiles on
   one thread (rows padded to 32), where this machine takes them.
   One weight per shape, called again and again: it stays in cache, so this is the GEMMs' peak,
   not what 30 layers' weights cost when each is read once per step.
2. One batch of bench/bench_sampling.py's workload (HumanEval train-split prompts, params.yaml's
   `sample` config) through the backend's generate_batch, every part timed by wrapping it:
   the int8 linears per projection (the MLP's two as one, where mlp_int8 runs them) and the LM head, the attention kernel, the rest of _decode
   (embedding, rotary, the final norm), the sampler, and the batch loop's own Python (the
   uniforms' draws, the slot bookkeeping). Printed per decode step (ms) and as shares of the
   wall time; prefill is reported apart. `--backend continuous-int8@baseline` profiles the
   frozen copy in bench/baseline_continuous.py.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from tasks.core.config import load_params, sampling_decoding  # noqa: E402
from tasks.core.problems import chat_messages, load_problems, split_problems  # noqa: E402

SHAPES = ("qkv", "o", "gate_up", "down", "lm_head")


def model_shapes(config) -> dict[str, tuple[int, int]]:
    """(K, N) of each decode GEMM: x [M, K] @ W [K, N]."""
    hidden, head_dim = config.hidden_size, getattr(config, "head_dim", None) or \
        config.hidden_size // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    inter = config.intermediate_size
    return {"qkv": (hidden, q + 2 * kv), "o": (q, hidden), "gate_up": (hidden, 2 * inter),
            "down": (inter, hidden), "lm_head": (hidden, config.vocab_size)}


def best_time(fn, seconds: float = 0.5) -> float:
    """The fastest of repeated calls (the machine is shared: the minimum is the least disturbed)."""
    fn()
    best, spent = float("inf"), 0.0
    while spent < seconds:
        started = time.perf_counter()
        fn()
        took = time.perf_counter() - started
        best, spent = min(best, took), spent + took
    return best


def roofline(config, rows: int, chunk: int) -> None:
    print(f"int8 GEMM roofline: torch._int_mm, M = {rows} rows, {torch.get_num_threads()} threads "
          f"(best of repeated calls)")
    from tasks.sampling import cpu_kernels

    kernels = cpu_kernels.load()
    packed = kernels is not None and cpu_kernels.packed_gemm(kernels)
    amx = kernels is not None and cpu_kernels.amx_tiles(kernels)
    print(f"  {'GEMM':10s} {'K x N':>12s} {'us':>9s} {'GMAC/s':>8s}" + (f" {'packed us':>10s} {'GMAC/s':>8s}" if packed else "")
          + (f" {'AMX 1-thr us':>12s} {'GMAC/s':>8s}" if amx else ""))
    total = 0.0
    for name, (k, n) in model_shapes(config).items():
        a = torch.randint(-127, 128, (rows, k), dtype=torch.int8)
        weight_t = torch.randint(-127, 128, (n, k), dtype=torch.int8).t()  # Int8Linear's layout
        took = best_time(lambda: torch._int_mm(a, weight_t))
        line = f"  {name:10s} {f'{k}x{n}':>12s} {took * 1e6:9.1f} {rows * k * n / took / 1e9:8.1f}"
        if packed and name != "lm_head":
            weight = kernels.PackedWeight(weight_t.t())
            took_packed = best_time(lambda: weight.gemm(a))
            line += f" {took_packed * 1e6:10.1f} {rows * k * n / took_packed / 1e9:8.1f}"
        if amx and n % 32 == 0 and k % 64 == 0:  # the kernels' own tiles, on one thread, rows padded to 32
            tiles, padded = kernels.amx_pack(weight_t.t()), torch.cat([a, a.new_zeros(-rows % 32, k)])
            took_amx = best_time(lambda: kernels.amx_gemm(padded, tiles))
            line += f" {took_amx * 1e6:12.1f} {rows * k * n / took_amx / 1e9:8.1f}"
        print(line)
        if name == "lm_head":
            chunks = [weight_t[:, i:i + chunk] for i in range(0, n, chunk)]
            took = best_time(lambda: [torch._int_mm(a, c) for c in chunks])
            print(f"  {'  chunked':10s} {f'{len(chunks)}x{chunk}':>12s} {took * 1e6:9.1f} "
                  f"{rows * k * n / took / 1e9:8.1f}")
        else:
            took *= config.num_hidden_layers
        total += took
    print(f"  all GEMMs of one decode step ({config.num_hidden_layers} layers, chunked LM head): {total * 1e3:.1f} ms")


class Timers:
    """Seconds and calls per (label, whether inside _decode)."""

    def __init__(self):
        self.seconds = defaultdict(float)
        self.calls = defaultdict(int)
        self.in_decode = False

    def wrap(self, fn, label):
        def timed(*args, **kwargs):
            key = (label, self.in_decode)
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[key] += time.perf_counter() - started
                self.calls[key] += 1
        return timed


class _Proxy:
    """A compiled kernel module with some of its functions timed (pybind modules take no attributes)."""

    def __init__(self, module, timers, labels: dict):
        self._module = module
        for name, label in labels.items():
            if hasattr(module, name):
                setattr(self, name, timers.wrap(getattr(module, name), label))

    def __getattr__(self, name):
        return getattr(self._module, name)


def instrument(backend) -> Timers:
    """Wraps the parts of a step; works on the shipped backend and on bench/baseline_continuous.py."""
    timers = Timers()
    module = sys.modules[type(backend).__module__]
    for layer in backend.layers:
        if getattr(layer, "kernels", None) is not None:  # the MLP in one call
            layer.kernels = _Proxy(layer.kernels, timers, {"mlp_int8": "mlp"})
        for role in ("qkv", "o", "gate_up", "down"):
            linear = getattr(layer, role)
            for method in ("fused", "forward"):
                if hasattr(linear, method):
                    setattr(linear, method, timers.wrap(getattr(linear, method), role))
    head = backend.model.lm_head
    head.forward = timers.wrap(head.forward, "lm_head")  # Int8Linear.forward calls its fused kernel
    if getattr(head, "kernels", None) is not None:  # the fused LM head and top-k
        head.kernels = _Proxy(head.kernels, timers, {"lm_head_topk": "lm_head"})
    if getattr(backend, "attention_kernel", None) is not None:
        backend.attention_kernel = _Proxy(backend.attention_kernel, timers, {"decode_attention": "attention"})
    for name in ("sample_tokens", "next_token_candidates", "draw"):
        if hasattr(module, name):
            setattr(module, name, timers.wrap(getattr(module, name), "sampler"))
    backend._prefill = timers.wrap(backend._prefill, "prefill")
    decode = backend._decode

    def in_decode(*args, **kwargs):
        timers.in_decode = True
        try:
            return decode(*args, **kwargs)
        finally:
            timers.in_decode = False
    backend._decode = timers.wrap(in_decode, "decode")
    return timers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/base")
    parser.add_argument("--backend", default="continuous-int8",
                        help="continuous-int8, continuous-int8@baseline (bench/baseline_continuous.py)")
    parser.add_argument("--prompts", type=int, default=0, help="HumanEval train-split prompts (0: all)")
    parser.add_argument("--max-new-tokens", type=int, default=0, help="0: params' sample.max_new_tokens")
    parser.add_argument("--slots", type=int, default=0, help="0: params' sample.slots")
    parser.add_argument("--chunk", type=int, default=2048, help="LM head columns per GEMM in the roofline")
    parser.add_argument("--roofline-only", action="store_true")
    args = parser.parse_args()

    from transformers import AutoConfig

    params = load_params() if Path("params.yaml").exists() else load_params(REPO / "params.yaml")
    cfg = sampling_decoding(params.sample, next(iter(params.sample.configs)))
    cfg = cfg.model_copy(update={k: v for k, v in (("max_new_tokens", args.max_new_tokens), ("slots", args.slots)) if v})
    train, _ = split_problems(load_problems("humaneval"), 0.4, 0)  # bench_sampling's workload
    train = train[:args.prompts or None]
    config = AutoConfig.from_pretrained(args.model)
    roofline(config, min(cfg.slots, cfg.batch_size, len(train) * cfg.n), args.chunk)
    if args.roofline_only:
        return 0

    from bench.bench_sampling import load_baseline, plan
    from tasks.sampling.backends import batch_seed, load_backend

    backend = load_baseline(args.backend, args.model) if args.backend.endswith("@baseline") \
        else load_backend(args.backend, args.model)
    prompts = [backend.encode_chat(chat_messages(p)) for p in train]
    batches = plan(prompts, cfg.n, cfg.batch_size)
    backend.generate_batch([prompts[r] for r in batches[0]], cfg, seed=batch_seed(cfg.seed, 0))  # warm-up
    timers = instrument(backend)
    generate = timers.wrap(backend.generate_batch, "wall")
    outs = generate([prompts[r] for r in batches[0]], cfg, seed=batch_seed(cfg.seed, 0))
    tokens = sum(o.num_tokens for o in outs)
    sec = timers.seconds
    steps = max(timers.calls[("decode", False)], 1)
    wall = sec[("wall", False)]
    print(f"\n{args.backend}: {len(outs)} sequences (slots {min(cfg.slots, len(outs))}), {tokens} tokens in "
          f"{wall:.1f}s ({tokens / wall:.1f} tok/s), {steps} decode steps; {torch.get_num_threads()} threads")
    inside = {label: seconds for (label, decode), seconds in sec.items() if decode}
    outside = {label: seconds for (label, decode), seconds in sec.items() if not decode}
    decode = outside.pop("decode")
    rows = [(f"GEMM {role}" + (" (+ top-k where fused)" if role == "lm_head" else ""), inside.pop(role, 0.0))
            for role in SHAPES]
    rows.insert(4, ("MLP in one call (gate_up and down: mlp_int8)", inside.pop("mlp", 0.0)))
    rows.append(("attention kernel (RoPE, cache write, attention)", inside.pop("attention", 0.0)))
    rows.append(("sampler's top-k on logits, in _decode", inside.pop("sampler", 0.0)))
    rows.append(("rest of _decode (embedding, rotary, norms, glue)", decode - sum(s for _, s in rows)))
    rows.append(("sampler (top-p, inverse CDF; top-k of admitted rows)", outside.pop("sampler", 0.0)))
    prefill = outside.pop("prefill", 0.0)
    rows.append(("batch loop's Python (uniforms' draws, slot bookkeeping)",
                 outside.pop("wall") - decode - prefill - rows[-1][1]))
    print(f"  {'part':58s} {'ms/step':>8s} {'share':>6s}")
    for label, seconds in rows:
        print(f"  {label:58s} {seconds / steps * 1e3:8.2f} {seconds / wall:6.1%}")
    print(f"  {'prefill (not per step)':58s} {'':8s} {prefill / wall:6.1%}")
    print(f"  {'decode step in all':58s} {decode / steps * 1e3:8.2f} {decode / wall:6.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
