"""The `continuous` and `continuous-int8` sampling backends: the reference model's weights,
decoded the way an inference server decodes, on a CPU budget.

What makes it fast (numbers in docs/results/sampling.md, from bench/bench_sampling.py):
- continuous batching: up to `slots` sequences decode together; one that ends leaves at
  once and the next waiting sequence takes its slot, so the batch stays full;
- a preallocated KV cache per layer, written in place (no torch.cat per step); for
  `continuous-int8` with the kernels, in int8 with a scale per position and K/V head;
- fused C++ kernels (tasks/sampling/cpu_kernels.cpp, compiled for this CPU on first use): one call
  per decode step and layer does RoPE, the cache write and grouped-query attention, reading
  each slot's K/V only up to its own position; one call per int8 linear does the norm or the
  SiLU gate before it, the quantization, the GEMM, the dequantization and the residual add.
  Eager PyTorch dispatched ~50 small ops per layer and step, and its attention matmuls read
  every slot up to the longest one. Where no compiler is found, the same arithmetic runs as
  PyTorch ops (`_eager_attention`, Int8Linear.forward), about half as fast;
- q/k/v and gate/up projections fused into one GEMM each;
- prefill: the batch's common prompt prefix (the chat template's system turn and the task's
  instructions) computed once, the rest of the prompts concatenated into ~2k-token forwards;
- a sampler that works on the top-k candidates instead of sorting the vocabulary; for
  `continuous-int8` with the kernels, the LM head computes them itself (lm_head_topk: the
  vocabulary in 2,048-column GEMMs, each filtered while in cache), with no logits tensor;
- `continuous-int8` only: W8A8 GEMMs (see Int8Linear), about 2x bf16's on VNNI cores: on Intel
  AMX, the kernels' own tile GEMMs, each linear (and each MLP, mlp_int8) one parallel region
  with the quantization and dequantization around it; elsewhere oneDNN on weights packed once;
  either only where it gives torch._int_mm's products exactly; prefill's attention in bf16.

Semantics are the reference backend's (this is its subclass): the chat template, the
weights in bf16 (or int8), the HF model's embedding, rotary embedding, norms and attention
arithmetic, temperature -> top-k -> top-p -> min-p with transformers' warper rules (ties at
the k-th logit kept; top-p removes the tokens whose ascending cumulative mass is <= 1 - top_p;
min-p against the top token), an EOS ends a sequence and counts in num_tokens, at most
max_new_tokens.

Seeds: every sequence draws its uniforms from its own generator, seeded from (batch seed,
its index in the batch), so its random draws do not depend on `slots` or on which other
sequences share its steps, and a batch's samples depend only on (prompts, config, seed).

Supported models: decoders built like Llama (llama, mistral without a sliding window in
reach, qwen2, qwen3: q/k/v/o projections, RMSNorm, a gated MLP). Anything else is refused
with an error that names the backend key, never decoded approximately.
"""
from __future__ import annotations

import os
from collections import deque
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tasks.core.config import DecodingConfig, ParamsError
from tasks.sampling import cpu_kernels
from tasks.sampling.backend_transformers import TransformersBackend
from tasks.sampling.backends import Completion, sequence_seed

CAPACITY_STEP = 64  # KV positions added at a time (the eager path reads the whole capacity)
BLOCK = 16  # positions per block of the fused kernel's K layout
MIN_SHARED_PREFIX = 8  # prompt tokens in common worth a prefill of their own
LLAMA_STYLE = ("llama", "mistral", "qwen2", "qwen3")  # model types decoded with Llama's arithmetic
PREFILL_TOKENS = 2048  # prompt tokens per prefill forward: big GEMMs, activations that fit in cache
LM_HEAD_CHUNK = 2048  # vocabulary columns per GEMM of the fused LM head (lm_head_topk)
MLP_BLOCK_ROWS = 128  # rows per block of the fused prefill MLP (mlp_int8); fewer rows than twice this: linear_int8


