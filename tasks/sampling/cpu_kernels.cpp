// Fused CPU kernels for the continuous backends (tasks/cpu_kernels.py builds and loads them).
//
// Why: in a decode step of a 135M model at 64 slots, eager PyTorch spent about 40% of the step in
// two attention matmuls that read every slot's K/V up to the shared cache capacity, and another
// third in dispatching ~50 small elementwise ops per layer. Each kernel here is one pass over
// memory that replaces a chain of those ops, with the same arithmetic as the torch code it
// replaces (tests/test_backends.py compares the two).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <omp.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

// GCC/Clang vector extensions: 16 fp32 lanes, lowered to one AVX-512 register, two AVX2 ones
// or four NEON ones, whatever -march=native offers.
typedef float f16v __attribute__((vector_size(64)));
typedef int32_t i16v __attribute__((vector_size(64)));
typedef uint32_t u16v __attribute__((vector_size(64)));
typedef uint16_t h16v __attribute__((vector_size(32)));
typedef int8_t b16v __attribute__((vector_size(16)));
constexpr int64_t W = 16;  // lanes; also the K cache's block of positions
// Software prefetch distances of decode attention, measured on SmolLM2-135M's shapes: K blocks ahead
// (each block is 16 positions), V cache lines ahead.
constexpr int64_t PREFETCH_K_BLOCKS = 4, PREFETCH_V_LINES = 32;

inline f16v splat(float x) { return f16v{} + x; }
inline f16v load(const float* p) { f16v v; std::memcpy(&v, p, sizeof v); return v; }
inline f16v load(const at::BFloat16* p) {
  h16v raw;
  std::memcpy(&raw, p, sizeof raw);
  u16v bits = __builtin_convertvector(raw, u16v) << 16;
  f16v v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}
// int8 -> fp32: GCC 12 turns a direct int8 -> int32 __builtin_convertvector into scalar code
// (20x slower attention), so x86 gets the sign-extending conversion by name.
inline f16v load(const int8_t* p) {
#if defined(__AVX512F__)
  return (f16v)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif defined(__AVX2__)
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256 low = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw));
  const __m256 high = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(raw, 8)));
  f16v v;
  std::memcpy(&v, &low, sizeof low);
  std::memcpy(reinterpret_cast<char*>(&v) + sizeof low, &high, sizeof high);
  return v;
#else
  typedef int16_t s16v __attribute__((vector_size(32)));
  b16v raw;
  std::memcpy(&raw, p, sizeof raw);
  return __builtin_convertvector(__builtin_convertvector(__builtin_convertvector(raw, s16v), i16v), f16v);
#endif
}
inline void store(float* p, f16v v) { std::memcpy(p, &v, sizeof v); }
// 16 GEMM accumulators as fp32: int32 ones converted (round to nearest), fp32 ones as they are.
inline f16v as_float(const int32_t* p) { i16v a; std::memcpy(&a, p, sizeof a); return __builtin_convertvector(a, f16v); }
inline f16v as_float(const float* p) { return load(p); }
inline void put(float* p, float x) { *p = x; }
inline void put(at::BFloat16* p, float x) { *p = at::BFloat16(x); }  // round to nearest even
inline f16v vmax(f16v a, f16v b) { return a > b ? a : b; }
inline f16v vabs(f16v a) { return a < 0.f ? -a : a; }
// Round half to even, as torch.round and std::nearbyint: adding and subtracting 1.5 * 2^23
// leaves the integer part rounded by the FPU's default mode (valid for |x| < 2^22; int8
// quantization feeds |x| <= 127).
inline f16v round_even(f16v x) { return (x + 12582912.f) - 12582912.f; }
inline float hmax(f16v v) { float m = v[0]; for (int i = 1; i < W; ++i) m = std::max(m, v[i]); return m; }
inline float hsum(f16v v) { float s = 0.f; for (int i = 0; i < W; ++i) s += v[i]; return s; }

// e^x for x <= 0 (softmax after subtracting the max): 2^n * e^r, |r| <= ln2/2, and e^r by its
// degree-6 Taylor polynomial (relative error < 2e-7, below fp32's own rounding of the sum).
inline f16v exp_nonpositive(f16v x) {
  x = vmax(x, splat(-87.f));  // below this e^x is 0 in fp32 after the normalising divide anyway
  const f16v t = x * 1.44269504f + 0.5f;
  i16v n = __builtin_convertvector(t, i16v);  // truncates toward zero; make it floor
  n += (t < __builtin_convertvector(n, f16v));
  const f16v nf = __builtin_convertvector(n, f16v);
  const f16v r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
  f16v p = splat(1.f / 720);
  p = p * r + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  i16v scale_bits = (n + 127) << 23;
  f16v scale;
  std::memcpy(&scale, &scale_bits, sizeof scale);
  return p * scale;
}

// silu(g) * up, silu(g) = g / (1 + e^-g), with e^-|g| so that the exponential never overflows.
inline f16v silu_times(f16v g, f16v up) {
  const f16v e = exp_nonpositive(-vabs(g));
  return (g < 0.f ? g * e : g) / (1.f + e) * up;
}

