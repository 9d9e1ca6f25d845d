"""The `continuous` and `continuous-int8` sampling backends: the reference model's weights,
decoded the way an inference server decodes, on a CPU budget.

What makes it fast (numbers in README, from bench/bench_sampling.py):
- continuous batching: up to `slots` sequences decode together; one that ends leaves at
  once and the next waiting sequence takes its slot, so the batch stays full;
- a preallocated KV cache per layer, [slots, kv_heads, capacity, head_dim], written in
  place and read contiguously (no torch.cat per step), and grouped-query attention done as
  two batched matmuls without repeating K/V per head: for one query token, torch's CPU
  SDPA kernel spends most of a decode step on what is a matrix-vector product;
- q/k/v and gate/up projections fused into one GEMM each;
- a sampler that works on the top-k candidates instead of sorting the vocabulary;
- `continuous-int8` only: W8A8 GEMMs (see Int8Linear), about 2x bf16's on VNNI cores.

Semantics are the reference backend's (this is its subclass): the chat template, the
weights in bf16 (or int8), prompts prefilled by the HF model itself, temperature -> top-k -> top-p
-> min-p with transformers' warper rules (ties at the k-th logit kept; top-p removes the
tokens whose ascending cumulative mass is <= 1 - top_p; min-p against the top token), an
EOS ends a sequence and counts in num_tokens, at most max_new_tokens.

Seeds: every sequence draws its uniforms from its own generator, seeded from (batch seed,
its index in the batch), so its random draws do not depend on `slots` or on which other
sequences share its steps, and a batch's samples depend only on (prompts, config, seed).

Supported models: decoders built like Llama (llama, mistral without a sliding window in
reach, qwen2, qwen3 and the like: q/k/v/o projections, RMSNorm, a gated MLP). Anything else
is refused with an error that names the backend key, never decoded approximately.
"""
from __future__ import annotations

from collections import deque
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tasks.config import DecodingConfig, ParamsError
from tasks.generation import Completion, TransformersBackend

CAPACITY_STEP = 64  # KV positions added at a time; attention reads the whole capacity


class _Layer(torch.nn.Module):
    """One decoder layer's projections, q/k/v and gate/up fused into one GEMM each."""

    def __init__(self, layer):
        super().__init__()
        attn, mlp = layer.self_attn, layer.mlp
        self.input_norm, self.post_norm = layer.input_layernorm, layer.post_attention_layernorm
        self.qkv = _fused([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o = attn.o_proj
        self.q_norm, self.k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        self.gate_up = _fused([mlp.gate_proj, mlp.up_proj])
        self.down = mlp.down_proj
        self.act = mlp.act_fn
        self.scaling = attn.scaling


def _rms_norm(norm, x: torch.Tensor) -> torch.Tensor:
    """An HF RMSNorm module's computation (in fp32, weight applied in x's dtype) as one kernel."""
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)
    return F.rms_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype) * norm.weight


def _fused(projections: list[torch.nn.Linear]) -> torch.nn.Linear:
    weight = torch.cat([p.weight for p in projections])
    fused = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=any(p.bias is not None for p in projections),
                            dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        fused.weight.copy_(weight)
        if fused.bias is not None:
            fused.bias.copy_(torch.cat([p.bias if p.bias is not None else p.weight.new_zeros(p.out_features)
                                        for p in projections]))
    return fused