class _Layer(torch.nn.Module):
    """One decoder layer's projections, q/k/v and gate/up fused into one GEMM each, and the
    three steps around attention. For int8 layers with the fused kernels, each step is one
    call: the norm, the SiLU gate and the residual add happen inside the int8 linear."""

    def __init__(self, layer, hidden_act: str):
        super().__init__()
        attn, mlp = layer.self_attn, layer.mlp
        self.input_norm, self.post_norm = layer.input_layernorm, layer.post_attention_layernorm
        self.qkv = _fused([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o = attn.o_proj
        self.q_norm, self.k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        self.gate_up = _fused([mlp.gate_proj, mlp.up_proj])
        self.down = mlp.down_proj
        self.act = mlp.act_fn
        self.silu = hidden_act in ("silu", "swish")  # what the fused kernel computes
        self.scaling = attn.scaling
        self.kernels = None  # the compiled module, once the projections are int8 (_to_int8)
        # mlp_int8's shapes: no biases, widths in 16-lane vectors.
        self.fits_mlp_kernel = self.gate_up.bias is None and self.down.bias is None \
            and self.down.in_features % 16 == 0 and self.down.out_features % 16 == 0

    def project_qkv(self, x: torch.Tensor) -> torch.Tensor:
        """qkv(input_norm(x))"""
        if self.kernels is None:
            return self.qkv(_rms_norm(self.input_norm, x))
        return self.qkv.fused(self.kernels, x, norm=self.input_norm)

    def attention_out(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """x + o(attended)"""
        if self.kernels is None:
            return x + self.o(attended.to(x.dtype))
        return self.o.fused(self.kernels, attended, residual=x)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        """x + down(act(gate) * up), gate and up from gate_up(post_norm(x))"""
        if self.kernels is None:
            gate, up = self.gate_up(_rms_norm(self.post_norm, x)).chunk(2, -1)
            return x + self.down(self.act(gate) * up)
        amx = self.gate_up.amx is not None and self.down.amx is not None
        if self.silu and self.fits_mlp_kernel and (amx or x.shape[0] >= 2 * MLP_BLOCK_ROWS):
            # One call: with AMX weights, any rows; else prefill's, block by block of rows.
            return self.kernels.mlp_int8(x.float().contiguous(), self.post_norm.weight, _eps(self.post_norm),
                                         self.gate_up.weight_t, self.gate_up.scale, self.down.weight_t,
                                         self.down.scale, MLP_BLOCK_ROWS, self.gate_up.packed, self.down.packed,
                                         self.gate_up.amx, self.down.amx)
        gate_up = self.gate_up.fused(self.kernels, x, norm=self.post_norm)
        if not self.silu:
            gate, up = gate_up.chunk(2, -1)
            return self.down.fused(self.kernels, self.act(gate) * up, residual=x)
        return self.down.fused(self.kernels, gate_up, gated=True, residual=x)


def _eps(norm) -> float:
    """An HF RMSNorm module's epsilon (its attribute's name differs between models)."""
    return getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)


def _rms_norm(norm, x: torch.Tensor) -> torch.Tensor:
    """An HF RMSNorm module's computation (in fp32, weight applied in x's dtype) as one kernel."""
    return F.rms_norm(x.float(), x.shape[-1:], eps=_eps(norm)).to(x.dtype) * norm.weight


def _chunks(prompts: list, tokens: int) -> list[list]:
    """Consecutive groups of prompts of about `tokens` tokens together (at least one each)."""
    groups, size = [[]], 0
    for prompt in prompts:
        if groups[-1] and size + len(prompt) > tokens:
            groups, size = groups + [[]], 0
        groups[-1].append(prompt)
        size += len(prompt)
    return groups


def _put_rows(candidates: tuple, rows: list[int], new: tuple) -> tuple:
    """next_token_candidates' (values, ids, argmax) with rows `rows` replaced by `new`'s; the
    narrower of the two is padded with (-inf, 0) candidates, which carry no mass."""
    vals, ids, argmax = candidates
    new_vals, new_ids, new_argmax = new
    width = max(vals.shape[1], new_vals.shape[1])
    vals, new_vals = (F.pad(t, (0, width - t.shape[1]), value=float("-inf")) for t in (vals, new_vals))
    ids, new_ids = (F.pad(t, (0, width - t.shape[1])) for t in (ids, new_ids))
    vals, ids, argmax = vals.clone(), ids.clone(), argmax.clone()
    index = torch.tensor(rows)
    vals[index], ids[index], argmax[index] = new_vals, new_ids, new_argmax
    return vals, ids, argmax


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], -1)


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

    def __init__(self, linear: torch.nn.Linear, kernels=None, pack: bool = True):
        super().__init__()
        self.kernels = kernels  # tasks.cpu_kernels' module, or None: eager PyTorch
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(1).clamp(min=1e-12) / 127
        self.register_buffer("weight_t", (weight / scale[:, None]).round().to(torch.int8).t())
        # The same int8 weight in the layout of the kernels' AMX tiles, or else packed for oneDNN's
        # matmul, where either computes _int_mm's products exactly (checked once per process): the
        # fused kernels' GEMMs then skip re-packing it.
        out_features, in_features = linear.weight.shape
        self.amx = kernels.amx_pack(self.weight_t.t()) if kernels is not None and out_features % 32 == 0 \
            and in_features % 64 == 0 and cpu_kernels.amx_tiles(kernels) else None
        self.packed = kernels.PackedWeight(self.weight_t.t()) \
            if pack and self.amx is None and kernels is not None and cpu_kernels.packed_gemm(kernels) else None
        self.register_buffer("scale", scale)
        self.bias = None if linear.bias is None else linear.bias.detach().float()
        self.out_features = linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels is not None:
            return self.fused(self.kernels, x).to(x.dtype)
        flat = x.reshape(-1, x.shape[-1]).float()
        token_max = flat.abs().amax(-1, keepdim=True).clamp_(min=1e-12)  # (linalg's inf-norm is 10x slower)
        quantized = (flat * (127 / token_max)).round_().to(torch.int8)
        out = torch._int_mm(quantized, self.weight_t).float().mul_(token_max / 127).mul_(self.scale)
        if self.bias is not None:
            out += self.bias
        return out.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def fused(self, kernels, x: torch.Tensor, norm=None, gated: bool = False, residual=None) -> torch.Tensor:
        """forward's arithmetic in one kernel call (fp32 out), with what makes its input fused
        in: an RMSNorm module's `norm`, or `gated` (x is gate and up: the input is
        silu(gate) * up); `residual` is added to the output."""
        flat = x.reshape(-1, x.shape[-1]).float().contiguous()
        eps = _eps(norm) if norm is not None else 0.0
        out = kernels.linear_int8(flat, self.weight_t, self.scale, self.bias,
                                  norm.weight if norm is not None else None, eps, gated,
                                  None if residual is None else residual.reshape(-1, self.out_features).float(),
                                  self.packed, self.amx)
        return out.view(*x.shape[:-1], self.out_features)