// One decode step's attention for every slot, with RoPE and the cache write fused in.
// qkv: [S, (H + 2*KVH) * D] fp32, the fused projection output (q heads, k heads, v heads).
// cos, sin: [S, D] fp32 at each slot's position (the model's own rotary embedding).
// positions: [S] int64, where each slot's new token goes; it attends to positions 0..pos.
// k_cache: [S, KVH, CAP / 16, D, 16]: blocks of 16 positions stored dimension-major, so the
// scores of 16 positions are 16-lane FMAs with no horizontal sums.
// v_cache: [S, KVH, CAP, D]. Returns [S, H * D] fp32.
// int8 caches (KV = int8_t) hold each (position, K/V head)'s vector quantized with its own scale,
// max |x| / 127, kept in k_scale / v_scale [S, KVH, CAP] fp32: half of bf16's bytes, and attention
// at decode is bound by reading them. The scales are applied to the scores (K) and to the softmax
// weights (V), so the int8 values are only converted, never dequantized into a buffer.
// Query head h reads K/V head h / G, G = H / KVH, as transformers' repeat_kv does.
// G and D / 16 are compile-time so that the accumulators live in registers.
template <int G, int CH, typename KV>
void attend(const float* qkv, const float* cos, const float* sin, const int64_t* positions, KV* k_cache,
            KV* v_cache, float* k_scale, float* v_scale, float* out, int64_t S, int64_t KVH, int64_t CAP,
            float scaling) {
  constexpr int64_t D = CH * W, half = D / 2;
  constexpr bool quantized = std::is_same_v<KV, int8_t>;
  const int64_t H = G * KVH, row = (H + 2 * KVH) * D;
  at::parallel_for(0, S * KVH, 1, [&](int64_t begin, int64_t end) {
    float q[G][D], k[D];
    std::vector<float> scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t s = item / KVH, kvh = item % KVH, pos = positions[s], len = pos + 1;
      const int64_t blocks = (len + W - 1) / W, stride = (blocks + 1) / 2 * 2 * W;
      const float* src = qkv + s * row;
      const float* c = cos + s * D;
      const float* sn = sin + s * D;
      // rotate_half(x) = cat(-x[half:], x[:half]); x * cos + rotate_half(x) * sin.
      auto rope = [&](const float* x, float* y, float scale) {
        for (int64_t d = 0; d < half; ++d) y[d] = (x[d] * c[d] - x[d + half] * sn[d]) * scale;
        for (int64_t d = half; d < D; ++d) y[d] = (x[d] * c[d] + x[d - half] * sn[d]) * scale;
      };
      for (int g = 0; g < G; ++g) rope(src + (kvh * G + g) * D, q[g], scaling);
      rope(src + (H + kvh) * D, k, 1.0f);
      KV* kc = k_cache + (s * KVH + kvh) * CAP * D;
      KV* vc = v_cache + (s * KVH + kvh) * CAP * D;
      const float* v = src + (H + KVH + kvh) * D;
      float* ks = quantized ? k_scale + (s * KVH + kvh) * CAP : nullptr;
      float* vs = quantized ? v_scale + (s * KVH + kvh) * CAP : nullptr;
      if constexpr (quantized) {
        // The scheme of quantize_kv (tasks/sampling/backend_continuous.py), which writes a prompt's positions.
        float top_k = 0.f, top_v = 0.f;
        for (int64_t d = 0; d < D; ++d) top_k = std::max(top_k, std::fabs(k[d])), top_v = std::max(top_v, std::fabs(v[d]));
        top_k = std::max(top_k, 1e-12f), top_v = std::max(top_v, 1e-12f);
        const float inv_k = 127.f / top_k, inv_v = 127.f / top_v;
        for (int64_t d = 0; d < D; ++d) {
          kc[(pos / W) * D * W + d * W + pos % W] = static_cast<int8_t>(std::nearbyint(k[d] * inv_k));
          vc[pos * D + d] = static_cast<int8_t>(std::nearbyint(v[d] * inv_v));
        }
        ks[pos] = top_k / 127.f, vs[pos] = top_v / 127.f;
      } else {
        for (int64_t d = 0; d < D; ++d) {
          put(kc + (pos / W) * D * W + d * W + pos % W, k[d]);
          put(vc + pos * D + d, v[d]);
        }
      }
      // Scores, two blocks of 16 positions at a time (independent FMA chains); the positions
      // past `len` are masked. A second block past the cache's end is never read.
      scores.resize(G * stride);
      for (int64_t b = 0; b < blocks; b += 2) {
        const KV* block = kc + b * D * W;
        const bool pair = b + 1 < blocks;
        f16v one[G] = {}, two[G] = {};
        {  // the hardware prefetcher starts late on each new slot, and keeps too few lines in flight
          const char* ahead = reinterpret_cast<const char*>(block + PREFETCH_K_BLOCKS * D * W);
          for (size_t line = 0; line < 2 * D * W * sizeof(KV); line += 64) __builtin_prefetch(ahead + line);
        }
        for (int64_t d = 0; d < D; ++d) {
          const f16v k1 = load(block + d * W);
          const f16v k2 = pair ? load(block + (D + d) * W) : f16v{};
          for (int g = 0; g < G; ++g) {
            one[g] += q[g][d] * k1;
            two[g] += q[g][d] * k2;
          }
        }
        if constexpr (quantized) {
          const f16v scale_one = load(ks + b * W), scale_two = pair ? load(ks + (b + 1) * W) : f16v{};
          for (int g = 0; g < G; ++g) one[g] *= scale_one, two[g] *= scale_two;
        }
        for (int g = 0; g < G; ++g) {
          store(scores.data() + g * stride + b * W, one[g]);
          store(scores.data() + g * stride + (b + 1) * W, two[g]);
        }
      }
      for (int g = 0; g < G; ++g) {
        float* sg = scores.data() + g * stride;
        for (int64_t t = len; t < blocks * W; ++t) sg[t] = -INFINITY;
        f16v top = splat(-INFINITY);
        for (int64_t b = 0; b < blocks; ++b) top = vmax(top, load(sg + b * W));
        const float m = hmax(top);
        f16v total{};
        for (int64_t b = 0; b < blocks; ++b) {
          const f16v e = exp_nonpositive(load(sg + b * W) - m);
          total += e;
          store(sg + b * W, e);
        }
        const float inv = 1.f / hsum(total);
        for (int64_t b = 0; b < blocks; ++b) store(sg + b * W, load(sg + b * W) * inv);
      }
      f16v acc[G][CH] = {};
      for (int64_t t = 0; t < len; ++t) {
        const KV* vt = vc + t * D;
        __builtin_prefetch(reinterpret_cast<const char*>(vt) + PREFETCH_V_LINES * 64);
        float weight[G];
        for (int g = 0; g < G; ++g) weight[g] = quantized ? scores[g * stride + t] * vs[t] : scores[g * stride + t];
        for (int ch = 0; ch < CH; ++ch) {
          const f16v vd = load(vt + ch * W);
          for (int g = 0; g < G; ++g) acc[g][ch] += weight[g] * vd;
        }
      }
      for (int g = 0; g < G; ++g)
        for (int ch = 0; ch < CH; ++ch) store(out + s * H * D + (kvh * G + g) * D + ch * W, acc[g][ch]);
    }
  });
}

template <typename KV>
void dispatch(int64_t G, int64_t D, const float* qkv, const float* cos, const float* sin, const int64_t* positions,
              KV* k_cache, KV* v_cache, float* k_scale, float* v_scale, float* out, int64_t S, int64_t KVH,
              int64_t CAP, float scaling) {
#define SELFDISTILL_CASE(g, ch)                                                                             \
  if (G == g && D == ch * W) {                                                                              \
    attend<g, ch>(qkv, cos, sin, positions, k_cache, v_cache, k_scale, v_scale, out, S, KVH, CAP, scaling); \
    return;                                                                                                 \
  }
#define SELFDISTILL_CASES(ch) \
  SELFDISTILL_CASE(1, ch) SELFDISTILL_CASE(2, ch) SELFDISTILL_CASE(3, ch) SELFDISTILL_CASE(4, ch) \
  SELFDISTILL_CASE(5, ch) SELFDISTILL_CASE(6, ch) SELFDISTILL_CASE(7, ch) SELFDISTILL_CASE(8, ch)
  SELFDISTILL_CASES(4)  // head_dim 64
  SELFDISTILL_CASES(8)  // head_dim 128
#undef SELFDISTILL_CASES
#undef SELFDISTILL_CASE
  TORCH_CHECK(false, "no kernel for ", G, " query heads per K/V head, head_dim ", D);
}

// Whether decode_attention has a kernel for this shape (the backend uses eager PyTorch otherwise).
bool supports(int64_t heads, int64_t kv_heads, int64_t head_dim) {
  const int64_t G = kv_heads > 0 && heads % kv_heads == 0 ? heads / kv_heads : 0;
  return G >= 1 && G <= 8 && (head_dim == 64 || head_dim == 128);
}

