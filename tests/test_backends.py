"""Sampling backends: fidelity to the reference distribution, and the shared semantics.

Fidelity: for fixed prompts, each backend draws many two-token continuations; their
empirical joint distribution is compared with the reference computed from the HF model's
fp32 logits (temperature -> top-k -> top-p -> min-p, written out independently below) by
total-variation distance. The threshold is the 99.99th percentile of the TV that sampling
noise alone gives at that sample size (simulated from the reference itself), so a correct
sampler passes and a sampler that is off by more than noise fails. A negative control shows
the threshold is tight enough to catch the likeliest bug (top-p before the temperature).

The model is a tiny random llama with a character-level tokenizer (one character per token,
so texts map back to tokens exactly) and a sharpened output layer, so that temperature,
top-k and top-p all cut real mass.
"""
from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

import ctranslate2
import numpy as np
import pytest
import torch
from conftest import CHATML, decoding, interrupted_run, save_tiny, tiny_llama

from tasks.core.config import DecodingConfig, ParamsError
from tasks.core.files import DataError
from tasks.sampling.backend_transformers import TransformersBackend
from tasks.sampling.backends import BACKENDS
from tasks.sampling.generate import Request, generate_jsonl

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHARS = list("\n abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;!?()[]=+-*/_#")
EOS = 2
SAMPLES = 6000  # two-token continuations per (backend, config)


def build_char_model(out_dir: Path, seed: int = 0, sharpen: float = 10.0) -> Path:
    """Only the EOS is a special token: every other token, <|im_start|> included, survives
    decoding, so a completion's text maps back to its tokens exactly."""
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.decoder = decoders.Fuse()
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in SPECIALS[:2]])
    backend.add_special_tokens([AddedToken(SPECIALS[EOS], special=True, normalized=False)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=SPECIALS[EOS])
    tokenizer.chat_template = CHATML
    torch.manual_seed(seed)
    model = tiny_llama(len(vocab), max_positions=512, bos=None, eos=EOS, pad=EOS)
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpen)  # logits with a spread of a few units, not ~0.1
    return save_tiny(model, tokenizer, out_dir)


@pytest.fixture(scope="module")
def char_model(tmp_path_factory) -> Path:
    return build_char_model(tmp_path_factory.mktemp("backends") / "model")


@pytest.fixture(scope="module")
def converted(char_model) -> Path:
    from tasks.sampling.convert_ctranslate2 import convert

    for quantization in ("int8", "float32"):
        convert(char_model, None, quantization)
    return char_model


@pytest.fixture(scope="module")
def backends(converted) -> dict:
    from tasks.sampling.backend_continuous import ContinuousBackend, ContinuousInt8Backend
    from tasks.sampling.backend_ctranslate2 import CT2Backend, CT2Float32Backend

    return {
        "transformers": TransformersBackend(converted, dtype=torch.float32),
        "continuous": ContinuousBackend(converted),  # bf16, as shipped
        "continuous-int8": ContinuousInt8Backend(converted),
        "continuous-float32": ContinuousBackend(converted, dtype=torch.float32),  # for exact comparisons
        # The eager PyTorch path that runs where the fused kernels cannot be compiled.
        "continuous-int8-eager": ContinuousInt8Backend(converted, kernels=False),
        "continuous-float32-eager": ContinuousBackend(converted, dtype=torch.float32, kernels=False),
        "ctranslate2-float32": CT2Float32Backend(converted),
        "ctranslate2": CT2Backend(converted),
    }