def _to_int8(module: torch.nn.Module, kernels) -> None:
    for name, child in module.named_children():
        if isinstance(child, torch.nn.Linear):
            setattr(module, name, Int8Linear(child, kernels))
        else:
            if isinstance(child, _Layer):
                child.kernels = kernels
            _to_int8(child, kernels)


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

    # By name as well as by shape: Gemma has these modules too, but scales its embeddings and
    # norms differently, and would be decoded wrongly without an error.
    if config.model_type not in LLAMA_STYLE or layers is None \
            or not all(has(layer, n) for layer in layers for n in needed) \
            or not hasattr(inner, "rotary_emb") or not hasattr(inner, "embed_tokens"):
        raise ParamsError(f"backend continuous: model type {config.model_type!r} is not a Llama-style decoder; "
                          "set sample.backend / evaluate.backend to transformers")


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each vector of x [..., head_dim] in int8 with its own scale, max |x| / 127: (int8 values,
    fp32 scales [...]). decode_attention (tasks/sampling/cpu_kernels.cpp) quantizes a decoded
    token's K/V the same way."""
    top = x.float().abs().amax(-1, keepdim=True).clamp_(min=1e-12)
    return (x.float() * (127 / top)).round_().to(torch.int8), (top / 127)[..., 0]


class _KVCache:
    """Keys and values of every slot, per layer. V: [slots, kv_heads, capacity, head_dim].
    K: the same, or with `blocked` (the fused kernel's layout) [slots, kv_heads, capacity / 16,
    head_dim, 16]: 16 positions stored dimension-major, so that their scores are 16-lane FMAs.
    dtype int8 (the fused kernel only): each position's K and V vector per head quantized with
    its own scale (quantize_kv), kept in k_scale / v_scale [slots, kv_heads, capacity]."""

    def __init__(self, layers: int, slots: int, kv_heads: int, head_dim: int, capacity: int, dtype,
                 blocked: bool = False):
        self.blocked = blocked
        self.quantized = dtype == torch.int8
        if self.quantized and not blocked:
            raise ValueError("an int8 K/V cache is read by the fused attention kernel only (blocked=True)")
        self.v = [torch.zeros(slots, kv_heads, capacity, head_dim, dtype=dtype) for _ in range(layers)]
        k_shape = (slots, kv_heads, capacity // BLOCK, head_dim, BLOCK) if blocked else self.v[0].shape
        self.k = [torch.zeros(k_shape, dtype=dtype) for _ in range(layers)]
        self.k_scale, self.v_scale = ([torch.zeros(slots, kv_heads, capacity) for _ in range(layers)]
                                      for _ in range(2)) if self.quantized else ([None] * layers, [None] * layers)

    @property
    def capacity(self) -> int:
        return self.v[0].shape[2]

    def grow(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        extra = -(-(needed - self.capacity) // CAPACITY_STEP) * CAPACITY_STEP
        self.v = [F.pad(t, (0, 0, 0, extra)) for t in self.v]
        self.k = [F.pad(t, (0, 0, 0, 0, 0, extra // BLOCK)) if self.blocked else F.pad(t, (0, 0, 0, extra))
                  for t in self.k]
        if self.quantized:
            self.k_scale, self.v_scale = ([F.pad(t, (0, extra)) for t in scales] for scales in (self.k_scale, self.v_scale))

    def keep(self, rows: torch.Tensor) -> None:
        self.k = [t.index_select(0, rows) for t in self.k]
        self.v = [t.index_select(0, rows) for t in self.v]
        if self.quantized:
            self.k_scale, self.v_scale = ([t.index_select(0, rows) for t in scales]
                                          for scales in (self.k_scale, self.v_scale))

    def write(self, slot: int, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """A prompt's keys and values, [kv_heads, length, head_dim], at positions 0..length-1."""
        length = keys.shape[1]
        if self.quantized:
            (keys, self.k_scale[layer][slot, :, :length]), (values, self.v_scale[layer][slot, :, :length]) = \
                quantize_kv(keys), quantize_kv(values)
        self.v[layer][slot, :, :length] = values
        if not self.blocked:
            self.k[layer][slot, :, :length] = keys
            return
        blocks = -(-length // BLOCK)
        padded = F.pad(keys, (0, 0, 0, blocks * BLOCK - length))
        self.k[layer][slot, :, :blocks] = padded.view(keys.shape[0], blocks, BLOCK, -1).transpose(-1, -2)


def top_candidates(x: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens the sampler draws from, per row of tempered fp32 logits `x`: (values, ids),
    ordered by value, descending, then by id. With 0 < top_k < vocab, the top k and every token
    tied with the k-th (transformers' TopKLogitsWarper keeps them all), padded with -inf to the
    widest row; otherwise every token. lm_head_topk (tasks/sampling/cpu_kernels.cpp) computes the
    same candidates in the same order inside the LM head."""
    vocab = x.shape[-1]
    if not top_k or top_k >= vocab:
        return torch.sort(x, descending=True, stable=True)
    vals, idx = torch.topk(x, top_k)
    kth = vals[:, -1:]
    width = int((x >= kth).sum(-1).max())
    if width > top_k:
        vals, idx = torch.topk(x, width)
        vals = vals.masked_fill(vals < kth, float("-inf"))
    # topk leaves the order of equal values open: ids ascending within them.
    idx, order = idx.sort(-1)
    vals, order = vals.gather(-1, order).sort(dim=-1, descending=True, stable=True)
    return vals, idx.gather(-1, order)


def next_token_candidates(logits: torch.Tensor, cfg: DecodingConfig, temperatures: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What `draw` takes, per row of fp32 `logits`: (values, ids, argmax). The candidates are
    top_candidates of the logits over the row's temperature (`temperatures`, fp32 [rows], in
    place of cfg.temperature; a row at T=0 divides by 1 and takes its argmax); none (width 0)
    where every row is greedy."""
    argmax = logits.argmax(-1)
    if temperatures is None:
        if cfg.temperature == 0:
            return logits.new_empty(logits.shape[0], 0), argmax.new_empty(logits.shape[0], 0), argmax
        x = logits / cfg.temperature
    else:
        x = logits / temperatures.masked_fill(temperatures == 0, 1.0)[:, None]
    return *top_candidates(x, cfg.top_k), argmax


def draw(vals: torch.Tensor, idx: torch.Tensor, argmax: torch.Tensor, cfg: DecodingConfig, uniforms: torch.Tensor,
         temperatures: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row of next_token_candidates' output: top-p -> min-p on the candidates, then
    the inverse CDF at `uniforms` (one per row, in [0, 1)); rows at T=0 take their argmax."""
    if temperatures is None and cfg.temperature == 0:
        return argmax
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
    # right=True never lands on a removed (zero-mass) candidate; where uniform * total rounds up to
    # the total, the last candidate kept is taken, not a removed one after it.
    choice = torch.searchsorted(cdf, (uniforms * cdf[:, -1]).unsqueeze(-1), right=True)
    choice = torch.minimum(choice, (vals > float("-inf")).sum(-1, keepdim=True) - 1)
    sampled = idx.gather(-1, choice).squeeze(-1)
    return sampled if temperatures is None else torch.where(temperatures == 0, argmax, sampled)


def sample_tokens(logits: torch.Tensor, cfg: DecodingConfig, uniforms: torch.Tensor,
                  temperatures: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row of fp32 `logits`, by inverse CDF at `uniforms` (one per row, in [0, 1)).
    `temperatures`: one T per row (fp32), in place of cfg.temperature; rows at T=0 take the argmax."""
    return draw(*next_token_candidates(logits, cfg, temperatures), cfg, uniforms, temperatures)


class ContinuousBackend(TransformersBackend):
    name = "continuous"

    quantized = False

    def __init__(self, model_dir: str | Path, dtype: torch.dtype | None = None, kernels: bool = True):
        # int8 GEMMs dequantize to fp32; the plain variant runs in bf16 like the reference
        # (dtype: float32 for exact comparisons in tests).
        super().__init__(model_dir, dtype or (torch.float32 if self.quantized else torch.bfloat16))
        # A CPU backend (int8 GEMMs through VNNI, the cache layout chosen for CPU caches): on a
        # GPU machine it still runs here; GPUs have vllm.
        self.device = torch.device("cpu")
        self.model.to(self.device)
        _check_architecture(self.model)
        config = self.model.config
        self.inner = self.model.model
        # tasks/cpu_kernels.cpp compiled for this CPU, or None: the eager PyTorch path (no
        # compiler, or kernels=False: the tests compare the two).
        compiled = cpu_kernels.load() if kernels else None
        self.layers = torch.nn.ModuleList(_Layer(layer, getattr(config, "hidden_act", "")) for layer in self.inner.layers)
        if self.quantized:
            # Of the HF model only the embedding, the final norm and the output layer are used.
            _to_int8(self.layers, compiled)
            # The decode steps' head is lm_head_topk, in vocabulary chunks of its own: not packed for
            # oneDNN (its AMX layout, where taken, serves those chunks).
            self.model.lm_head = Int8Linear(self.model.lm_head, compiled, pack=False)
        attn = self.inner.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        window = getattr(config, "sliding_window", None)
        self.window = window if window and getattr(config, "use_sliding_window", True) is not False else None
        self.attention_kernel = compiled if compiled is not None and compiled.supports(
            self.heads, self.kv_heads, self.head_dim) else None
        # Reading K/V bounds attention at decode: continuous-int8 keeps them in int8 with a scale
        # per position and head (half of bf16's bytes) where the fused kernel reads them, in
        # bf16 otherwise; continuous keeps the model's dtype.
        self.kv_dtype = (torch.int8 if self.attention_kernel is not None else torch.bfloat16) if self.quantized \
            else self.model.dtype
        # Prefill's attention in bf16 for continuous-int8 (its activations are fp32): twice fp32's speed,
        # and its K/V are stored in 8 or 16 bits anyway.
        self.prefill_attention_dtype = torch.bfloat16 if self.quantized else self.model.dtype

    def _prefill(self, prompts: list[list[int]], prefix=None) -> list[tuple]:
        """Prompts through the decoder together: per prompt, (next-token logits, keys, values per
        layer, each [kv_heads, length, head_dim] in the model's dtype). `prefix`, the result
        for the prompts' common first tokens, is reused: only the rest is computed.

        The HF model's arithmetic (its embedding, rotary embedding, norms, causal attention
        through SDPA) with the fused projections of decode; HF's own forward spent two thirds
        of a prompt's time outside the GEMMs. The prompts' tokens are concatenated, not
        padded: every op but attention works row by row, so it is the same arithmetic as one
        prompt at a time, in fewer and larger GEMMs; attention runs per prompt."""
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        start = prefix[1][0].shape[1] if prefix else 0
        lengths = [len(p) - start for p in prompts]
        ends = np.cumsum(lengths).tolist()
        spans = [(end - n, end) for n, end in zip(lengths, ends)]
        x = self.inner.embed_tokens(torch.tensor([t for p in prompts for t in p[start:]]))
        positions = torch.cat([torch.arange(start, len(p)) for p in prompts])
        cos, sin = (t[0] for t in self.inner.rotary_emb(x, positions[None]))  # [tokens, head_dim]
        keys, values = [[] for _ in prompts], [[] for _ in prompts]
        cos, sin = cos[:, None], sin[:, None]  # [tokens, 1, head_dim]: broadcast over heads
        # After a prefix, query j (at position start + j) sees keys 0..start + j.
        masks = [torch.arange(start + b - a)[None, :] <= torch.arange(start, start + b - a)[:, None] if prefix else None
                 for a, b in spans]
        for i, layer in enumerate(self.layers):
            qkv = layer.project_qkv(x).unflatten(-1, (-1, head_dim))  # [tokens, heads + 2 kv_heads, head_dim]
            qk, v = qkv[:, :heads + kv_heads], qkv[:, heads + kv_heads:]
            if layer.q_norm is not None:
                qk = torch.cat([_rms_norm(layer.q_norm, qk[:, :heads]), _rms_norm(layer.k_norm, qk[:, heads:])], 1)
            qk = qk * cos + _rotate_half(qk) * sin  # q and k rotated together
            q, k, v = qk[:, :heads].transpose(0, 1), qk[:, heads:].transpose(0, 1), v.transpose(0, 1)  # [heads, tokens, hd]
            attended = []
            for p, (a, b) in enumerate(spans):
                k_p, v_p = k[:, a:b], v[:, a:b]
                if prefix:
                    k_p, v_p = torch.cat([prefix[1][i], k_p], 1), torch.cat([prefix[2][i], v_p], 1)
                keys[p].append(k_p)
                values[p].append(v_p)
                attended.append(F.scaled_dot_product_attention(
                    *(t[None].to(self.prefill_attention_dtype) for t in (q[:, a:b], k_p, v_p)), attn_mask=masks[p],
                    is_causal=not prefix, scale=layer.scaling, enable_gqa=True)[0])
            x = layer.attention_out(x, torch.cat(attended, 1).transpose(0, 1).reshape(x.shape[0], heads * head_dim)
                                    .to(x.dtype))
            x = layer.mlp(x)
        logits = self.model.lm_head(_rms_norm(self.inner.norm, x[[end - 1 for end in ends]])).float()
        return [(logits[p], keys[p], values[p]) for p in range(len(prompts))]

    def _decode(self, cache: _KVCache, tokens: torch.Tensor, positions: torch.Tensor, cfg: DecodingConfig,
                temperatures: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One token for every slot at its position; what the sampler draws from next, as
        next_token_candidates returns it (`temperatures`: the slots' own, or None: cfg's).

        Written for few tensor ops per layer: at ~100 rows an op costs as much in dispatch
        as in arithmetic. With the fused kernel (tasks/cpu_kernels.cpp), RoPE, the cache write
        and attention are one call that reads each slot's K/V only up to its own position;
        `_eager_attention` is the same arithmetic in PyTorch ops."""
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        x = self.inner.embed_tokens(tokens)
        cos, sin = self.inner.rotary_emb(x, positions[:, None])  # [slots, 1, head_dim]: broadcast over heads
        if self.attention_kernel is not None:
            cos, sin = cos[:, 0].float().contiguous(), sin[:, 0].float().contiguous()
        else:
            visible = torch.arange(cache.capacity)[None, :] <= positions[:, None]
            bias = torch.zeros(visible.shape).masked_fill_(~visible, float("-inf"))[:, None, None]
        for i, layer in enumerate(self.layers):
            qkv = layer.project_qkv(x)
            if layer.q_norm is not None:
                q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
                qkv = torch.cat([_rms_norm(layer.q_norm, q.unflatten(-1, (heads, head_dim))).flatten(-2),
                                 _rms_norm(layer.k_norm, k.unflatten(-1, (kv_heads, head_dim))).flatten(-2), v], -1)
            if self.attention_kernel is not None:
                attended = self.attention_kernel.decode_attention(qkv.float().contiguous(), cos, sin, positions,
                                                                  cache.k[i], cache.v[i], heads, layer.scaling,
                                                                  cache.k_scale[i], cache.v_scale[i])
            else:
                attended = self._eager_attention(layer, cache.k[i], cache.v[i], qkv, positions, cos, sin, bias)
            x = layer.mlp(layer.attention_out(x, attended))
        return self._next_token_candidates(_rms_norm(self.inner.norm, x), cfg, temperatures)

    def _next_token_candidates(self, x: torch.Tensor, cfg: DecodingConfig, temperatures: torch.Tensor | None):
        """next_token_candidates of the LM head's logits of the final-norm output `x`. For an
        int8 head with the kernels and a top-k to cut (or greedy rows only), one kernel call
        computes them inside the LM head, chunk by chunk, without a logits tensor."""
        head = self.model.lm_head
        vocab = self.model.config.vocab_size
        greedy = temperatures is None and cfg.temperature == 0
        if isinstance(head, Int8Linear) and head.kernels is not None and (greedy or 0 < cfg.top_k < vocab):
            if temperatures is None:
                temperatures = torch.full((x.shape[0],), cfg.temperature, dtype=torch.float32)
            return head.kernels.lm_head_topk(x.float().contiguous(), head.weight_t, head.scale, head.bias,
                                             temperatures.float().contiguous(), 0 if greedy else cfg.top_k,
                                             LM_HEAD_CHUNK, head.amx)
        return next_token_candidates(head(x).float(), cfg, temperatures)

    def _eager_attention(self, layer, k, v, qkv, positions, cos, sin, bias):
        slots, heads, kv_heads, head_dim = qkv.shape[0], self.heads, self.kv_heads, self.head_dim
        qk_width = (heads + kv_heads) * head_dim
        qk = qkv[:, :qk_width].view(slots, heads + kv_heads, head_dim)
        qk = qk * cos + _rotate_half(qk) * sin  # q and k rotated together
        rows = torch.arange(slots)
        k[rows, :, positions] = qk[:, heads:].to(self.kv_dtype)
        v[rows, :, positions] = qkv[:, qk_width:].view(slots, kv_heads, head_dim).to(self.kv_dtype)
        # Grouped-query attention: the query heads of one K/V head share a matmul.
        q = (qk[:, :heads] * layer.scaling).to(self.kv_dtype).view(slots, kv_heads, heads // kv_heads, head_dim)
        weights = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) + bias, -1).to(self.kv_dtype)
        return torch.matmul(weights, v).view(slots, heads * head_dim)

    @torch.inference_mode()
    def generate_batch(self, prompts: list[list[int]], cfg: DecodingConfig, seed: int,
                       progress=None, temperatures: list[float] | None = None) -> list[Completion]:
        longest = max(len(p) for p in prompts) + cfg.max_new_tokens
        if self.window is not None and longest > self.window:
            raise ParamsError(f"backend continuous: prompt + max_new_tokens ({longest}) exceeds the model's "
                              f"sliding window ({self.window}); use backend transformers")
        slots = min(cfg.slots, len(prompts))
        generators = [torch.Generator().manual_seed(sequence_seed(seed, j)) for j in range(len(prompts))]
        # One T per sequence (in place of cfg.temperature), indexed like `prompts`.
        per_sequence_t = None if temperatures is None else torch.tensor(temperatures, dtype=torch.float32)
        waiting = deque(range(len(prompts)))
        tokens: list[list[int]] = [[] for _ in prompts]
        finish = ["length"] * len(prompts)
        cache = _KVCache(len(self.layers), slots, self.kv_heads, self.head_dim,
                         CAPACITY_STEP * -(-(max(len(p) for p in prompts) + 1) // CAPACITY_STEP), self.kv_dtype,
                         blocked=self.attention_kernel is not None)
        slot_seq: list[int | None] = [None] * slots  # which sequence a slot holds
        # The chat template's system turn and the task's instructions: a quarter of the default
        # prompts' tokens. At least one token of every prompt is left to compute its logits.
        shared = min(len(os.path.commonprefix(prompts)), min(len(p) for p in prompts) - 1)
        prefix = self._prefill([prompts[0][:shared]])[0] if shared >= MIN_SHARED_PREFIX else None
        positions = torch.zeros(slots, dtype=torch.long)
        # What each slot draws its next token from: next_token_candidates' (values, ids, argmax).
        candidates = (torch.empty(slots, 0), torch.empty(slots, 0, dtype=torch.long),
                      torch.zeros(slots, dtype=torch.long))

        def slot_temperatures(rows: list[int | None]) -> torch.Tensor | None:
            """The T of the sequence in each slot (1 for an empty one), or None: cfg's for all."""
            if per_sequence_t is None:
                return None
            return per_sequence_t[[0 if j is None else j for j in rows]].masked_fill(
                torch.tensor([j is None for j in rows]), 1.0)

        while True:
            free = [s for s, j in enumerate(slot_seq) if j is None]
            admitted = [(s, waiting.popleft()) for s in free[:len(waiting)]]
            if admitted:
                # A prompt's n samples share one prefill, and every prompt the batch's common prefix.
                unique = list(dict.fromkeys(tuple(prompts[j]) for _, j in admitted))
                prefilled = {}
                for chunk in _chunks(unique, PREFILL_TOKENS):
                    prefilled.update(zip(chunk, self._prefill([list(key) for key in chunk], prefix)))
                cache.grow(max(len(prompts[j]) for _, j in admitted) + 1)
                for s, j in admitted:
                    _, keys, values = prefilled[tuple(prompts[j])]
                    for i in range(len(self.layers)):
                        cache.write(s, i, keys[i], values[i])
                    positions[s], slot_seq[s] = len(prompts[j]), j
                rows = [s for s, _ in admitted]
                first = torch.stack([prefilled[tuple(prompts[j])][0] for _, j in admitted]).float()
                candidates = _put_rows(candidates, rows, next_token_candidates(
                    first, cfg, slot_temperatures([slot_seq[s] for s in rows])))
                del prefilled, first
            live = [s for s, j in enumerate(slot_seq) if j is not None]
            if not live:
                break
            uniforms = torch.stack([torch.rand((), generator=generators[slot_seq[s]]) for s in live])
            rows = torch.tensor(live)
            chosen = draw(*(t.index_select(0, rows) for t in candidates), cfg, uniforms,
                          slot_temperatures([slot_seq[s] for s in live])).tolist()
            if progress:
                progress(len(chosen))
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
            candidates = self._decode(cache, feed, positions, cfg, slot_temperatures(slot_seq))
            positions = positions + busy.long()
        return [Completion(self.tokenizer.decode(t, skip_special_tokens=True), len(t) + (f == "eos"), f, tuple(t))
                for t, f in zip(tokens, finish)]


class ContinuousInt8Backend(ContinuousBackend):
    name = "continuous-int8"
    quantized = True