class Int8Linear(torch.nn.Module):
    """W8A8: int8 weights per output channel, activations quantized per token at run time,
    int8 x int8 -> int32 GEMM (torch._int_mm, VNNI on x86). Per-token activation scales keep
    the outlier channels of one token from costing every other token its precision, which a
    per-tensor scale (torch's dynamic quantization) does: that made SmolLM2 unusable (mean TV
    0.5 per token) where this costs 0.05."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(1).clamp(min=1e-12) / 127
        self.register_buffer("weight_t", (weight / scale[:, None]).round().to(torch.int8).t())
        self.register_buffer("scale", scale)
        self.bias = None if linear.bias is None else linear.bias.detach().float()
        self.out_features = linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).float()
        token_max = flat.abs().amax(-1, keepdim=True).clamp_(min=1e-12)  # (linalg's inf-norm is 10x slower)
        quantized = (flat * (127 / token_max)).round_().to(torch.int8)
        out = torch._int_mm(quantized, self.weight_t).float().mul_(token_max / 127).mul_(self.scale)
        if self.bias is not None:
            out += self.bias
        return out.view(*x.shape[:-1], self.out_features).to(x.dtype)


def _to_int8(module: torch.nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, torch.nn.Linear):
            setattr(module, name, Int8Linear(child))
        else:
            _to_int8(child)


def _check_architecture(model) -> None:
    config = model.config
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    needed = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "input_layernorm", "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj",
              "mlp.down_proj", "mlp.act_fn")

    def has(module, dotted):
        for part in dotted.split("."):
            module = getattr(module, part, None)
        return module is not None

    if layers is None or not all(has(layer, n) for layer in layers for n in needed) \
            or not hasattr(inner, "rotary_emb") or not hasattr(inner, "embed_tokens"):
        raise ParamsError(f"backend continuous: model type {config.model_type!r} is not a Llama-style decoder; "
                          "set sample.backend / evaluate.backend to transformers")


class _KVCache:
    """Keys and values of every slot, [slots, kv_heads, capacity, head_dim] per layer."""

    def __init__(self, layers: int, slots: int, kv_heads: int, head_dim: int, capacity: int, dtype):
        self.k = [torch.zeros(slots, kv_heads, capacity, head_dim, dtype=dtype) for _ in range(layers)]
        self.v = [torch.zeros_like(t) for t in self.k]

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def grow(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        extra = -(-(needed - self.capacity) // CAPACITY_STEP) * CAPACITY_STEP
        self.k = [F.pad(t, (0, 0, 0, extra)) for t in self.k]
        self.v = [F.pad(t, (0, 0, 0, extra)) for t in self.v]

    def keep(self, rows: torch.Tensor) -> None:
        self.k = [t.index_select(0, rows) for t in self.k]
        self.v = [t.index_select(0, rows) for t in self.v]


def sample_tokens(logits: torch.Tensor, cfg: DecodingConfig, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row of fp32 `logits`, by inverse CDF at `uniforms` (one per row, in [0, 1))."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    x = logits / cfg.temperature
    vocab = x.shape[-1]
    if cfg.top_k and cfg.top_k < vocab:
        vals, idx = torch.topk(x, cfg.top_k)
        kth = vals[:, -1:]
        # TopKLogitsWarper keeps every token tied with the k-th: take them all.
        width = int((x >= kth).sum(-1).max())
        if width > cfg.top_k:
            vals, idx = torch.topk(x, width)
            vals = vals.masked_fill(vals < kth, float("-inf"))
    else:
        vals, idx = torch.sort(x, descending=True)
    if cfg.top_p < 1.0:
        probs = torch.softmax(vals, -1)
        at_or_below = probs.flip(-1).cumsum(-1).flip(-1)  # TopPLogitsWarper's ascending cumsum
        remove = at_or_below <= 1 - cfg.top_p
        remove[:, 0] = False
        vals = vals.masked_fill(remove, float("-inf"))
    if cfg.min_p > 0.0:
        probs = torch.softmax(vals, -1)
        remove = probs < cfg.min_p * probs[:, :1]
        remove[:, 0] = False
        vals = vals.masked_fill(remove, float("-inf"))
    cdf = torch.softmax(vals, -1).cumsum(-1)
    # right=True never lands on a removed (zero-mass) candidate.
    choice = torch.searchsorted(cdf, (uniforms * cdf[:, -1]).unsqueeze(-1), right=True)
    choice = choice.clamp(max=vals.shape[-1] - 1)
    return idx.gather(-1, choice).squeeze(-1)


def sequence_seed(batch_seed: int, index: int) -> int:
    return int(np.random.SeedSequence([batch_seed % (1 << 63), index]).generate_state(2, np.uint64)[0] >> 1)


class ContinuousBackend(TransformersBackend):
    name = "continuous"

    quantized = False

    def __init__(self, model_dir: str | Path, dtype: torch.dtype | None = None):
        # int8 GEMMs dequantize to fp32; the plain variant runs in bf16 like the reference
        # (dtype: float32 for exact comparisons in tests).
        super().__init__(model_dir, dtype or (torch.float32 if self.quantized else torch.bfloat16))
        # A CPU backend (int8 GEMMs through VNNI, the cache layout chosen for CPU caches): on a
        # GPU machine it still runs here; GPUs have vllm.
        self.device = torch.device("cpu")
        self.model.to(self.device)
        # bf16 K/V halve the memory traffic that bounds attention.
        self.kv_dtype = torch.bfloat16 if self.quantized else self.model.dtype
        _check_architecture(self.model)
        config = self.model.config
        self.inner = self.model.model
        self.layers = torch.nn.ModuleList(_Layer(layer) for layer in self.inner.layers)
        if self.quantized:
            # The HF model too, so that prefill and decode use the same int8 weights.
            for module in (self.layers, self.model):
                _to_int8(module)
        attn = self.inner.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        window = getattr(config, "sliding_window", None)
        self.window = window if window and getattr(config, "use_sliding_window", True) is not False else None

    def _prefill(self, prompt: list[int]):
        """The HF model's own forward over one prompt: (first-token logits, keys, values per
        layer). One prompt per forward: batching prompts measured no faster (prefill is bound
        by its GEMMs) and would need padding."""
        out = self.model(input_ids=torch.tensor([prompt], device=self.device), use_cache=True, logits_to_keep=1)
        layers = (out.cache if hasattr(out, "cache") else out.past_key_values).layers  # renamed in transformers 5.x
        return out.logits[0, -1].float(), [layer.keys[0] for layer in layers], [layer.values[0] for layer in layers]

    def _decode(self, cache: _KVCache, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One token for every slot at its position; the logits, [slots, vocab] fp32.

        Written for few tensor ops per layer: at ~100 rows an op costs as much in dispatch
        as in arithmetic, so q and k are rotated together and norms are single kernels."""
        slots = tokens.shape[0]
        heads, kv_heads, head_dim, kv_dtype = self.heads, self.kv_heads, self.head_dim, self.kv_dtype
        x = self.inner.embed_tokens(tokens)
        cos, sin = self.inner.rotary_emb(x, positions[:, None])  # [slots, 1, head_dim]: broadcast over heads
        # rotate_half(t) * sin == roll(t, half) * [-sin_a, sin_b] for sin = [sin_a, sin_b].
        half = head_dim // 2
        sin = torch.cat([-sin[..., :half], sin[..., half:]], -1)
        visible = torch.arange(cache.capacity, device=self.device)[None, :] <= positions[:, None]
        bias = torch.zeros(visible.shape, device=self.device).masked_fill_(~visible, float("-inf"))[:, None, None]
        rows = torch.arange(slots, device=self.device)
        qk_width = (heads + kv_heads) * head_dim
        for i, layer in enumerate(self.layers):
            qkv = layer.qkv(_rms_norm(layer.input_norm, x))
            qk = qkv[:, :qk_width].view(slots, heads + kv_heads, head_dim)
            if layer.q_norm is not None:
                qk = torch.cat([_rms_norm(layer.q_norm, qk[:, :heads]), _rms_norm(layer.k_norm, qk[:, heads:])], 1)
            qk = qk * cos + qk.roll(half, -1) * sin
            cache.k[i][rows, :, positions] = qk[:, heads:].to(kv_dtype)
            cache.v[i][rows, :, positions] = qkv[:, qk_width:].view(slots, kv_heads, head_dim).to(kv_dtype)
            # Grouped-query attention: the query heads of one K/V head share a matmul.
            q = (qk[:, :heads] * layer.scaling).to(kv_dtype).view(slots, kv_heads, heads // kv_heads, head_dim)
            weights = torch.softmax(torch.matmul(q, cache.k[i].transpose(-1, -2)) + bias, -1).to(kv_dtype)
            attended = torch.matmul(weights, cache.v[i]).view(slots, heads * head_dim).to(x.dtype)
            x = x + layer.o(attended)
            gate, up = layer.gate_up(_rms_norm(layer.post_norm, x)).chunk(2, -1)
            x = x + layer.down(layer.act(gate) * up)
        return self.model.lm_head(_rms_norm(self.inner.norm, x)).float()

    @torch.inference_mode()
    def generate_batch(self, prompts: list[list[int]], cfg: DecodingConfig, seed: int) -> list[Completion]:
        longest = max(len(p) for p in prompts) + cfg.max_new_tokens
        if self.window is not None and longest > self.window:
            raise ParamsError(f"backend continuous: prompt + max_new_tokens ({longest}) exceeds the model's "
                              f"sliding window ({self.window}); use backend transformers")
        slots = min(cfg.slots, len(prompts))
        generators = [torch.Generator().manual_seed(sequence_seed(seed, j)) for j in range(len(prompts))]
        waiting = deque(range(len(prompts)))
        tokens: list[list[int]] = [[] for _ in prompts]
        finish = ["length"] * len(prompts)
        cache = _KVCache(len(self.layers), slots, self.kv_heads, self.head_dim,
                         CAPACITY_STEP * -(-(max(len(p) for p in prompts) + 1) // CAPACITY_STEP), self.kv_dtype)
        slot_seq: list[int | None] = [None] * slots  # which sequence a slot holds
        positions = torch.zeros(slots, dtype=torch.long)
        logits = torch.zeros(slots, self.model.config.vocab_size)
        while True:
            free = [s for s, j in enumerate(slot_seq) if j is None]
            admitted = [(s, waiting.popleft()) for s in free[:len(waiting)]]
            if admitted:
                # A prompt's n samples share one prefill.
                prefilled = {key: self._prefill(list(key))
                             for key in dict.fromkeys(tuple(prompts[j]) for _, j in admitted)}
                cache.grow(max(len(prompts[j]) for _, j in admitted) + 1)
                for s, j in admitted:
                    first, keys, values = prefilled[tuple(prompts[j])]
                    for i in range(len(self.layers)):
                        cache.k[i][s, :, :len(prompts[j])] = keys[i]
                        cache.v[i][s, :, :len(prompts[j])] = values[i]
                    logits[s], positions[s], slot_seq[s] = first, len(prompts[j]), j
                del prefilled
            live = [s for s, j in enumerate(slot_seq) if j is not None]
            if not live:
                break
            uniforms = torch.stack([torch.rand((), generator=generators[slot_seq[s]]) for s in live])
            chosen = sample_tokens(logits[live], cfg, uniforms).tolist()
            feed = torch.zeros(len(slot_seq), dtype=torch.long)
            for s, tok in zip(live, chosen):
                j = slot_seq[s]
                if tok in self.eos:
                    finish[j], slot_seq[s] = "eos", None
                    continue
                tokens[j].append(tok)
                if len(tokens[j]) == cfg.max_new_tokens:
                    slot_seq[s] = None
                else:
                    feed[s] = tok
            if all(j is None for j in slot_seq) and not waiting:
                break
            empty = sum(j is None for j in slot_seq)
            if not waiting and empty * 4 >= len(slot_seq):
                # Nothing left to admit: drop the empty slots instead of decoding them.
                keep = torch.tensor([s for s, j in enumerate(slot_seq) if j is not None])
                cache.keep(keep)
                feed, positions = feed[keep], positions[keep]
                slot_seq = [slot_seq[s] for s in keep.tolist()]
            busy = torch.tensor([j is not None for j in slot_seq])
            if not busy.any():
                continue  # every slot just ended; admit the waiting sequences
            cache.grow(int(positions.max()) + 1)
            logits = self._decode(cache, feed, positions)
            positions = positions + busy.long()
        return [Completion(self.tokenizer.decode(t, skip_special_tokens=True), len(t) + (f == "eos"), f)
                for t, f in zip(tokens, finish)]


class ContinuousInt8Backend(ContinuousBackend):
    name = "continuous-int8"
    quantized = True