torch::Tensor decode_attention(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor positions,
                               torch::Tensor k_cache, torch::Tensor v_cache, int64_t heads, double scaling,
                               c10::optional<torch::Tensor> k_scale, c10::optional<torch::Tensor> v_scale) {
  TORCH_CHECK(qkv.dtype() == torch::kFloat && qkv.is_contiguous() && qkv.dim() == 2, "qkv: contiguous fp32 [S, W]");
  TORCH_CHECK(cos.dtype() == torch::kFloat && sin.dtype() == torch::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous(), "cos/sin: contiguous fp32 [S, D]");
  TORCH_CHECK(positions.dtype() == torch::kLong && positions.is_contiguous(), "positions: contiguous int64");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.dtype() == v_cache.dtype() &&
                  k_cache.dim() == 5 && v_cache.dim() == 4, "caches: contiguous K [S, KVH, CAP/16, D, 16], V [S, KVH, CAP, D]");
  const int64_t S = v_cache.size(0), KVH = v_cache.size(1), CAP = v_cache.size(2), D = v_cache.size(3);
  TORCH_CHECK(k_cache.size(0) == S && k_cache.size(1) == KVH && k_cache.size(2) * W == CAP && k_cache.size(3) == D &&
                  k_cache.size(4) == W && D % W == 0, "K and V caches disagree, or head_dim is not a multiple of 16");
  TORCH_CHECK(qkv.size(0) == S && positions.size(0) == S && cos.size(0) == S && cos.size(1) == D,
              "slot counts disagree");
  TORCH_CHECK(heads % KVH == 0 && qkv.size(1) == (heads + 2 * KVH) * D, "qkv width is not (H + 2 KVH) D");
  TORCH_CHECK(positions.numel() == 0 || (positions.max().item<int64_t>() < CAP && positions.min().item<int64_t>() >= 0),
              "a position is outside the cache");
  const bool quantized = k_cache.dtype() == torch::kChar;
  const bool scaled = k_scale.has_value() && k_scale->defined() && v_scale.has_value() && v_scale->defined();
  TORCH_CHECK(quantized == scaled, "int8 caches need k_scale and v_scale, and only they take them");
  if (quantized) {
    for (const auto& t : {*k_scale, *v_scale})
      TORCH_CHECK(t.dtype() == torch::kFloat && t.is_contiguous() && t.dim() == 3 && t.size(0) == S && t.size(1) == KVH &&
                      t.size(2) == CAP, "k_scale/v_scale: contiguous fp32 [S, KVH, CAP]");
  }
  auto out = torch::empty({S, heads * D}, qkv.options());
  const int64_t G = heads / KVH;
  const float scale = static_cast<float>(scaling);
  const float* q = qkv.data_ptr<float>();
  const float* c = cos.data_ptr<float>();
  const float* sn = sin.data_ptr<float>();
  const int64_t* p = positions.data_ptr<int64_t>();
  if (quantized) {
    dispatch(G, D, q, c, sn, p, k_cache.data_ptr<int8_t>(), v_cache.data_ptr<int8_t>(), k_scale->data_ptr<float>(),
             v_scale->data_ptr<float>(), out.data_ptr<float>(), S, KVH, CAP, scale);
  } else if (k_cache.dtype() == torch::kBFloat16) {
    dispatch(G, D, q, c, sn, p, k_cache.data_ptr<at::BFloat16>(), v_cache.data_ptr<at::BFloat16>(), nullptr, nullptr,
             out.data_ptr<float>(), S, KVH, CAP, scale);
  } else {
    TORCH_CHECK(k_cache.dtype() == torch::kFloat, "caches: int8, bf16 or fp32");
    dispatch(G, D, q, c, sn, p, k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), nullptr, nullptr,
             out.data_ptr<float>(), S, KVH, CAP, scale);
  }
  return out;
}

// Each row of x quantized to int8 with its own scale (max |row| / 127), the input row first made
// what the linear's input is: RMSNorm(x) with `norm_w` (nullptr: none), or, `gated`, silu(gate) * up
// of x = [gate | up]. Returns the int8 rows [N, K] and fills row_scale [N].
// Rows [begin, end) of x -> qp (int8 [N, K]) and rs (their scales).
void quantize_range(const float* xp, int64_t K, const float* nw, double eps, bool gated, int8_t* qp, float* rs,
                    int64_t begin, int64_t end) {
  const int64_t full = K / W * W;
  {
    std::vector<float> buffer(K);
    for (int64_t n = begin; n < end; ++n) {
      const float* row = xp + n * (gated ? 2 * K : K);
      if (gated) {
        for (int64_t i = 0; i < full; i += W) store(buffer.data() + i, silu_times(load(row + i), load(row + K + i)));
        for (int64_t i = full; i < K; ++i) buffer[i] = row[i] / (1.f + std::exp(-row[i])) * row[K + i];
        row = buffer.data();
      } else if (nw) {
        f16v squares{};
        for (int64_t i = 0; i < full; i += W) squares += load(row + i) * load(row + i);
        float sum = hsum(squares);
        for (int64_t i = full; i < K; ++i) sum += row[i] * row[i];
        const float inv = 1.f / std::sqrt(sum / K + static_cast<float>(eps));
        for (int64_t i = 0; i < full; i += W) store(buffer.data() + i, load(row + i) * inv * load(nw + i));
        for (int64_t i = full; i < K; ++i) buffer[i] = row[i] * inv * nw[i];
        row = buffer.data();
      }
      int8_t* out_row = qp + n * K;
      f16v top_v{};
      for (int64_t i = 0; i < full; i += W) top_v = vmax(top_v, vabs(load(row + i)));
      float top = hmax(top_v);
      for (int64_t i = full; i < K; ++i) top = std::max(top, std::fabs(row[i]));
      top = std::max(top, 1e-12f);
      const float inv = 127.f / top;
      for (int64_t i = 0; i < full; i += W) {
        const b16v q = __builtin_convertvector(__builtin_convertvector(round_even(load(row + i) * inv), i16v), b16v);
        std::memcpy(out_row + i, &q, sizeof q);
      }
      for (int64_t i = full; i < K; ++i) out_row[i] = static_cast<int8_t>(std::nearbyint(row[i] * inv));
      rs[n] = top / 127.f;
    }
  }
}

// One OpenMP region on torch's threads: body(thread, threads). A decode step runs a few hundred
// small kernels; each fork/join costs as much as a small GEMM, and far more where the machine is
// shared and a waiting thread has to be scheduled again, so a kernel forks once. ATen and oneDNN
// calls inside run on the calling thread (nested parallelism is off).
template <typename F>
void in_one_region(int64_t max_threads, const F& body) {
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), max_threads)));
  if (threads == 1) {
    body(0, 1);
    return;
  }
#pragma omp parallel num_threads(threads)
  body(omp_get_thread_num(), omp_get_num_threads());
}

// [begin, end) of part `part` of `parts` of [0, n), cut at multiples of `align`.
inline std::pair<int64_t, int64_t> share(int64_t n, int64_t part, int64_t parts, int64_t align) {
  const int64_t units = (n + align - 1) / align;
  return {std::min(n, units * part / parts * align), std::min(n, units * (part + 1) / parts * align)};
}