@pytest.fixture(scope="module")
def hf(char_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(char_model, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(char_model)


# --- the reference distribution, written independently of any backend -----------------------

def truncated(logits: torch.Tensor, cfg: DecodingConfig) -> torch.Tensor:
    """Probabilities after temperature -> top-k -> top-p -> min-p (vLLM's definitions)."""
    logits = logits.double()
    if cfg.temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(), logits.numel()).double()
    probs = torch.softmax(logits / cfg.temperature, dim=-1)
    keep = torch.ones_like(probs, dtype=torch.bool)
    if cfg.top_k:
        keep &= probs >= probs.topk(cfg.top_k).values[-1]
    probs = torch.where(keep, probs, 0.0)
    probs /= probs.sum()
    if cfg.top_p < 1:
        order = probs.argsort(descending=True)
        before = probs[order].cumsum(0) - probs[order]  # mass of the strictly more probable tokens
        nucleus = torch.zeros_like(keep)
        nucleus[order] = before < cfg.top_p  # the token that crosses top_p is kept
        probs = torch.where(nucleus, probs, 0.0)
        probs /= probs.sum()
    if cfg.min_p > 0:
        probs = torch.where(probs >= cfg.min_p * probs.max(), probs, 0.0)
        probs /= probs.sum()
    return probs


def joint_reference(logits_fn, prompt: list[int], cfg: DecodingConfig) -> dict[tuple, float]:
    """P(first two tokens) from a logits function (ids -> last-position logits); EOS ends early."""
    first = truncated(logits_fn(prompt), cfg)
    joint = {}
    for t1 in torch.nonzero(first).flatten().tolist():
        if t1 == EOS:
            joint[(t1,)] = first[t1].item()
            continue
        second = truncated(logits_fn(prompt + [t1]), cfg)
        for t2 in torch.nonzero(second).flatten().tolist():
            joint[(t1, t2)] = first[t1].item() * second[t2].item()
    return joint


def hf_logits(hf):
    model, _ = hf

    @torch.no_grad()
    def fn(ids):
        return model(torch.tensor([ids])).logits[0, -1].float()
    return fn


def ct2_logits(backend):
    generator = ctranslate2.Generator(str(backend.model_dir), compute_type=backend.compute_type)

    def fn(ids):
        out = generator.forward_batch([backend.tokenizer.convert_ids_to_tokens(ids)])
        return torch.tensor(np.asarray(out))[0, -1].float()
    return fn


def int8_logits(backend):
    """The int8 backend's own model: its quantised layers, through its prefill."""
    @torch.no_grad()
    def fn(ids):
        return backend._prefill([list(ids)])[0][0]
    return fn


def outcome(completion, tokenizer) -> tuple:
    ids = tuple(tokenizer.encode(completion.text, add_special_tokens=False))
    if completion.finish_reason == "eos":
        ids += (EOS,)
    assert len(ids) == completion.num_tokens, "a text must map back to its tokens"
    return ids


def tv(reference: dict, counts: Counter, n: int) -> float:
    keys = set(reference) | set(counts)
    return 0.5 * sum(abs(reference.get(k, 0.0) - counts.get(k, 0) / n) for k in keys)


def first_token(dist: dict | Counter) -> dict:
    marginal: dict = {}
    for key, value in dist.items():
        marginal[key[:1]] = marginal.get(key[:1], 0) + value
    return marginal


def check(name: str, config: str, reference: dict, counts: Counter, n: int = SAMPLES) -> list[str]:
    """TV of the first token's marginal and of the two-token joint; the failures, if any."""
    failures = []
    for what, ref, emp in (("first token", first_token(reference), Counter(first_token(counts))),
                           ("two tokens", reference, counts)):
        distance, threshold = tv(ref, emp, n), noise_threshold(ref, n)
        print(f"\n{name} [{config}] {what}: TV {distance:.4f} (noise threshold {threshold:.4f}, "
              f"{len(ref)} outcomes)", end="")
        if distance >= threshold:
            failures.append(f"{what}: TV {distance:.4f} >= {threshold:.4f}")
    return failures


def noise_threshold(reference: dict, n: int, quantile: float = 0.9999, sims: int = 10000) -> float:
    """The TV that n draws from `reference` itself exceed with probability 1 - quantile (1 in
    10,000): a correct sampler fails an assertion by chance about that rarely."""
    p = np.array(list(reference.values()))
    p /= p.sum()
    rng = np.random.default_rng(0)
    distances = np.concatenate([0.5 * np.abs(rng.multinomial(n, p, size=1000) / n - p).sum(axis=1)
                                for _ in range(sims // 1000)])
    return float(np.quantile(distances, quantile))


def empirical(backend, prompt, cfg, n=SAMPLES, seed=0) -> Counter:
    cfg = cfg.model_copy(update={"max_new_tokens": 2, "slots": 500})
    completions = backend.generate_batch([prompt] * n, cfg, seed=seed)
    return Counter(outcome(c, backend.tokenizer) for c in completions)


CONFIGS = {
    "default (T0.8 k20 p0.8)": decoding(temperature=0.8, top_k=20, top_p=0.8),
    "hot top-p only (T1.3 p0.8)": decoding(temperature=1.3, top_k=0, top_p=0.8),
    "cool top-k only (T0.6 k5)": decoding(temperature=0.6, top_k=5, top_p=1.0),
}
PROMPTS = [[{"role": "user", "content": "def add(a, b):\n    return a + b"}],
           [{"role": "user", "content": "Write a function is_prime(n)."}]]


@pytest.mark.parametrize("name", ["transformers", "continuous", "continuous-int8", "ctranslate2-float32",
                                  "ctranslate2"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_fidelity_two_token_distribution(backends, hf, name, config):
    backend, cfg = backends[name], CONFIGS[config]
    prompt = backend.encode_chat(PROMPTS[list(CONFIGS).index(config) % len(PROMPTS)])
    reference = joint_reference(hf_logits(hf), prompt, cfg)
    counts = empirical(backend, prompt, cfg)
    if name in ("ctranslate2", "continuous-int8"):
        # int8 samples from its own (quantised) logits: check the sampler against those, and
        # report how far quantisation moved the distribution from the fp32 model's.
        own = joint_reference(ct2_logits(backend) if name == "ctranslate2" else int8_logits(backend), prompt, cfg)
        quantisation = tv(reference, Counter({k: v * SAMPLES for k, v in own.items()}), SAMPLES)
        print(f"\n{name} [{config}]: TV to the fp32 reference {tv(reference, counts, SAMPLES):.4f}; "
              f"int8 vs fp32 exact TV {quantisation:.4f}", end="")
        assert not check(name + " vs own int8 logits", config, own, counts)
        assert quantisation < 0.15, "int8 moved the distribution far from the model's"
    else:
        assert not check(name, config, reference, counts)


@pytest.mark.parametrize("name", ["transformers", "continuous"])
def test_fidelity_min_p(backends, hf, name):
    """min-p (after top-p); the ctranslate2 backends refuse it."""
    backend, cfg = backends[name], decoding(temperature=1.3, top_k=0, top_p=0.95, min_p=0.15)
    prompt = backend.encode_chat(PROMPTS[0])
    reference = joint_reference(hf_logits(hf), prompt, cfg)
    assert not check(name, "min-p (T1.3 p0.95 min_p0.15)", reference, empirical(backend, prompt, cfg))


@pytest.mark.parametrize("cfg", [decoding(temperature=0.8, top_k=20, top_p=0.8),
                                 decoding(temperature=1.3, top_k=0, top_p=0.9, min_p=0.05),
                                 decoding(temperature=0.5, top_k=3, top_p=1.0),
                                 decoding(temperature=1.0, top_k=0, top_p=1.0)], ids=str)
def test_continuous_sampler_is_the_truncated_distribution(cfg):
    """The sampler's inverse CDF on a fine grid of uniforms gives back, token by token, the
    reference distribution (within one grid step per token): an exact check, no noise.
    Row 2 has ties at the k-th logit, which transformers' top-k keeps."""
    from tasks.sampling.backend_continuous import sample_tokens

    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 3
    logits[2, :6] = torch.tensor([5.0, 4.0, 3.0, 3.0, 3.0, 3.0])
    grid = 20000
    uniforms = (torch.arange(grid) + 0.5) / grid
    for row in logits:
        drawn = sample_tokens(row.expand(grid, -1), cfg, uniforms)
        got = torch.bincount(drawn, minlength=row.numel()).double() / grid
        expected = truncated(row, cfg)
        assert torch.all((got > 0) <= (expected > 0)), "a truncated token was drawn"
        assert (got - expected).abs().max() <= 2 / grid


def test_threshold_catches_top_p_before_temperature(backends, hf):
    """Negative control: the wrong order (top-p on the untempered distribution) is detectable."""
    cfg = CONFIGS["hot top-p only (T1.3 p0.8)"]
    prompt = backends["transformers"].encode_chat(PROMPTS[1])

    def wrong_order(logits: torch.Tensor, cfg: DecodingConfig) -> torch.Tensor:
        nucleus = truncated(logits, cfg.model_copy(update={"temperature": 1.0})) > 0
        probs = torch.where(nucleus, torch.softmax(logits.double() / cfg.temperature, -1), 0.0)
        return probs / probs.sum()

    logits = hf_logits(hf)(prompt)
    reference, wrong = truncated(logits, cfg), wrong_order(logits, cfg)
    distance = 0.5 * (reference - wrong).abs().sum().item()
    threshold = noise_threshold({i: v for i, v in enumerate(reference.tolist()) if v > 0}, SAMPLES)
    print(f"\nwrong order (top-p before temperature): first-token TV {distance:.4f}, noise threshold "
          f"{threshold:.4f}", end="")
    assert distance > 2 * threshold


# --- shared semantics --------------------------------------------------------------------------

def prompts_of(backend, count=4):
    return [backend.encode_chat([{"role": "user", "content": "x" * (3 * i + 1)}]) for i in range(count)]


@pytest.mark.parametrize("name", ["continuous", "continuous-int8", "ctranslate2-float32", "ctranslate2"])
def test_lengths_and_finish_reasons(backends, name):
    backend = backends[name]
    cfg = decoding(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=12, slots=16)
    outs = backend.generate_batch(prompts_of(backend, 6) * 20, cfg, seed=3)
    assert {o.finish_reason for o in outs} == {"eos", "length"}
    for o in outs:
        assert 1 <= o.num_tokens <= 12
        text_tokens = len(backend.tokenizer.encode(o.text, add_special_tokens=False))
        if o.finish_reason == "length":
            assert o.num_tokens == text_tokens == 12
        else:
            assert o.num_tokens == text_tokens + 1  # the EOS counts, and is not in the text


@pytest.mark.parametrize("name", ["ctranslate2-float32", "continuous-float32", "continuous-float32-eager"])
def test_greedy_matches_transformers(backends, name):
    """Prompts of different lengths; with 2 slots for 6 sequences the continuous backend
    admits sequences into slots that held longer ones."""
    cfg = decoding(temperature=0.0, max_new_tokens=24, slots=2)
    prompts = prompts_of(backends["transformers"], 6)
    assert backends[name].generate_batch(prompts, cfg, seed=0) == \
        backends["transformers"].generate_batch(prompts, cfg, seed=0)


@torch.no_grad()
def test_fused_int8_layer_matches_the_eager_path(backends):
    """tasks/cpu_kernels.cpp's linear_int8, with the norm, the SiLU gate and the residual add
    fused in, against the same layer in PyTorch ops. The projection alone is the same
    arithmetic; around a norm, a last-bit difference may move a value across an int8 rounding
    boundary, so those compare by relative error (a missing norm weight or gate is O(1))."""
    fused, eager = backends["continuous-int8"].layers[0], backends["continuous-int8-eager"].layers[0]
    assert fused.kernels is not None and eager.kernels is None
    torch.manual_seed(0)
    x = torch.randn(7, fused.qkv.weight_t.shape[0]) * 3
    torch.testing.assert_close(fused.qkv(x), eager.qkv(x), rtol=1e-5, atol=1e-5)

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    assert rel(fused.project_qkv(x), eager.project_qkv(x)) < 1e-2
    attended = torch.randn(7, fused.o.weight_t.shape[0])
    assert rel(fused.attention_out(x, attended), eager.attention_out(x, attended)) < 1e-2
    assert rel(fused.mlp(x), eager.mlp(x)) < 1e-2


@pytest.mark.parametrize("name", ["continuous-float32", "continuous", "continuous-int8"])
def test_decode_attention_kernel_matches_the_eager_path(backends, name):
    """RoPE, the cache write and attention in one call, against the PyTorch ops, for slots at
    positions 0, either side of a 16-position block, and the cache's last position. The int8
    cache (continuous-int8) against fp32 attention over its dequantized prompt K/V: what is left
    is the quantization of the decoded token's own K/V."""
    from tasks.sampling.backend_continuous import ContinuousBackend, _KVCache, quantize_kv

    backend = backends[name]
    assert backend.attention_kernel is not None, "the test model's shape must take the kernel"
    quantized = backend.kv_dtype == torch.int8
    assert quantized == (name == "continuous-int8")
    torch.manual_seed(1)
    capacity, layer = 64, backend.layers[0]
    positions = torch.tensor([0, 15, 16, 17, 40, capacity - 1])
    slots = len(positions)
    keys = torch.randn(slots, backend.kv_heads, capacity, backend.head_dim)
    values = torch.randn_like(keys)
    kernel_cache = _KVCache(1, slots, backend.kv_heads, backend.head_dim, capacity, backend.kv_dtype, True)
    eager_cache = _KVCache(1, slots, backend.kv_heads, backend.head_dim, capacity,
                           torch.float32 if quantized else backend.kv_dtype)
    for s in range(slots):
        kernel_cache.write(s, 0, keys[s], values[s])
        eager_cache.write(s, 0, *((lambda q, scale: q.float() * scale[..., None])(*quantize_kv(t)) if quantized
                                  else t for t in (keys[s], values[s])))
    qkv = torch.randn(slots, (backend.heads + 2 * backend.kv_heads) * backend.head_dim)
    cos, sin = backend.inner.rotary_emb(qkv, positions[:, None])
    scales = (kernel_cache.k_scale[0], kernel_cache.v_scale[0]) if quantized else ()
    kernel = backend.attention_kernel.decode_attention(qkv, cos[:, 0].float().contiguous(),
                                                       sin[:, 0].float().contiguous(), positions,
                                                       kernel_cache.k[0], kernel_cache.v[0], backend.heads,
                                                       layer.scaling, *scales)
    visible = torch.arange(capacity)[None, :] <= positions[:, None]
    bias = torch.zeros(visible.shape).masked_fill_(~visible, float("-inf"))[:, None, None]
    # The int8 backend's eager path keeps bf16 K/V; fp32 attention is the float backend's.
    eager_backend = backends["continuous-float32"] if quantized else backend
    eager = ContinuousBackend._eager_attention(eager_backend, layer, eager_cache.k[0], eager_cache.v[0], qkv,
                                               positions, cos, sin, bias)
    tolerance = 1e-5 if backend.kv_dtype == torch.float32 else 2e-2  # bf16 K/V: q rounds to bf16 in the eager path
    torch.testing.assert_close(kernel, eager.float(), rtol=tolerance, atol=tolerance)
    unblocked = kernel_cache.k[0].transpose(-1, -2).reshape(slots, backend.kv_heads, capacity, backend.head_dim)
    kernel_v = kernel_cache.v[0]
    if quantized:  # each position's vector within half a step of its own scale
        unblocked = unblocked.float() * kernel_cache.k_scale[0][..., None]
        kernel_v = kernel_v.float() * kernel_cache.v_scale[0][..., None]
        for got, want, scale in ((unblocked, eager_cache.k[0], kernel_cache.k_scale[0]),
                                 (kernel_v, eager_cache.v[0], kernel_cache.v_scale[0])):
            assert ((got - want).abs() <= scale[..., None] * 0.5 + 1e-6).all()
        return
    torch.testing.assert_close(unblocked.float(), eager_cache.k[0].float(), rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(kernel_v, eager_cache.v[0])


def test_the_int8_cache_keeps_its_scales_through_grow_and_keep():
    """Positions written before a grow, and rows kept by keep(), read back the same values."""
    from tasks.sampling.backend_continuous import _KVCache, quantize_kv

    torch.manual_seed(2)
    cache = _KVCache(2, 3, 1, 64, 64, torch.int8, blocked=True)
    keys, values = torch.randn(3, 1, 40, 64) * 3, torch.randn(3, 1, 40, 64)
    for s in range(3):
        cache.write(s, 1, keys[s], values[s])
    cache.grow(100)
    cache.keep(torch.tensor([2, 0]))
    assert cache.capacity == 128 and cache.k_scale[1].shape == (2, 1, 128)
    for row, s in enumerate([2, 0]):
        q, scale = quantize_kv(values[s])
        assert torch.equal(cache.v[1][row, :, :40], q) and torch.equal(cache.v_scale[1][row, :, :40], scale)
        blocked_k = cache.k[1][row].transpose(-1, -2).reshape(1, 128, 64)[:, :40]
        q, scale = quantize_kv(keys[s])
        assert torch.equal(blocked_k, q) and torch.equal(cache.k_scale[1][row, :, :40], scale)
    with pytest.raises(ValueError, match="fused attention kernel only"):
        _KVCache(1, 1, 1, 64, 64, torch.int8, blocked=False)


@torch.no_grad()
def test_packed_weights_give_the_products_of_int_mm(backends, caplog):
    """The linears' GEMMs on oneDNN-packed weights (where the CPU has no AMX): exactly
    torch._int_mm's products (checked at load; a PackedWeight that computes otherwise is refused,
    and the linears keep _int_mm), and a fused linear gives the same output with and without its
    packed weight."""
    from tasks.sampling import cpu_kernels

    linear = backends["continuous-int8"].layers[0].gate_up
    kernels = linear.kernels
    assert cpu_kernels.packed_gemm(kernels), "this CPU and torch take packed weights"
    torch.manual_seed(4)
    x = torch.randn(37, linear.weight_t.shape[0])
    packed = kernels.linear_int8(x, linear.weight_t, linear.scale, None, None, 0.0, False, None,
                                 kernels.PackedWeight(linear.weight_t.t()))
    assert torch.equal(packed, kernels.linear_int8(x, linear.weight_t, linear.scale, None, None, 0.0, False, None))

    class OffByOne:
        def __init__(self, weight):
            self.inner = kernels.PackedWeight(weight)

        def gemm(self, q):
            return self.inner.gemm(q) + 1

    class Wrong:
        PackedWeight = OffByOne

    assert not cpu_kernels.packed_gemm(Wrong())
    assert "differ from torch._int_mm" in caplog.text


@torch.no_grad()
def test_amx_weights_give_the_products_of_int_mm(backends, caplog):
    """The kernels' own AMX GEMMs: exactly torch._int_mm's products (checked at load; kernels whose
    products differ are refused, and the linears keep oneDNN), and the fused linears give the same
    output with AMX weights as with _int_mm: bit for bit with RMSNorm or the gate fused in, and
    with the residual added up to where the compiler fuses that add with a multiply; at 37 rows
    (padded to 64), 5 and 64."""
    from tasks.sampling import backend_continuous, cpu_kernels

    layer = backends["continuous-int8"].layers[1]
    kernels = layer.kernels
    if not kernels.amx_usable():
        pytest.skip("this CPU (or Linux) gives no AMX int8 tiles")
    assert cpu_kernels.amx_tiles(kernels)
    assert all(linear.amx is not None and linear.packed is None for linear in (layer.qkv, layer.o, layer.gate_up,
                                                                                 layer.down))
    torch.manual_seed(5)
    for rows in (37, 5, 64):
        x = torch.randn(rows, layer.o.out_features) * 2
        gate_up = torch.randn(rows, layer.gate_up.out_features) * 2
        eps = backend_continuous._eps(layer.input_norm)
        for linear, inputs, norm, gated, residual in ((layer.qkv, x, layer.input_norm.weight, False, None),
                                                      (layer.o, x, None, False, x),
                                                      (layer.down, gate_up, None, True, x)):
            args = (inputs, linear.weight_t, linear.scale, None, norm, eps, gated, None, None)
            assert torch.equal(kernels.linear_int8(*args, linear.amx), kernels.linear_int8(*args, None)), rows
            if residual is not None:
                args = args[:7] + (residual, None)
                torch.testing.assert_close(kernels.linear_int8(*args, linear.amx), kernels.linear_int8(*args, None),
                                           rtol=1e-5, atol=1e-5)

    class OffByOne:
        amx_usable, amx_pack = kernels.amx_usable, kernels.amx_pack

        @staticmethod
        def amx_gemm(q, amx):
            return kernels.amx_gemm(q, amx) + 1

    assert not cpu_kernels.amx_tiles(OffByOne())
    assert "differ from torch._int_mm" in caplog.text


@torch.no_grad()
def test_without_amx_the_layers_take_onednn_and_compute_the_same(converted, backends, monkeypatch):
    """On a CPU without AMX the linears run oneDNN's matmul on packed weights (and the MLP, at
    prefill's rows, mlp_int8 block by block; at decode's, two fused linears): the layers give what
    the AMX layers give, up to where a residual add rounds differently."""
    from tasks.sampling import backend_continuous, cpu_kernels

    with_amx = backends["continuous-int8"].layers[1]
    monkeypatch.setattr(cpu_kernels, "amx_tiles", lambda kernels: False)
    layer = backend_continuous.ContinuousInt8Backend(converted).layers[1]
    assert all(linear.amx is None and linear.packed is not None for linear in (layer.qkv, layer.o, layer.gate_up,
                                                                               layer.down))
    torch.manual_seed(6)
    for rows in (5, 2 * backend_continuous.MLP_BLOCK_ROWS + 3):
        x = torch.randn(rows, layer.o.out_features) * 2
        for step in ("project_qkv", "mlp"):
            torch.testing.assert_close(getattr(layer, step)(x), getattr(with_amx, step)(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.attention_out(x, x), with_amx.attention_out(x, x), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_prefill_mlp_kernel_matches_the_two_fused_linears(backends):
    """mlp_int8 against linear_int8's gate_up (norm fused) and down (gate and residual fused): the
    same arithmetic, up to where the compiler fuses a multiply and an add. Block by block of rows
    (prefill's path without AMX), blocks of 128 and of 37 rows (a last block of 4); and the layer's
    own call, which takes it with AMX weights at any rows (one region, 300 rows and 5), and without
    them at 2 x MLP_BLOCK_ROWS rows and more."""
    from tasks.sampling import backend_continuous

    layer = backends["continuous-int8"].layers[1]
    assert layer.kernels is not None and layer.fits_mlp_kernel
    torch.manual_seed(3)
    x = torch.randn(300, layer.down.out_features) * 2
    gate_up = layer.gate_up.fused(layer.kernels, x, norm=layer.post_norm)
    want = layer.down.fused(layer.kernels, gate_up, gated=True, residual=x)
    for block in (128, 37):
        got = layer.kernels.mlp_int8(x, layer.post_norm.weight, backend_continuous._eps(layer.post_norm),
                                     layer.gate_up.weight_t, layer.gate_up.scale, layer.down.weight_t,
                                     layer.down.scale, block)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert x.shape[0] >= 2 * backend_continuous.MLP_BLOCK_ROWS
    torch.testing.assert_close(layer.mlp(x), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.mlp(x[:5]), want[:5], rtol=1e-5, atol=1e-5)  # decode's path


@torch.no_grad()
def test_fused_lm_head_top_k_matches_the_eager_sampler(backends):
    """lm_head_topk (the int8 LM head with each row's argmax and the sampler's top-k fused in, no
    logits tensor) against the PyTorch arithmetic it replaces: the eager int8 head's logits over
    each row's T through next_token_candidates. Bit for bit: the same candidate values, ids and
    order, ties at the k-th kept (25 duplicated weight rows make 26 equal logits, in chunks that
    different threads take on the AMX path), the argmax the first of equal maxima; and the same
    tokens drawn from them. 37 rows take both threads' shares. A vocabulary of 1,000 runs the
    _int_mm path (a 256-column chunk leaves a last chunk of 232, not a multiple of 16); one of
    1,024 the AMX path, where this CPU has it (its threads split the chunks, and merge rows)."""
    from tasks.sampling import cpu_kernels
    from tasks.sampling.backend_continuous import Int8Linear, draw, next_token_candidates

    kernels = backends["continuous-int8"].model.lm_head.kernels
    assert kernels is not None
    for vocab in (1000, 1024):
        torch.manual_seed(0)
        linear = torch.nn.Linear(64, vocab, bias=False)
        linear.weight[500:520] = linear.weight[100]
        linear.weight[900:905] = linear.weight[100]
        fused, eager = Int8Linear(linear, kernels), Int8Linear(linear, None)
        assert (fused.amx is not None) == (vocab == 1024 and cpu_kernels.amx_tiles(kernels))
        x = torch.randn(37, 64) * 2
        x[3] = linear.weight[100] * 5  # its largest logits are the tied ones
        logits = eager(x).float()
        per_row = torch.tensor([0.0, 0.5, 1.3, 0.8] * 9 + [1.0])
        uniforms = torch.rand(37)
        for temperature, top_k, temperatures in [(0.8, 20, None), (1.3, 1, None), (0.6, 40, None),
                                                 (0.8, 20, per_row), (0.0, 20, None)]:
            cfg = decoding(temperature=temperature, top_k=top_k, top_p=0.8)
            t = per_row if temperatures is not None else torch.full((37,), temperature)
            vals, ids, argmax = kernels.lm_head_topk(x, fused.weight_t, fused.scale, None, t,
                                                     0 if temperature == 0 and temperatures is None else top_k, 256,
                                                     fused.amx)
            want_vals, want_ids, want_argmax = next_token_candidates(logits, cfg, temperatures)
            assert torch.equal(argmax, want_argmax), f"vocab {vocab}"
            assert torch.equal(vals, want_vals), f"vocab {vocab} T {temperature} k {top_k}"
            kept = want_vals > float("-inf")
            assert torch.equal(ids[kept], want_ids[kept])
            assert torch.equal(draw(vals, ids, argmax, cfg, uniforms, temperatures),
                               draw(want_vals, want_ids, want_argmax, cfg, uniforms, temperatures))
        assert (next_token_candidates(logits, decoding(temperature=1.0, top_k=20))[0][3] > float("-inf")).sum() == 26


def test_fused_lm_head_decodes_what_the_logits_path_decodes(backends, monkeypatch):
    """The decode loop with the fused LM head writes the completions it writes when the head's
    logits go through next_token_candidates in PyTorch (same layers, same kernels otherwise)."""
    from tasks.sampling.backend_continuous import next_token_candidates

    backend = backends["continuous-int8"]
    cfg = decoding(temperature=0.9, top_k=5, top_p=0.9, max_new_tokens=12, slots=7)
    prompts = prompts_of(backend, 4) * 5
    temperatures = [0.0, 0.7, 1.2, 0.9] * 5
    fused = [backend.generate_batch(prompts, cfg, seed=11), backend.generate_batch(prompts, cfg, seed=11,
                                                                                  temperatures=temperatures)]
    monkeypatch.setattr(backend, "_next_token_candidates", lambda x, cfg, t: next_token_candidates(
        backend.model.lm_head(x).float(), cfg, t))
    assert [backend.generate_batch(prompts, cfg, seed=11),
            backend.generate_batch(prompts, cfg, seed=11, temperatures=temperatures)] == fused


def test_without_a_compiler_the_eager_path_runs(monkeypatch, caplog):
    import torch.utils.cpp_extension

    from tasks.sampling import cpu_kernels

    def no_compiler(**kwargs):
        raise RuntimeError("Error building extension: c++: command not found")

    monkeypatch.setattr(torch.utils.cpp_extension, "load_inline", no_compiler)
    cpu_kernels.load.cache_clear()
    try:
        assert cpu_kernels.load() is None
        assert "c++: command not found" in caplog.text and "eager" in caplog.text
    finally:
        cpu_kernels.load.cache_clear()


def test_a_shared_prompt_prefix_is_computed_once_with_the_same_result(backends):
    backend = backends["continuous-float32"]
    prompts = [backend.encode_chat([{"role": "user", "content": "Complete the function: " + "x" * (3 * i + 1)}])
               for i in range(3)]
    shared = len(os.path.commonprefix(prompts))
    assert shared >= 8, "the prompts share their template's and instructions' tokens"
    prefix = backend._prefill([prompts[0][:shared]])[0]
    together = backend._prefill(prompts, prefix)
    for prompt, (logits, keys, values) in zip(prompts, together):
        alone, alone_keys, alone_values = backend._prefill([prompt])[0]
        torch.testing.assert_close(logits, alone, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(keys[-1], alone_keys[-1], rtol=1e-4, atol=1e-4)
        assert keys[0].shape[1] == len(prompt)


def test_continuous_samples_do_not_depend_on_slots(backends):
    backend = backends["continuous-float32"]
    cfg = decoding(temperature=1.2, top_k=0, max_new_tokens=20)
    prompts = prompts_of(backend, 5) * 2
    outs = [backend.generate_batch(prompts, cfg.model_copy(update={"slots": slots}), seed=4) for slots in (1, 3, 10)]
    assert len({o.num_tokens for o in outs[0]}) > 2, "the test needs sequences that end at different steps"
    assert outs[0] == outs[1] == outs[2]
    assert outs[0][:5] != outs[0][5:], "each sequence draws from its own generator"


def test_continuous_refuses_other_architectures():
    from transformers import GPT2Config, GPT2LMHeadModel

    from tasks.sampling.backend_continuous import _check_architecture

    with pytest.raises(ParamsError, match="backend"):
        _check_architecture(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10)))
    # Gemma has Llama's module names but scales its embeddings and norms otherwise.
    from transformers import GemmaConfig, GemmaForCausalLM

    gemma = GemmaForCausalLM(GemmaConfig(num_hidden_layers=1, hidden_size=8, intermediate_size=16,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=4, vocab_size=10))
    with pytest.raises(ParamsError, match="'gemma' is not a Llama-style decoder"):
        _check_architecture(gemma)


@pytest.mark.parametrize("name", ["continuous", "continuous-int8", "ctranslate2-float32", "ctranslate2"])
def test_a_batch_depends_only_on_its_seed(backends, name):
    backend = backends[name]
    cfg = decoding(temperature=1.2, top_k=0, max_new_tokens=16)
    prompts = prompts_of(backend, 4)
    first = backend.generate_batch(prompts, cfg, seed=11)
    backend.generate_batch(prompts, cfg, seed=5)  # anything in between must not matter
    again = backend.generate_batch(prompts, cfg, seed=11)
    other = backend.generate_batch(prompts, cfg, seed=12)
    assert first == again
    assert first != other


MIXED_T = [1.3, 0.0, 0.5, 0.9, 1.3, 0.5, 0.0, 0.9, 1.3, 0.5, 0.9, 0.0]  # one T per row: a T_eval sweep


@pytest.mark.parametrize("name", ["transformers", "continuous", "continuous-int8", "continuous-float32",
                                  "continuous-int8-eager"])
def test_a_row_of_a_mixed_temperature_batch_is_the_row_of_a_batch_at_its_t(backends, name):
    """Per-row temperatures (evaluate's sweep in one pass): each row draws what it draws in the
    same batch (same prompts, same position, same seed) decoded at its T alone, with cfg's
    temperature or with every row given that T; rows at T=0 are greedy."""
    backend = backends[name]
    cfg = decoding(temperature=0.8, top_k=20, top_p=0.95, max_new_tokens=16, slots=5)
    prompts = prompts_of(backend, 4) * 3
    mixed = backend.generate_batch(prompts, cfg, seed=7, temperatures=MIXED_T)
    for t in sorted(set(MIXED_T)):
        at_t = backend.generate_batch(prompts, cfg.model_copy(update={"temperature": t}), seed=7)
        assert backend.generate_batch(prompts, cfg, seed=7, temperatures=[t] * len(prompts)) == at_t
        rows = [i for i, row_t in enumerate(MIXED_T) if row_t == t]
        assert [mixed[i] for i in rows] == [at_t[i] for i in rows], f"rows at T={t}"
    at_cfg = backend.generate_batch(prompts, cfg, seed=7)
    assert sum(a != b for a, b in zip(mixed, at_cfg)) >= 3, "the rows' own T must change what they draw"


@pytest.mark.parametrize("name", ["ctranslate2", "ctranslate2-float32"])
def test_ct2_decodes_each_temperature_of_a_batch_in_a_call_of_its_own(backends, name):
    """CTranslate2 takes one temperature per call: a batch with several runs one call per T
    (the first T's seeded as the batch, the others from (seed, their first row)), each as a
    batch of its rows alone at that T would be; a batch of one T is the plain batch."""
    from tasks.sampling.backends import sequence_seed

    backend = backends[name]
    cfg = decoding(temperature=1.3, top_k=0, max_new_tokens=16)
    prompts = prompts_of(backend, 4) * 3
    mixed = backend.generate_batch(prompts, cfg, seed=11, temperatures=MIXED_T)
    assert backend.generate_batch(prompts, cfg, seed=11, temperatures=MIXED_T) == mixed
    assert backend.generate_batch(prompts, cfg, seed=11, temperatures=[1.3] * len(prompts)) == \
        backend.generate_batch(prompts, cfg, seed=11)
    for k, t in enumerate(dict.fromkeys(MIXED_T)):
        rows = [i for i, row_t in enumerate(MIXED_T) if row_t == t]
        alone = backend.generate_batch([prompts[i] for i in rows], cfg.model_copy(update={"temperature": t}),
                                       seed=11 if k == 0 else sequence_seed(11, rows[0]))
        assert [mixed[i] for i in rows] == alone, f"rows at T={t}"
    greedy = backend.generate_batch(prompts, cfg.model_copy(update={"temperature": 0.0}), seed=0)
    assert [mixed[i] for i, t in enumerate(MIXED_T) if t == 0] == [greedy[i] for i, t in enumerate(MIXED_T) if t == 0]


@pytest.mark.parametrize("name", ["ctranslate2", "continuous-int8"])
def test_generate_jsonl_resumes_exactly(tmp_path, converted, backends, name):

    backend = backends[name]
    cfg = decoding(backend=name, n=2, max_new_tokens=10, batch_size=3, slots=2)
    requests = [Request({"prompt_id": f"p{i}"}, [{"role": "user", "content": "y" * (i + 1)}]) for i in range(4)]
    full = generate_jsonl(converted, requests, cfg, tmp_path / "full.jsonl", backend=backend)
    interrupted_run(converted, requests, cfg, tmp_path / "resumed.jsonl", backend, batches=1)
    assert generate_jsonl(converted, requests, cfg, tmp_path / "resumed.jsonl", backend=backend) == full


def test_ct2_rejects_min_p_naming_the_key(backends):
    backend = backends["ctranslate2"]
    with pytest.raises(ParamsError, match="min_p"):
        backend.generate_batch(prompts_of(backend, 1), decoding(min_p=0.05), seed=0)


def test_stale_or_missing_conversion_is_refused(tmp_path):
    from tasks.sampling.backend_ctranslate2 import CT2Backend
    from tasks.sampling.convert_ctranslate2 import convert

    model = build_char_model(tmp_path / "m", seed=1)
    with pytest.raises(DataError, match="selfdistill convert"):
        CT2Backend(model)
    convert(model, None, "int8")
    CT2Backend(model)
    (model / "generation_config.json").write_text((model / "generation_config.json").read_text() + " ")
    with pytest.raises(DataError, match="different version"):
        CT2Backend(model)


def test_backend_param_accepts_the_new_backends():
    for name in ("transformers", "continuous", "continuous-int8", "ctranslate2", "ctranslate2-float32", "vllm"):
        assert decoding(backend=name).backend == name
        assert name in BACKENDS


# --- vLLM: the parameter mapping, without vllm or a GPU ------------------------------------------

def test_vllm_mapping():
    from tasks.sampling.backend_vllm import sampling_params_kwargs

    kw = sampling_params_kwargs(decoding(temperature=0.8, top_k=20, top_p=0.8, max_new_tokens=256),
                                eos_ids=[2, 7], seed=5)
    assert kw["temperature"] == 0.8 and kw["top_k"] == 20 and kw["top_p"] == 0.8 and kw["min_p"] == 0.0
    assert kw["max_tokens"] == 256 and kw["seed"] == 5 and kw["n"] == 1
    assert kw["stop_token_ids"] == [2, 7] and kw["ignore_eos"] is False
    assert kw["repetition_penalty"] == 1.0 and kw["presence_penalty"] == 0 and kw["frequency_penalty"] == 0
    assert sampling_params_kwargs(decoding(top_k=0), [2], 0)["top_k"] == 0  # vLLM 0.32: 0 disables top-k
    greedy = sampling_params_kwargs(decoding(temperature=0.0, top_k=20, top_p=0.5), [2], 0)
    assert greedy["temperature"] == 0.0 and greedy["top_k"] == 0 and greedy["top_p"] == 1.0
    # min-p commutes with top-k, not with top-p (vLLM applies it before top-p).
    assert sampling_params_kwargs(decoding(top_k=20, top_p=1.0, min_p=0.1), [2], 0)["min_p"] == 0.1
    with pytest.raises(ParamsError, match="min_p"):
        sampling_params_kwargs(decoding(top_p=0.9, min_p=0.1), [2], 0)
    assert "vllm" not in sys.modules


def test_vllm_outputs_to_completions():
    from types import SimpleNamespace

    from tasks.sampling.backend_vllm import completion_from_output
    from tasks.sampling.backends import sequence_seed

    stop = completion_from_output(SimpleNamespace(token_ids=[5, 6, 2], text="ab", finish_reason="stop"), [2], 10)
    assert (stop.text, stop.num_tokens, stop.finish_reason) == ("ab", 3, "eos")
    dropped = completion_from_output(SimpleNamespace(token_ids=[5, 6], text="ab", finish_reason="stop"), [2], 10)
    assert dropped.num_tokens == 3
    length = completion_from_output(SimpleNamespace(token_ids=list(range(3, 13)), text="x", finish_reason="length"),
                                    [2], 10)
    assert (length.num_tokens, length.finish_reason) == (10, "length")
    assert len({sequence_seed(s, r) for s in range(5) for r in range(5)}) == 25


def test_vllm_gives_each_request_its_own_temperature(monkeypatch):
    """Per-row temperatures: one SamplingParams per request, each at its row's T (0: greedy), the
    rest the batch's; a row at T > 0 that vLLM cannot sample exactly is refused naming the key."""
    from types import ModuleType, SimpleNamespace

    from tasks.sampling.backend_vllm import VLLMBackend
    from tasks.sampling.backends import sequence_seed

    sent = []
    fake = ModuleType("vllm")
    fake.SamplingParams = lambda **kwargs: kwargs
    monkeypatch.setitem(sys.modules, "vllm", fake)

    class LLM:
        def generate(self, inputs, params, use_tqdm):
            sent.extend(params)
            return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=[5, 2], text="a", finish_reason="stop")])
                    for _ in inputs]

    backend = object.__new__(VLLMBackend)
    backend.eos, backend.max_model_len, backend._llm = [2], 64, LLM()
    cfg = decoding(backend="vllm", temperature=0.7, top_k=20, top_p=0.8, max_new_tokens=8)
    outs = backend.generate_batch([[1, 3], [1, 4], [1, 5]], cfg, seed=9, temperatures=[1.1, 0.0, 0.7])
    assert [o.finish_reason for o in outs] == ["eos"] * 3
    assert [p["temperature"] for p in sent] == [1.1, 0.0, 0.7]
    assert [p["top_k"] for p in sent] == [20, 0, 20] and [p["top_p"] for p in sent] == [0.8, 1.0, 0.8]
    assert [p["seed"] for p in sent] == [sequence_seed(9, i) for i in range(3)]
    greedy_min_p = decoding(backend="vllm", temperature=0.0, top_p=0.9, min_p=0.1, max_new_tokens=8)
    backend.generate_batch([[1, 3]], greedy_min_p, seed=9, temperatures=[0.0])  # min-p means nothing at T=0
    with pytest.raises(ParamsError, match="min_p"):
        backend.generate_batch([[1, 3], [1, 4]], greedy_min_p, seed=9, temperatures=[0.0, 0.7])


# --- the load-time self-check: a backend that computes wrong refuses to sample ---------------------

@pytest.mark.parametrize("name", ["transformers", "continuous", "continuous-int8", "ctranslate2",
                                  "ctranslate2-float32", "continuous-int8-eager"])
def test_every_backend_passes_its_self_check(backends, name):
    from tasks.sampling.backends import self_check

    self_check(backends[name])


def test_load_backend_runs_the_self_check(converted):
    from tasks.sampling.backends import load_backend

    assert load_backend("continuous-int8", converted).name == "continuous-int8"


def test_the_cache_keyword_is_the_one_this_transformers_takes(backends):
    import inspect

    backend = backends["transformers"]
    assert backend.cache_kwarg in inspect.signature(backend.model.forward).parameters


def lose_context(backend):
    """The bug transformers 5.17 met: the KV cache passed by a keyword the forward swallows, so
    every decode step sees only its own token."""
    backend.cache_kwarg = "cache_under_a_name_the_model_ignores"
    return backend


def test_a_backend_that_loses_its_context_is_refused(char_model):
    from tasks.sampling.backends import BackendError, self_check

    with pytest.raises(BackendError, match="backend transformers failed its load-time self-check"):
        self_check(lose_context(TransformersBackend(char_model, dtype=torch.float32)))


@pytest.mark.slow
def test_the_real_model_losing_its_context_is_refused(tmp_path):
    """SmolLM2 (the embedded default): its healthy backends pass, a context-losing decode fails."""
    from tasks.core.modeling import load_base
    from tasks.sampling.backends import BackendError, load_backend, self_check

    model, tokenizer, _ = load_base("embedded:smollm2-135m-instruct")
    model.save_pretrained(tmp_path / "smol")
    tokenizer.save_pretrained(tmp_path / "smol")
    for name in ("transformers", "continuous-int8"):
        load_backend(name, tmp_path / "smol")
    with pytest.raises(BackendError, match="rank below the top 5"):
        self_check(lose_context(TransformersBackend(tmp_path / "smol")))


OLDER_TRANSFORMERS_CHECK = """
import sys
import transformers
from tasks.sampling.backend_transformers import TransformersBackend
from tasks.sampling.backends import BackendError, load_backend, self_check

for name in ("transformers", "continuous", "continuous-int8"):
    load_backend(name, sys.argv[1])  # passes its self-check
broken = TransformersBackend(sys.argv[1])
broken.cache_kwarg = "cache"  # what transformers 5.17 silently ignored
try:
    self_check(broken)
except BackendError:
    print("transformers", transformers.__version__, "ok")
"""


TRANSFORMERS_LOCKS = sorted((Path(__file__).resolve().parents[1] / "requirements").glob("transformers-*.txt"))


@pytest.mark.slow
@pytest.mark.parametrize("lock", TRANSFORMERS_LOCKS, ids=[p.stem for p in TRANSFORMERS_LOCKS])
def test_backends_under_older_transformers(tmp_path, char_model, lock):
    """Each transformers version the project claims (pyproject's lower bound, the vllm extra's:
    requirements/transformers-*.txt, made by `make lock`), in a venv of its own installed from its
    lock, so nothing only a newer version brings leaks in: the backends pass their self-checks,
    a cache passed by the keyword it ignores is caught, and the training equivalences hold
    (gradient accumulation, 2 processes) under that version too."""
    import subprocess

    version = lock.stem.removeprefix("transformers-")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    proc = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--require-hashes", "-r", str(lock)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([python, "-c", OLDER_TRANSFORMERS_CHECK, str(char_model)], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"transformers {version} ok" in proc.stdout
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k",
                           "gradient_accumulation or two_processes", str(repo / "tests" / "test_training.py")],
                          cwd=repo, env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and "3 passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]