// AMX int8 tiles (Intel Sapphire Rapids and later), where the compiler targets them: the decode
// GEMMs with no call into a library. oneDNN's matmul on a weight packed once (PackedWeight below)
// costs ~40 us of fixed overhead a call, as much as the product itself at decode's ~100 rows, and
// each of its calls forks the threads again.
// An AMX weight: int8 [M / 16, K / 64, 16, 64], tile (t, kb) holding columns 16t..16t+15 and
// k = 64 kb..64 kb + 63 in the layout TDPBSSD reads: row r, bytes 4c..4c+3 = weight[16t + c, 64 kb + 4r + j].
// amx_block: the int32 products of 32 rows of q (int8, rows K apart) by two column tiles a and b,
// into c [32][32] (rows; a's 16 columns, then b's), exact.
#if defined(__AMX_INT8__) && defined(__AMX_TILE__) && defined(__linux__)
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// Linux hands a process the AMX state only once it asks (arch_prctl ARCH_REQ_XCOMP_PERM for
// XTILEDATA); without it the first tile instruction is SIGILL.
bool amx_usable() {
  static const bool granted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return granted;
}

// Tiles 0-3: products (16 rows x 16 int32); 4, 5: rows of q (16 x 64 int8); 6, 7: weight tiles.
void amx_configure() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) config.bytes_per_row[t] = 64, config.rows[t] = 16;
  _tile_loadconfig(&config);
}

// Back to the untouched tile state (the kernel's threads run other code next).
void amx_release() { _tile_release(); }

void amx_block(const int8_t* q, int64_t K, const int8_t* a, const int8_t* b, int32_t* c) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t kb = 0; kb < K / 64; ++kb) {
    _tile_loadd(4, q + kb * 64, K);
    _tile_loadd(5, q + 16 * K + kb * 64, K);
    _tile_loadd(6, a + kb * 1024, 64);
    _tile_loadd(7, b + kb * 1024, 64);
    _tile_dpbssd(0, 4, 6);
    _tile_dpbssd(1, 4, 7);
    _tile_dpbssd(2, 5, 6);
    _tile_dpbssd(3, 5, 7);
  }
  _tile_stored(0, c, 128);
  _tile_stored(1, c + 16, 128);
  _tile_stored(2, c + 512, 128);
  _tile_stored(3, c + 528, 128);
}
#else
bool amx_usable() { return false; }
void amx_configure() {}
void amx_release() {}
void amx_block(const int8_t*, int64_t, const int8_t*, const int8_t*, int32_t*) {
  TORCH_CHECK(false, "built without AMX");
}
#endif

// weight int8 [M, K] -> its AMX layout (M a multiple of 32, K of 64).
torch::Tensor amx_pack(const torch::Tensor& weight) {
  TORCH_CHECK(weight.dtype() == torch::kChar && weight.dim() == 2, "weight: int8 [M, K]");
  const int64_t M = weight.size(0), K = weight.size(1);
  TORCH_CHECK(M % 32 == 0 && K % 64 == 0, "AMX weights: M a multiple of 32, K of 64");
  return weight.contiguous().view({M / 16, 16, K / 64, 16, 4}).permute({0, 2, 3, 1, 4}).contiguous()
      .view({M / 16, K / 64, 16, 64});
}

// Whether `amx` is an AMX weight for weight_t [K, M].
void check_amx(const torch::Tensor& amx, const torch::Tensor& weight_t) {
  TORCH_CHECK(amx_usable(), "AMX weights on a CPU or build without AMX");
  TORCH_CHECK(amx.dtype() == torch::kChar && amx.is_contiguous() && amx.dim() == 4 &&
                  amx.size(0) * 16 == weight_t.size(1) && amx.size(1) * 64 == weight_t.size(0) && amx.size(2) == 16 &&
                  amx.size(3) == 64, "AMX weight: another shape");
}

// The int32 products of int8 rows q [N, K] (N a multiple of 32) by AMX weight w: [N, M], exact.
// For the load-time check against _int_mm and the tests.
torch::Tensor amx_gemm(const torch::Tensor& q, const torch::Tensor& w) {
  TORCH_CHECK(q.dtype() == torch::kChar && q.is_contiguous() && q.dim() == 2 && q.size(0) % 32 == 0 &&
                  q.size(1) == w.size(1) * 64, "q: int8 [32 n, K]");
  TORCH_CHECK(amx_usable(), "no AMX here");
  const int64_t N = q.size(0), K = q.size(1), M = w.size(0) * 16, tile = K / 64 * 1024;
  auto out = torch::empty({N, M}, q.options().dtype(torch::kInt));
  const int8_t* qp = q.data_ptr<int8_t>();
  const int8_t* wp = w.data_ptr<int8_t>();
  int32_t* op = out.data_ptr<int32_t>();
  amx_configure();
  alignas(64) int32_t c[32 * 32];
  for (int64_t t = 0; t < M / 16; t += 2)
    for (int64_t r = 0; r < N; r += 32) {
      amx_block(qp + r * K, K, wp + t * tile, wp + (t + 1) * tile, c);
      for (int64_t i = 0; i < 32; ++i) std::memcpy(op + (r + i) * M + t * 16, c + i * 32, 32 * sizeof(int32_t));
    }
  amx_release();
  return out;
}

// An int8 weight packed once into oneDNN's own layout (onednn::qlinear_prepack), for its matmul
// primitive (AMX where the CPU has it). at::_int_mm goes through oneDNN's older GEMM API, which
// packs the weight again on every call: measured on SmolLM2-135M's 30 layers at 101 rows, 25.7 ms
// per decode step against 19.5 packed; at 1,300 prefill rows, 149 against 92 ms.
// gemm(q) = float(q @ weight^T): the int32 product as fp32, as linear_int8 converts it (the
// activation and weight scales of 1 leave it unscaled). The ops are PyTorch's x86 quantization
// ops, called through the dispatcher; cpu_kernels.py checks at load that the products are
// exactly _int_mm's, and packs nothing where they are not, or where the ops are missing.
struct PackedWeight {
  torch::Tensor packed, ones, zeros;
  int64_t K, M;

  explicit PackedWeight(const torch::Tensor& weight) {  // int8 [M, K]
    TORCH_CHECK(weight.dtype() == torch::kChar && weight.dim() == 2, "weight: int8 [M, K]");
    M = weight.size(0), K = weight.size(1);
    static const auto prepack = c10::Dispatcher::singleton().findSchemaOrThrow("onednn::qlinear_prepack", "");
    torch::jit::Stack stack{weight.contiguous(), c10::IValue()};
    prepack.callBoxed(&stack);
    packed = stack.at(0).toTensor();
    ones = torch::ones({M});
    zeros = torch::zeros({M}, torch::kLong);
  }

  torch::Tensor gemm(const torch::Tensor& q) const {
    TORCH_CHECK(q.dtype() == torch::kChar && q.dim() == 2 && q.size(1) == K, "q: int8 [N, K]");
    static const auto qlinear = c10::Dispatcher::singleton().findSchemaOrThrow("onednn::qlinear_pointwise", "");
    torch::jit::Stack stack{q, 1.0, int64_t{0}, packed, ones, zeros, c10::IValue(), 1.0, int64_t{0},
                            static_cast<int64_t>(torch::kFloat), std::string("none"),
                            c10::List<std::optional<at::Scalar>>(), std::string("")};
    qlinear.callBoxed(&stack);
    return stack.at(0).toTensor();
  }
};

// out[n, to + m] = float(acc[n, m]) * rs[n] * ws[to + m] (+ bias[to + m]) (+ residual[n, to + m]) for
// rows [r0, r1) and m < count; acc int32 or fp32 (a packed weight's), `acc_stride` wide; ws, bias by
// the weight's output column; the residual's rows `stride` wide like out's.
template <typename A>
void dequantize(const A* acc, int64_t acc_stride, float* out, int64_t stride, int64_t to, int64_t count,
                const float* rs, const float* ws, const float* bp, const float* rp, int64_t r0, int64_t r1) {
  const int64_t full = count / W * W;
  for (int64_t n = r0; n < r1; ++n) {
    const float r = rs[n];
    const A* acc_row = acc + n * acc_stride;
    float* out_row = out + n * stride + to;
    const float* res_row = rp ? rp + n * stride + to : nullptr;
    for (int64_t m = 0; m < full; m += W) {
      f16v value = as_float(acc_row + m) * r * load(ws + to + m);
      if (bp) value += load(bp + to + m);
      if (res_row) value += load(res_row + m);
      store(out_row + m, value);
    }
    for (int64_t m = full; m < count; ++m) {
      float value = static_cast<float>(acc_row[m]) * r * ws[to + m];
      if (bp) value += bp[to + m];
      if (res_row) value += res_row[m];
      out_row[m] = value;
    }
  }
}

// fn(float(q @ weight)), the product handed over as fp32 (the packed weight's) or int32 (_int_mm's,
// into `buffer` [>= rows, M] where one is given).
template <typename F>
void with_product(const PackedWeight* packed, const torch::Tensor& q, const torch::Tensor& weight_t,
                  const torch::Tensor& buffer, const F& fn) {
  if (packed) {
    TORCH_CHECK(packed->K == weight_t.size(0) && packed->M == weight_t.size(1), "packed weight: another shape");
    fn(packed->gemm(q).data_ptr<float>());
    return;
  }
  if (!buffer.defined()) {
    fn(at::_int_mm(q, weight_t).data_ptr<int32_t>());
    return;
  }
  auto acc = buffer.narrow(0, 0, q.size(0));
  at::_int_mm_out(acc, q, weight_t);
  fn(acc.data_ptr<int32_t>());
}

// W8A8 linear, the arithmetic of backend_continuous.Int8Linear in one call: each input row
// quantized to int8 with its own scale (max |row| / 127), an int8 x int8 -> int32 GEMM (AMX
// tiles, oneDNN on a packed weight, or at::_int_mm), then
// out = float(acc) * row_scale * weight_scale (+ bias) (+ residual). What the input row is, is
// fused in too, so that no intermediate tensor is made:
// - norm_weight given: the row is RMSNorm(x) = x / sqrt(mean(x^2) + eps) * norm_weight;
// - gated: x is [N, 2F], gate then up (a fused gate/up projection), and the row is
//   silu(gate) * up: a Llama MLP's input to its down projection.
torch::Tensor linear_int8(torch::Tensor x, torch::Tensor weight_t, torch::Tensor weight_scale,
                          c10::optional<torch::Tensor> bias, c10::optional<torch::Tensor> norm_weight, double eps,
                          bool gated, c10::optional<torch::Tensor> residual, const PackedWeight* packed,
                          c10::optional<torch::Tensor> amx) {
  TORCH_CHECK(x.dtype() == torch::kFloat && x.dim() == 2 && x.is_contiguous(), "x: contiguous fp32 [N, K]");
  const int64_t N = x.size(0), K = gated ? x.size(1) / 2 : x.size(1), M = weight_t.size(1);
  TORCH_CHECK(weight_t.dtype() == torch::kChar && weight_t.dim() == 2 && weight_t.size(0) == K,
              "weight_t: int8 [K, M]");
  TORCH_CHECK(weight_scale.dtype() == torch::kFloat && weight_scale.is_contiguous() && weight_scale.numel() == M,
              "weight_scale: fp32 [M]");
  const bool has_norm = norm_weight.has_value() && norm_weight->defined();
  TORCH_CHECK(!(has_norm && gated), "norm and gate are not fused together");
  torch::Tensor norm_w = has_norm ? norm_weight->to(torch::kFloat).contiguous() : torch::Tensor();
  TORCH_CHECK(!has_norm || norm_w.numel() == K, "norm_weight: [K]");
  torch::Tensor bias_t = bias.has_value() && bias->defined() ? bias->to(torch::kFloat).contiguous() : torch::Tensor();
  torch::Tensor res_t = residual.has_value() && residual->defined() ? residual->contiguous() : torch::Tensor();
  TORCH_CHECK(!res_t.defined() || (res_t.dtype() == torch::kFloat && res_t.numel() == N * M), "residual: fp32 [N, M]");

  const bool use_amx = amx.has_value() && amx->defined();
  if (use_amx) check_amx(*amx, weight_t);
  const int64_t padded = use_amx ? (N + 31) / 32 * 32 : N;  // AMX takes rows 32 at a time
  auto quantized = torch::empty({padded, K}, x.options().dtype(torch::kChar));
  auto row_scale = torch::empty({N}, x.options());
  auto out = torch::empty({N, M}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* nw = has_norm ? norm_w.data_ptr<float>() : nullptr;
  int8_t* qp = quantized.data_ptr<int8_t>();
  float* rs = row_scale.data_ptr<float>();
  const float* ws = weight_scale.data_ptr<float>();
  const float* bp = bias_t.defined() ? bias_t.data_ptr<float>() : nullptr;
  const float* rp = res_t.defined() ? res_t.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  if (use_amx) {
    // AMX: one parallel region. Each thread quantizes its share of the rows (the buffer's rows past
    // N zeros), then takes a share of the column pairs through all rows, each 32 x 32 block
    // dequantized while in cache.
    const int64_t tile = K / 64 * 1024;
    const int8_t* wp = amx->data_ptr<int8_t>();
    in_one_region(at::get_num_threads(), [&](int thread, int threads) {
      const auto rows = share(N, thread, threads, 1);
      quantize_range(xp, K, nw, eps, gated, qp, rs, rows.first, rows.second);
      if (thread == 0) std::memset(qp + N * K, 0, (padded - N) * K);
#pragma omp barrier
      amx_configure();
      alignas(64) int32_t c[32 * 32];
      const auto pairs = share(M / 32, thread, threads, 1);
      for (int64_t t = pairs.first; t < pairs.second; ++t) {
        for (int64_t r = 0; r < N; r += 32) {
          amx_block(qp + r * K, K, wp + 2 * t * tile, wp + (2 * t + 1) * tile, c);
          dequantize(c, 32, op + r * M, M, 32 * t, 32, rs + r, ws, bp, rp ? rp + r * M : nullptr, 0,
                     std::min<int64_t>(32, N - r));
        }
      }
      amx_release();
    });
    return out;
  }
  // Rows quantized in parallel, then one GEMM on all rows (oneDNN splits it over the threads; it
  // measured ~3 ms per decode step faster than giving each thread half the rows and the whole
  // weight), then the dequantization in parallel.
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    quantize_range(xp, K, nw, eps, gated, qp, rs, begin, end);
  });
  // float(acc) * row scale * weight scale (+ bias) (+ residual), acc int32 or already fp32 (packed).
  with_product(packed, quantized, weight_t, torch::Tensor(), [&](auto* ap) {
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      dequantize(ap, M, op, M, 0, M, rs, ws, bp, rp, begin, end);
    });
  });
  return out;
}


// A Llama MLP in one call: x + down(silu(gate) * up), [gate | up] = gate_up(RMSNorm(x)), with
// linear_int8's arithmetic for each of the two projections (up to where the compiler fuses a
// multiply and an add).
// - With AMX weights, any number of rows: one parallel region, below.
// - Without, for prefill's rows: linear_int8 on thousands of rows writes a [rows, 2F] fp32 tensor to
//   memory and reads it back; here each thread takes blocks of `block` rows through both
//   projections, so a block's intermediates stay in its core's cache (oneDNN runs on the calling
//   thread inside the region). Decode's ~100 rows keep linear_int8 there: one GEMM on all rows
//   beats each thread reading the whole weight.
torch::Tensor mlp_int8(torch::Tensor x, torch::Tensor norm_weight, double eps, torch::Tensor gate_up_t,
                       torch::Tensor gate_up_scale, torch::Tensor down_t, torch::Tensor down_scale, int64_t block,
                       const PackedWeight* gate_up_packed, const PackedWeight* down_packed,
                       c10::optional<torch::Tensor> gate_up_amx, c10::optional<torch::Tensor> down_amx) {
  TORCH_CHECK(x.dtype() == torch::kFloat && x.dim() == 2 && x.is_contiguous(), "x: contiguous fp32 [N, K]");
  const int64_t N = x.size(0), K = x.size(1), F2 = gate_up_t.size(1), F = F2 / 2;
  TORCH_CHECK(gate_up_t.dtype() == torch::kChar && gate_up_t.dim() == 2 && gate_up_t.size(0) == K && F2 % 2 == 0,
              "gate_up_t: int8 [K, 2F]");
  TORCH_CHECK(down_t.dtype() == torch::kChar && down_t.dim() == 2 && down_t.size(0) == F && down_t.size(1) == K,
              "down_t: int8 [F, K]");
  TORCH_CHECK(gate_up_scale.dtype() == torch::kFloat && gate_up_scale.is_contiguous() && gate_up_scale.numel() == F2 &&
                  down_scale.dtype() == torch::kFloat && down_scale.is_contiguous() && down_scale.numel() == K,
              "scales: fp32 [2F] and [K]");
  TORCH_CHECK(block > 0 && K % W == 0 && F % W == 0, "block > 0; K and F multiples of 16");
  torch::Tensor norm_w = norm_weight.to(torch::kFloat).contiguous();
  TORCH_CHECK(norm_w.numel() == K, "norm_weight: [K]");
  auto out = torch::empty({N, K}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* nw = norm_w.data_ptr<float>();
  const float* s1 = gate_up_scale.data_ptr<float>();
  const float* s2 = down_scale.data_ptr<float>();
  float* op = out.data_ptr<float>();
  if (gate_up_amx.has_value() && gate_up_amx->defined() && down_amx.has_value() && down_amx->defined()) {
    // AMX, any number of rows, in one parallel region: the rows quantized by shares; gate_up by
    // shares of its 16-column tiles, each gate tile with its up tile, so that a thread makes
    // silu(gate) * up of its columns of the intermediate; its rows quantized by shares; down by
    // shares of its column pairs, the residual added.
    check_amx(*gate_up_amx, gate_up_t);
    check_amx(*down_amx, down_t);
    const int64_t padded = (N + 31) / 32 * 32, tile1 = K / 64 * 1024, tile2 = F / 64 * 1024;
    auto q1 = torch::empty({padded, K}, x.options().dtype(torch::kChar));
    auto q2 = torch::empty({padded, F}, x.options().dtype(torch::kChar));
    auto hidden = torch::empty({N, F}, x.options());
    std::vector<float> rs1(N), rs2(N);
    int8_t* q1p = q1.data_ptr<int8_t>();
    int8_t* q2p = q2.data_ptr<int8_t>();
    float* hp = hidden.data_ptr<float>();
    const int8_t* w1 = gate_up_amx->data_ptr<int8_t>();
    const int8_t* w2 = down_amx->data_ptr<int8_t>();
    in_one_region(at::get_num_threads(), [&](int thread, int threads) {
      const auto rows = share(N, thread, threads, 1);
      quantize_range(xp, K, nw, eps, false, q1p, rs1.data(), rows.first, rows.second);
      if (thread == 0) {
        std::memset(q1p + N * K, 0, (padded - N) * K);
        std::memset(q2p + N * F, 0, (padded - N) * F);
      }
#pragma omp barrier
      amx_configure();
      alignas(64) int32_t c[32 * 32];
      const auto tiles = share(F / 16, thread, threads, 1);
      for (int64_t t = tiles.first; t < tiles.second; ++t) {
        for (int64_t r = 0; r < N; r += 32) {
          amx_block(q1p + r * K, K, w1 + t * tile1, w1 + (F / 16 + t) * tile1, c);
          for (int64_t i = 0; i < std::min<int64_t>(32, N - r); ++i) {
            // linear_int8's gate_up output, then quantize_range's gated input.
            const float row_scale = rs1[r + i];
            const f16v gate = as_float(c + i * 32) * row_scale * load(s1 + 16 * t);
            const f16v up = as_float(c + i * 32 + 16) * row_scale * load(s1 + F + 16 * t);
            store(hp + (r + i) * F + 16 * t, silu_times(gate, up));
          }
        }
      }
#pragma omp barrier
      quantize_range(hp, F, nullptr, 0.0, false, q2p, rs2.data(), rows.first, rows.second);
#pragma omp barrier
      const auto pairs = share(K / 32, thread, threads, 1);
      for (int64_t t = pairs.first; t < pairs.second; ++t) {
        for (int64_t r = 0; r < N; r += 32) {
          amx_block(q2p + r * F, F, w2 + 2 * t * tile2, w2 + (2 * t + 1) * tile2, c);
          dequantize(c, 32, op + r * K, K, 32 * t, 32, rs2.data() + r, s2, nullptr, xp + r * K, 0,
                     std::min<int64_t>(32, N - r));
        }
      }
      amx_release();
    });
    return out;
  }
  const int64_t blocks = (N + block - 1) / block;
  in_one_region(blocks, [&](int thread, int threads) {
    auto q1 = torch::empty({block, K}, x.options().dtype(torch::kChar));
    auto q2 = torch::empty({block, F}, x.options().dtype(torch::kChar));
    // _int_mm's int32 products, reused block after block (packed weights hand over their own).
    auto acc1 = gate_up_packed ? torch::Tensor() : torch::empty({block, F2}, x.options().dtype(torch::kInt));
    auto acc2 = down_packed ? torch::Tensor() : torch::empty({block, K}, x.options().dtype(torch::kInt));
    std::vector<float> hidden(block * F2), rs1(block), rs2(block);
    for (int64_t b = thread; b < blocks; b += threads) {
      const int64_t r0 = b * block, R = std::min(block, N - r0);
      quantize_range(xp + r0 * K, K, nw, eps, false, q1.data_ptr<int8_t>(), rs1.data(), 0, R);
      with_product(gate_up_packed, q1.narrow(0, 0, R), gate_up_t, acc1, [&](auto* ap1) {
        for (int64_t n = 0; n < R; ++n)
          for (int64_t m = 0; m < F2; m += W)
            store(hidden.data() + n * F2 + m, as_float(ap1 + n * F2 + m) * rs1[n] * load(s1 + m));
      });
      quantize_range(hidden.data(), F, nullptr, 0.0, true, q2.data_ptr<int8_t>(), rs2.data(), 0, R);
      with_product(down_packed, q2.narrow(0, 0, R), down_t, acc2, [&](auto* ap2) {
        for (int64_t n = 0; n < R; ++n)
          for (int64_t m = 0; m < K; m += W)
            store(op + (r0 + n) * K + m, as_float(ap2 + n * K + m) * rs2[n] * load(s2 + m) + load(xp + (r0 + n) * K + m));
      });
    }
  });
  return out;
}

// The int8 LM head of a decode step with the sampler's first stages fused in, so that no
// [rows, vocab] logits tensor is written and scanned again:
// - the logits of linear_int8 (the same arithmetic: float(acc) * row_scale * weight_scale, + bias),
//   with x the final norm's output;
// - per row, its argmax (the first id of its largest logit: what a greedy row takes);
// - top_k > 0: per row, the candidates of the sampler's top-k on the tempered logits
//   (logit / T, T the row's temperature, 1 where it is 0): every id whose value is >= the k-th
//   largest (ties at the k-th kept, as transformers' TopKLogitsWarper keeps them), ordered by
//   value, descending, then by id, as backend_continuous.top_candidates orders them.
// The vocabulary goes in chunks of `chunk` columns (with AMX weights, each thread takes a share of
// the chunks; else a share of the rows): each chunk's int32 product stays in cache while it is
// filtered, and oneDNN's int8 GEMM runs ~3x faster on 2,048-column chunks than on a 49,152-column
// weight at once. A row keeps a threshold (the k-th largest value seen so far) and
// the values at or above it; most of a chunk is below it and costs one compare per 16 ids.
// Returns (values [N, width] fp32, padded with -inf; ids [N, width] int64, padded with 0;
// argmax [N] int64), width the largest row's candidate count (0 where top_k is 0).
std::vector<torch::Tensor> lm_head_topk(torch::Tensor x, torch::Tensor weight_t, torch::Tensor weight_scale,
                                        c10::optional<torch::Tensor> bias, torch::Tensor temperatures,
                                        int64_t top_k, int64_t chunk, c10::optional<torch::Tensor> amx) {
  TORCH_CHECK(x.dtype() == torch::kFloat && x.dim() == 2 && x.is_contiguous(), "x: contiguous fp32 [N, K]");
  const int64_t N = x.size(0), K = x.size(1), M = weight_t.size(1);
  TORCH_CHECK(weight_t.dtype() == torch::kChar && weight_t.dim() == 2 && weight_t.size(0) == K,
              "weight_t: int8 [K, M]");
  TORCH_CHECK(weight_scale.dtype() == torch::kFloat && weight_scale.is_contiguous() && weight_scale.numel() == M,
              "weight_scale: fp32 [M]");
  TORCH_CHECK(temperatures.dtype() == torch::kFloat && temperatures.is_contiguous() && temperatures.numel() == N,
              "temperatures: fp32 [N]");
  TORCH_CHECK(top_k >= 0 && top_k < M && chunk > 0 && chunk % W == 0, "0 <= top_k < vocab; chunk a multiple of 16");
  torch::Tensor bias_t = bias.has_value() && bias->defined() ? bias->to(torch::kFloat).contiguous() : torch::Tensor();
  const bool use_amx = amx.has_value() && amx->defined();
  if (use_amx) check_amx(*amx, weight_t);
  TORCH_CHECK(!use_amx || chunk % 32 == 0, "AMX: chunks of a multiple of 32 columns");
  const int64_t padded = use_amx ? (N + 31) / 32 * 32 : N;  // AMX takes rows 32 at a time

  auto quantized = torch::empty({padded, K}, x.options().dtype(torch::kChar));
  auto row_scale = torch::empty({N}, x.options());
  int8_t* qp = quantized.data_ptr<int8_t>();
  float* rs = row_scale.data_ptr<float>();
  const float* ws = weight_scale.data_ptr<float>();
  const float* bp = bias_t.defined() ? bias_t.data_ptr<float>() : nullptr;
  const float* tp = temperatures.data_ptr<float>();

  struct Row {
    std::vector<std::pair<float, int64_t>> kept;  // (tempered value, id), every one >= threshold
    float threshold = -INFINITY;
    size_t cap = 0;  // prune `kept` to the top k (and ties) once it holds this many
    float best = -INFINITY;
    int64_t best_id = 0;
  };
  std::vector<Row> rows(N);
  auto descending = [](const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  // Keeps the top k of `kept` and every value tied with the k-th; the k-th becomes the threshold.
  auto prune = [&](Row& row) {
    std::nth_element(row.kept.begin(), row.kept.begin() + (top_k - 1), row.kept.end(), descending);
    row.threshold = row.kept[top_k - 1].first;
    const float threshold = row.threshold;
    row.kept.erase(std::remove_if(row.kept.begin(), row.kept.end(),
                                  [threshold](const std::pair<float, int64_t>& c) { return c.first < threshold; }),
                   row.kept.end());
    if (row.kept.size() * 2 > row.cap) row.cap *= 2;  // many ties at the k-th: room to grow
  };

  // Row n's logits of chunk columns [c0, c0 + C), from their int32 products acc_row, into `row`.
  auto filter = [&](Row& row, int64_t n, const int32_t* acc_row, int64_t c0, int64_t C) {
    const float r = rs[n], t = tp[n] == 0.f ? 1.f : tp[n];
    const int64_t full_c = C / W * W;
    auto consider = [&](int64_t i, float value) {  // i within the chunk
      if (value > row.best) row.best = value, row.best_id = c0 + i;
      if (top_k == 0) return;
      const float tempered = value / t;
      if (tempered >= row.threshold) {
        row.kept.emplace_back(tempered, c0 + i);
        if (row.kept.size() >= row.cap) prune(row);
      }
    };
    for (int64_t i = 0; i < full_c; i += W) {
      f16v value = as_float(acc_row + i) * r * load(ws + c0 + i);
      if (bp) value += load(bp + c0 + i);
      // Scalar work only where a lane can enter the argmax or the candidates. Rounded
      // division by t > 0 is monotonic, so max(value) / t is the largest tempered value.
      const float top = hmax(value);
      if (top > row.best || (top_k > 0 && top / t >= row.threshold)) {
        for (int lane = 0; lane < W; ++lane) consider(i + lane, value[lane]);
      }
    }
    for (int64_t i = full_c; i < C; ++i) {
      float value = static_cast<float>(acc_row[i]) * r * ws[c0 + i];
      if (bp) value += bp[c0 + i];
      consider(i, value);
    }
  };
  auto start = [&](Row& row) {
    row.cap = static_cast<size_t>(std::max<int64_t>(8 * top_k, 256));
    row.kept.reserve(row.cap + W);
  };

  if (use_amx) {
    // AMX: each thread takes a share of the chunks through all rows, with rows of its own
    // (candidates, threshold, argmax), merged below: the union of every thread's values at or
    // above its own k-th holds every value at or above the whole vocabulary's k-th.
    const int64_t chunks = (M + chunk - 1) / chunk, tile = K / 64 * 1024;
    std::vector<std::vector<Row>> partial(std::max<int64_t>(1, at::get_num_threads()), std::vector<Row>(N));
    const int8_t* wp = amx->data_ptr<int8_t>();
    in_one_region(partial.size(), [&](int thread, int threads) {
      const auto own_rows = share(N, thread, threads, 1);
      quantize_range(x.data_ptr<float>(), K, nullptr, 0.0, false, qp, rs, own_rows.first, own_rows.second);
      if (thread == 0) std::memset(qp + N * K, 0, (padded - N) * K);
      std::vector<Row>& mine = partial[thread];
      for (Row& row : mine) start(row);
      std::vector<int32_t> acc(32 * chunk);
      alignas(64) int32_t c[32 * 32];
#pragma omp barrier
      amx_configure();
      const auto own = share(chunks, thread, threads, 1);
      for (int64_t chunk_index = own.first; chunk_index < own.second; ++chunk_index) {
        const int64_t c0 = chunk_index * chunk, C = std::min(chunk, M - c0);
        for (int64_t r0 = 0; r0 < N; r0 += 32) {
          const int64_t R = std::min<int64_t>(32, N - r0);
          for (int64_t t = c0 / 16; t < (c0 + C) / 16; t += 2) {
            amx_block(qp + r0 * K, K, wp + t * tile, wp + (t + 1) * tile, c);
            for (int64_t i = 0; i < R; ++i) std::memcpy(acc.data() + i * C + (16 * t - c0), c + i * 32, 32 * sizeof(int32_t));
          }
          for (int64_t i = 0; i < R; ++i) filter(mine[r0 + i], r0 + i, acc.data() + i * C, c0, C);
        }
      }
      amx_release();
    });
    for (int64_t n = 0; n < N; ++n) {
      Row& row = rows[n];
      for (const auto& part : partial) {
        const Row& other = part[n];
        if (other.best > row.best || (other.best == row.best && other.best_id < row.best_id))
          row.best = other.best, row.best_id = other.best_id;
        row.kept.insert(row.kept.end(), other.kept.begin(), other.kept.end());
      }
      row.cap = std::max(row.kept.size(), static_cast<size_t>(1));
    }
  } else {
    // Each thread takes a share of the rows (multiples of 16, an AMX tile's height) through the
    // whole vocabulary, chunk by chunk: no barrier, one fork per step.
    in_one_region(N / 16, [&](int thread, int threads) {
      const auto own = share(N, thread, threads, 16);
      const int64_t R = own.second - own.first;
      if (R == 0) return;
      quantize_range(x.data_ptr<float>(), K, nullptr, 0.0, false, qp, rs, own.first, own.second);
      for (int64_t n = own.first; n < own.second; ++n) start(rows[n]);
      const auto mine = quantized.narrow(0, own.first, R);
      for (int64_t c0 = 0; c0 < M; c0 += chunk) {
        const int64_t C = std::min(chunk, M - c0);
        auto acc = at::_int_mm(mine, weight_t.narrow(1, c0, C));
        const int32_t* ap = acc.data_ptr<int32_t>();
        for (int64_t n = own.first; n < own.second; ++n) filter(rows[n], n, ap + (n - own.first) * C, c0, C);
      }
    });
  }

  int64_t width = 0;
  if (top_k > 0) {
    for (auto& row : rows) {
      if (static_cast<int64_t>(row.kept.size()) > top_k) prune(row);
      std::sort(row.kept.begin(), row.kept.end(), descending);
      width = std::max<int64_t>(width, row.kept.size());
    }
  }
  auto values = torch::full({N, width}, -INFINITY, x.options());
  auto ids = torch::zeros({N, width}, x.options().dtype(torch::kLong));
  auto argmax = torch::empty({N}, x.options().dtype(torch::kLong));
  float* vp = values.data_ptr<float>();
  int64_t* ip = ids.data_ptr<int64_t>();
  int64_t* bestp = argmax.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) {
    bestp[n] = rows[n].best_id;
    for (size_t j = 0; j < rows[n].kept.size(); ++j) {
      vp[n * width + j] = rows[n].kept[j].first;
      ip[n * width + j] = rows[n].kept[j].second;
    }
  }
  return {values, ids, argmax};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, "RoPE, cache write and attention for one decode step",
        py::arg("qkv"), py::arg("cos"), py::arg("sin"), py::arg("positions"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("heads"), py::arg("scaling"), py::arg("k_scale") = py::none(), py::arg("v_scale") = py::none());
  m.def("linear_int8", &linear_int8, "W8A8 linear: per-row int8 activations, int8 weights, fp32 out",
        py::arg("x"), py::arg("weight_t"), py::arg("weight_scale"), py::arg("bias") = py::none(),
        py::arg("norm_weight") = py::none(), py::arg("eps") = 0.0, py::arg("gated") = false,
        py::arg("residual") = py::none(), py::arg("packed") = nullptr, py::arg("amx") = py::none());
  py::class_<PackedWeight>(m, "PackedWeight", "an int8 weight [M, K] packed once for oneDNN's matmul")
      .def(py::init<const torch::Tensor&>(), py::arg("weight"))
      .def("gemm", &PackedWeight::gemm, "float(q @ weight^T) of int8 rows q [N, K]");
  m.def("lm_head_topk", &lm_head_topk, "int8 LM head with each row's argmax and top-k candidates, no logits",
        py::arg("x"), py::arg("weight_t"), py::arg("weight_scale"), py::arg("bias"), py::arg("temperatures"),
        py::arg("top_k"), py::arg("chunk") = 2048, py::arg("amx") = py::none());
  m.def("mlp_int8", &mlp_int8, "a Llama MLP of many rows: x + down(silu(gate) * up), norm fused in, by row blocks",
        py::arg("x"), py::arg("norm_weight"), py::arg("eps"), py::arg("gate_up_t"), py::arg("gate_up_scale"),
        py::arg("down_t"), py::arg("down_scale"), py::arg("block") = 128, py::arg("gate_up_packed") = nullptr,
        py::arg("down_packed") = nullptr, py::arg("gate_up_amx") = py::none(), py::arg("down_amx") = py::none());
  m.def("amx_usable", &amx_usable, "whether this build and CPU run AMX int8 tiles (and Linux granted them)");
  m.def("amx_pack", &amx_pack, "an int8 weight [M, K] in the AMX tile layout", py::arg("weight"));
  m.def("amx_gemm", &amx_gemm, "int32 products of int8 rows [32 n, K] by an AMX weight", py::arg("q"), py::arg("amx"));
  m.def("supports", &supports, "whether decode_attention has a kernel for (heads, kv_heads, head_dim)");
}
