// herd's CPU kernels. The matmuls keep weights in GGML-style blocks of 32 and quantize the activations to
// int16 per block, so each block's dot product is an integer one (AVX2 vpmaddwd), scaled once per block; a
// prompt of many tokens instead multiplies by the dequantized weight with a float GEMM. The small ops of a
// decode step (RMSNorm, RoPE, one-token attention, SwiGLU) and decode_block, a whole decoder block for one
// token in one call, remove PyTorch's per-op dispatch from the decode loop. Built by herd/kernels/__init__.py
// with the local compiler and loaded as torch ops (torch.ops.herd.*); without a compiler herd uses PyTorch's.
//
// Weight layouts (one row per output feature, blocks of 32 along the input dim):
//   q4: qs uint8 [N, K/2], blocks in pairs: bytes 16b..16b+31 hold blocks b, b+1 (b even), byte j element j
//       of block b in its low nibble and element j of block b+1 in its high nibble, so one 32-byte load
//       and two masks give both. An odd last block takes 16 bytes, elements j and j+16 in byte j (GGML's
//       order). d, m fp32 [N, K/32]; w = d*q + m, q in 0..15.
//   q8: qs int8 [N, K]; d fp32 [N, K/32]; w = d*q.
// Built with -fopenmp: at::parallel_for is header code and runs serially without it.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>
#include <cmath>
#include <cstdint>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HERD_AVX2 1
#endif

namespace {

constexpr int64_t QK = 32;  // elements per block

// Activations: x ≈ d * a per block of 32, a int16 (scale amax/32767), stored per block as its 16 even-indexed
// elements then its 16 odd ones: the order in which 16-bit lanes of the packed weights unpack (below), so no
// shuffles are needed. int8 activations (llama.cpp's Q8 for these types) measured 96.7% greedy agreement with
// the fp32 path over 512 tokens of SmolLM2; 16 bits make the rounding negligible, and on AVX2 cost the same
// number of multiplies per block (two vpmaddwd instead of vpmaddubsw + vpmaddwd).
struct QuantizedActivations {
  at::Tensor q, d, s;  // int16 [M, K], fp32 [M, K/32] (d), fp32 [M, K/32] (d * sum of a: the offset term)
  const int16_t* qp;  // their data, fetched once (data_ptr<T>() checks cost more than a row's work)
  const float *dp, *sp;
};

inline int64_t act_index(int64_t j) { return (j % 2) * 16 + j / 2; }  // element j of a block -> its slot

void quantize_row(const float* x, int64_t k, int16_t* q, float* d, float* s) {
  for (int64_t b = 0; b < k / QK; ++b) {
    const float* xb = x + b * QK;
    float amax = 0.f;
    for (int j = 0; j < QK; ++j) amax = std::max(amax, std::fabs(xb[j]));
    const float inv = amax > 0.f ? 32767.f / amax : 0.f;
    int sum = 0;
    for (int j = 0; j < QK; ++j) {
      const int v = static_cast<int>(std::nearbyint(xb[j] * inv));
      q[b * QK + act_index(j)] = static_cast<int16_t>(v);
      sum += v;
    }
    d[b] = amax / 32767.f;
    s[b] = d[b] * static_cast<float>(sum);
  }
}

QuantizedActivations quantize_activations(const at::Tensor& x) {
  const int64_t m = x.size(0), k = x.size(1);
  QuantizedActivations a{at::empty({m, k}, x.options().dtype(at::kShort)), at::empty({m, k / QK}, x.options()),
                         at::empty({m, k / QK}, x.options()), nullptr, nullptr, nullptr};
  const float* xp = x.data_ptr<float>();
  int16_t* qp = a.q.data_ptr<int16_t>();
  float *dp = a.d.data_ptr<float>(), *sp = a.s.data_ptr<float>();
  a.qp = qp, a.dp = dp, a.sp = sp;
  at::parallel_for(0, m, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) quantize_row(xp + i * k, k, qp + i * k, dp + i * (k / QK), sp + i * (k / QK));
  });
  return a;
}

inline float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

constexpr int64_t TILE = 4;  // tokens sharing one unpacked weight block

// Scalar value of element e of a q4 row (the layout in the header comment).
inline int q4_value(const uint8_t* qs, int64_t nb, int64_t e) {
  const int64_t b = e / QK, j = e % QK;
  if ((b | 1) < nb) {  // one of a pair of blocks: the even block in low nibbles, the odd one in high
    const uint8_t byte = qs[(b / 2) * 2 * 16 + j];
    return b % 2 == 0 ? byte & 0x0F : byte >> 4;
  }
  const uint8_t byte = qs[b * 16 + j % 16];  // a last, unpaired block: elements j and j+16 share a byte
  return j < 16 ? byte & 0x0F : byte >> 4;
}

// Without AVX2: the same sums one element at a time; weight(e) is element e of the row.
template <typename Weight>
inline void scalar_dot(Weight weight, const float* d, const int16_t* aq, const float* ad, int64_t nb, int64_t k,
                       int64_t t, float* out) {
  for (int64_t i = 0; i < t; ++i) {
    float sum = 0.f;
    for (int64_t b = 0; b < nb; ++b) {
      int dot = 0;
      for (int64_t j = 0; j < QK; ++j) dot += weight(b * QK + j) * aq[i * k + b * QK + act_index(j)];
      sum += d[b] * ad[i * nb + b] * static_cast<float>(dot);
    }
    out[i] = sum;
  }
}

#ifdef HERD_AVX2
inline float hsum(__m256 v) {
  __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  r = _mm_add_ps(r, _mm_movehl_ps(r, r));
  r = _mm_add_ss(r, _mm_movehdup_ps(r));
  return _mm_cvtss_f32(r);
}

// A block's weights as two int16 vectors, its even-indexed and its odd-indexed elements (16 each).
struct Block16 {
  __m256i even, odd;
};

// Two q4 blocks from one 32-byte load. 16-bit lane i holds bytes 2i and 2i+1: bits 0-3 element 2i of the
// first block, 4-7 element 2i of the second, 8-11 element 2i+1 of the first, 12-15 element 2i+1 of the second.
inline void q4_pair(const uint8_t* p, Block16& first, Block16& second) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i low4 = _mm256_set1_epi16(0x000F);
  first = {_mm256_and_si256(v, low4), _mm256_and_si256(_mm256_srli_epi16(v, 8), low4)};
  second = {_mm256_and_si256(_mm256_srli_epi16(v, 4), low4), _mm256_srli_epi16(v, 12)};
}

// An unpaired last q4 block: 16 bytes, byte j holds elements j (bits 0-3) and j+16 (bits 4-7).
inline Block16 q4_single(const uint8_t* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i low4 = _mm_set1_epi16(0x000F);
  return {_mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), low4), _mm_and_si128(v, low4)),
          _mm256_set_m128i(_mm_srli_epi16(v, 12), _mm_and_si128(_mm_srli_epi16(v, 8), low4))};
}

// A q8 block: 32 signed bytes, lane i holds elements 2i (low byte) and 2i+1 (high byte); sign-extended.
inline Block16 q8_block(const int8_t* p) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return {_mm256_srai_epi16(_mm256_slli_epi16(v, 8), 8), _mm256_srai_epi16(v, 8)};
}

// sum_j w_j * a_j over one block as 8 int32 partial sums (|w| <= 128, |a| <= 32767: no overflow).
inline __m256i block_isum(const Block16& w, const int16_t* a) {
  return _mm256_add_epi32(_mm256_madd_epi16(w.even, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a))),
                          _mm256_madd_epi16(w.odd, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 16))));
}

// Eight blocks' partial sums -> one vector, lane j the total of s[j]: converting and scaling once per eight
// blocks instead of once per block (a scalar scale product and broadcast per block cost as much as its dot).
inline __m256i reduce8(const __m256i* s) {
  const __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(s[0], s[1]), _mm256_hadd_epi32(s[2], s[3]));
  const __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(s[4], s[5]), _mm256_hadd_epi32(s[6], s[7]));
  return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}

// y = sum over blocks of d_b * ad_b * (w_b . a_b) for one row and one token. unpack8(b, sums) gives the
// integer sums of blocks b..b+7 (b a multiple of 8); unpack(b, w) unpacks block b (and b+1 when b is even
// and b+1 < nb: q4 pairs) and returns how many it unpacked.
template <typename Unpack8, typename Unpack>
inline float row_dot(Unpack8 unpack8, Unpack unpack, const float* d, const int16_t* aq, const float* ad, int64_t nb) {
  __m256 acc = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 8 <= nb; b += 8) {
    __m256i sums[8];
    unpack8(b, sums);
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(reduce8(sums)), _mm256_mul_ps(_mm256_loadu_ps(d + b), _mm256_loadu_ps(ad + b)),
                          acc);
  }
  while (b < nb) {
    Block16 w[2];
    const int got = unpack(b, w);
    for (int u = 0; u < got; ++u, ++b)
      acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_isum(w[u], aq + b * QK)), _mm256_set1_ps(d[b] * ad[b]), acc);
  }
  return hsum(acc);
}

// The same for t <= TILE tokens, each unpacked block serving all of them.
template <typename Unpack>
inline void tile_dot(Unpack unpack, const float* d, const int16_t* aq, const float* ad, int64_t nb, int64_t k,
                     int64_t t, float* out) {
  __m256 acc[TILE];
  for (int64_t i = 0; i < t; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb;) {
    Block16 w[2];
    const int got = unpack(b, w);
    for (int u = 0; u < got; ++u, ++b)
      for (int64_t i = 0; i < t; ++i)
        acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_isum(w[u], aq + i * k + b * QK)),
                                 _mm256_set1_ps(d[b] * ad[i * nb + b]), acc[i]);
  }
  for (int64_t i = 0; i < t; ++i) out[i] = hsum(acc[i]);
}
#endif

// y[i, n] for tokens i0..i0+t-1 (t <= TILE) and one weight row.
void q4_row(const uint8_t* qs, const float* d, const float* m, const QuantizedActivations& a, int64_t i0, int64_t t,
            int64_t k, float* y, int64_t ldy) {
  const int64_t nb = k / QK;
  const int16_t* aq = a.qp + i0 * k;
  const float* ad = a.dp + i0 * nb;
  const float* as = a.sp + i0 * nb;
  float out[TILE];
#ifdef HERD_AVX2
  auto unpack = [&](int64_t b, Block16* w) -> int {
    if (b + 1 < nb) {
      q4_pair(qs + b * 16, w[0], w[1]);
      return 2;
    }
    w[0] = q4_single(qs + b * 16);
    return 1;
  };
  auto unpack8 = [&](int64_t b, __m256i* sums) {
    for (int j = 0; j < 8; j += 2) {
      Block16 w0, w1;
      q4_pair(qs + (b + j) * 16, w0, w1);
      sums[j] = block_isum(w0, aq + (b + j) * QK);
      sums[j + 1] = block_isum(w1, aq + (b + j + 1) * QK);
    }
  };
  if (t == 1)
    out[0] = row_dot(unpack8, unpack, d, aq, ad, nb);
  else
    tile_dot(unpack, d, aq, ad, nb, k, t, out);
#else
  scalar_dot([&](int64_t e) { return q4_value(qs, nb, e); }, d, aq, ad, nb, k, t, out);
#endif
  for (int64_t i = 0; i < t; ++i) y[i * ldy] = out[i] + dot(m, as + i * nb, nb);  // + sum_b m_b * d_b * sum(a_b)
}

void q8_row(const int8_t* qs, const float* d, const QuantizedActivations& a, int64_t i0, int64_t t, int64_t k,
            float* y, int64_t ldy) {
  const int64_t nb = k / QK;
  const int16_t* aq = a.qp + i0 * k;
  const float* ad = a.dp + i0 * nb;
  float out[TILE];
#ifdef HERD_AVX2
  auto unpack = [&](int64_t b, Block16* w) -> int {
    w[0] = q8_block(qs + b * QK);
    return 1;
  };
  auto unpack8 = [&](int64_t b, __m256i* sums) {
    for (int j = 0; j < 8; ++j) sums[j] = block_isum(q8_block(qs + (b + j) * QK), aq + (b + j) * QK);
  };
  if (t == 1)
    out[0] = row_dot(unpack8, unpack, d, aq, ad, nb);
  else
    tile_dot(unpack, d, aq, ad, nb, k, t, out);
#else
  scalar_dot([&](int64_t e) { return static_cast<int>(qs[e]); }, d, aq, ad, nb, k, t, out);
#endif
  for (int64_t i = 0; i < t; ++i) y[i * ldy] = out[i];
}

void check(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, int64_t k, at::ScalarType qtype) {
  TORCH_CHECK(x.size(-1) == k && k % QK == 0, "x has ", x.size(-1), " features, the weight ", k);
  TORCH_CHECK(qs.dim() == 2 && qs.scalar_type() == qtype && qs.is_contiguous() && d.is_contiguous(),
              "weight blocks in the wrong layout");
  TORCH_CHECK(d.scalar_type() == at::kFloat && d.dim() == 2 && d.size(0) == qs.size(0) && d.size(1) == k / QK,
              "scales must be fp32 [N, K/32]");
}

constexpr int64_t GEMM_TOKENS = 16;  // from this many tokens on, dequantize and use a float GEMM (faster per token)

// y [..., N] for x [..., K]: few tokens through `row` (integer dot products), many through `dense` (the
// dequantized weight, [N, K]) and a float GEMM.
template <typename Row, typename Dense>
at::Tensor linear(const at::Tensor& x_, int64_t n, Row row, Dense dense) {
  std::vector<int64_t> shape(x_.sizes().begin(), x_.sizes().end());
  shape.back() = n;
  const at::Tensor x = x_.reshape({-1, x_.size(-1)}).to(at::kFloat).contiguous();
  const int64_t m = x.size(0);
  if (m >= GEMM_TOKENS) return at::mm(x, dense().t()).view(shape);
  const QuantizedActivations a = quantize_activations(x);
  at::Tensor y = at::empty({m, n}, x.options());
  float* yp = y.data_ptr<float>();
  // Rows split across threads; a chunk of at least 32 rows keeps the fork/join cost small.
  at::parallel_for(0, n, 32, [&](int64_t lo, int64_t hi) {
    for (int64_t i0 = 0; i0 < m; i0 += TILE)
      for (int64_t r = lo; r < hi; ++r) row(a, r, i0, std::min(TILE, m - i0), yp + i0 * n + r, n);
  });
  return y.view(shape);
}

at::Tensor q4_dequantize(const at::Tensor& qs, const at::Tensor& d, const at::Tensor& m);
at::Tensor q8_dequantize(const at::Tensor& qs, const at::Tensor& d);

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, const at::Tensor& m) {
  const int64_t k = qs.size(1) * 2;
  check(x, qs, d, k, at::kByte);
  TORCH_CHECK(m.sizes() == d.sizes() && m.scalar_type() == at::kFloat && m.is_contiguous(), "offsets must match scales");
  const uint8_t* qp = qs.data_ptr<uint8_t>();
  const float *dp = d.data_ptr<float>(), *mp = m.data_ptr<float>();
  const int64_t nb = k / QK;
  return linear(
      x, qs.size(0),
      [&](const QuantizedActivations& a, int64_t r, int64_t i0, int64_t t, float* y, int64_t ldy) {
        q4_row(qp + r * (k / 2), dp + r * nb, mp + r * nb, a, i0, t, k, y, ldy);
      },
      [&] { return q4_dequantize(qs, d, m); });
}

at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d) {
  const int64_t k = qs.size(1);
  check(x, qs, d, k, at::kChar);
  const int8_t* qp = qs.data_ptr<int8_t>();
  const float* dp = d.data_ptr<float>();
  const int64_t nb = k / QK;
  return linear(
      x, qs.size(0),
      [&](const QuantizedActivations& a, int64_t r, int64_t i0, int64_t t, float* y, int64_t ldy) {
        q8_row(qp + r * k, dp + r * nb, a, i0, t, k, y, ldy);
      },
      [&] { return q8_dequantize(qs, d); });
}

// Dequantized rows (fp32 [N, K]): prompts of many tokens multiply by these with a float GEMM instead.
at::Tensor q4_dequantize(const at::Tensor& qs, const at::Tensor& d, const at::Tensor& m) {
  const int64_t n = qs.size(0), k = qs.size(1) * 2, nb = k / QK;
  at::Tensor w = at::empty({n, k}, d.options());
  const uint8_t* qp = qs.data_ptr<uint8_t>();
  const float *dp = d.data_ptr<float>(), *mp = m.data_ptr<float>();
  float* wp = w.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r)
      for (int64_t e = 0; e < k; ++e)
        wp[r * k + e] = dp[r * nb + e / QK] * static_cast<float>(q4_value(qp + r * (k / 2), nb, e)) + mp[r * nb + e / QK];
  });
  return w;
}

at::Tensor q8_dequantize(const at::Tensor& qs, const at::Tensor& d) {
  const int64_t n = qs.size(0), k = qs.size(1), nb = k / QK;
  at::Tensor w = at::empty({n, k}, d.options());
  const int8_t* qp = qs.data_ptr<int8_t>();
  const float* dp = d.data_ptr<float>();
  float* wp = w.data_ptr<float>();
  at::parallel_for(0, n * nb, 256, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i)
      for (int j = 0; j < QK; ++j) wp[i * QK + j] = dp[i] * static_cast<float>(qp[i * QK + j]);
  });
  return w;
}

// ---- the small ops of a decode step, each one pass over a few KB (PyTorch's take 25-35 us each) ----------


// Row kernels on raw fp32 pointers: the ops below and decode_block share them.

// y = x / sqrt(mean(x^2) + eps) * w, row by row.
void rms_norm_rows(const float* xp, const float* wp, int64_t rows, int64_t dim, float eps, float* yp) {
  at::parallel_for(0, rows, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const float* xr = xp + r * dim;
      const float inv = 1.f / std::sqrt(dot(xr, xr, dim) / static_cast<float>(dim) + eps);
      float* yr = yp + r * dim;
#pragma omp simd
      for (int64_t i = 0; i < dim; ++i) yr[i] = xr[i] * inv * wp[i];
    }
  });
}

// Attention of one query per (row b, head h) at q + b*q_stride + h*dim over `len` cached keys and values
// (row b, kv head h / (heads / kv_heads), position l at base + b*s0 + kvh*s1 + l*s2), every key visible.
// fp32 softmax, max-subtracted; out [B, heads, dim] contiguous.
struct Cached {
  const float* p;
  int64_t s0, s1, s2;
};

void attend_rows(const float* q, int64_t q_stride, int64_t batch, int64_t heads, int64_t kv_heads, int64_t dim,
                 Cached k, Cached v, int64_t len, float scale, float* out) {
  const int64_t group = heads / kv_heads;
  at::parallel_for(0, batch * heads, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> p(len);
    for (int64_t bh = lo; bh < hi; ++bh) {
      const int64_t b = bh / heads, h = bh % heads, kvh = h / group;
      const float* qr = q + b * q_stride + h * dim;
      const float* kb = k.p + b * k.s0 + kvh * k.s1;
      const float* vb = v.p + b * v.s0 + kvh * v.s1;
      float top = -INFINITY;
      for (int64_t l = 0; l < len; ++l) {
        p[l] = dot(qr, kb + l * k.s2, dim) * scale;
        top = std::max(top, p[l]);
      }
      float total = 0.f;
      for (int64_t l = 0; l < len; ++l) total += (p[l] = std::exp(p[l] - top));
      float* o = out + bh * dim;
      std::fill(o, o + dim, 0.f);
      for (int64_t l = 0; l < len; ++l) {
        const float* vr = vb + l * v.s2;
        const float pl = p[l] / total;
#pragma omp simd
        for (int64_t i = 0; i < dim; ++i) o[i] += pl * vr[i];
      }
    }
  });
}

// Rotate heads [0, heads) of `rows` rows of nh heads of hd values, row r by rot + r*hd = (cos, sin) pairs:
// Meta's interleaved layout, dims (2i, 2i+1) rotate together.
void rope_rows(float* x, const float* rot, int64_t rows, int64_t nh, int64_t heads, int64_t hd) {
  at::parallel_for(0, rows, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t p = lo; p < hi; ++p)
      for (int64_t h = 0; h < heads; ++h) {
        float* v = x + (p * nh + h) * hd;
        const float* r = rot + p * hd;
        for (int64_t i = 0; i < hd / 2; ++i) {
          const float a = v[2 * i], b = v[2 * i + 1], c = r[2 * i], s = r[2 * i + 1];
          v[2 * i] = a * c - b * s;
          v[2 * i + 1] = a * s + b * c;
        }
      }
  });
}

// y = silu(gate) * up per row of [gate | up] (2f values) -> f values.
void silu_mul_rows(const float* xp, int64_t rows, int64_t f, float* yp) {
  at::parallel_for(0, rows, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r)
      for (int64_t i = 0; i < f; ++i) {
        const float g = xp[r * 2 * f + i];
        yp[r * f + i] = g / (1.f + std::exp(-g)) * xp[r * 2 * f + f + i];
      }
  });
}

at::Tensor rms_norm(const at::Tensor& x_, const at::Tensor& w_, double eps) {
  const at::Tensor x = x_.contiguous(), w = w_.contiguous();
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat && w.dim() == 1 && x.size(-1) == w.size(0),
              "rms_norm wants fp32 x [..., D] and weight [D]");
  at::Tensor y = at::empty_like(x);
  rms_norm_rows(x.data_ptr<float>(), w.data_ptr<float>(), x.numel() / w.size(0), w.size(0), static_cast<float>(eps),
                y.data_ptr<float>());
  return y;
}

// q [B, H, 1, D]; k and v [B, Hkv, L, D], views of the cache (any strides on B, Hkv and L; D contiguous).
at::Tensor decode_attention(const at::Tensor& q_, const at::Tensor& k, const at::Tensor& v, double scale) {
  const at::Tensor q = q_.contiguous();
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1 && k.dim() == 4 && v.sizes() == k.sizes() && q.size(0) == k.size(0) &&
                  q.size(3) == k.size(3) && q.size(1) % k.size(1) == 0,
              "decode_attention wants q [B, H, 1, D] and k, v [B, Hkv, L, D]");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat &&
                  k.stride(3) == 1 && v.stride(3) == 1, "decode_attention wants fp32, D contiguous");
  at::Tensor out = at::empty_like(q);
  const int64_t heads = q.size(1), dim = q.size(3);
  attend_rows(q.data_ptr<float>(), heads * dim, q.size(0), heads, k.size(1), dim,
              {k.data_ptr<float>(), k.stride(0), k.stride(1), k.stride(2)},
              {v.data_ptr<float>(), v.stride(0), v.stride(1), v.stride(2)}, k.size(2), static_cast<float>(scale),
              out.data_ptr<float>());
  return out;
}

// silu(gate) * up for x [..., 2F] = [gate | up] (the fused w1/w3 projection's output) -> [..., F].
at::Tensor silu_mul(const at::Tensor& x_) {
  const at::Tensor x = x_.to(at::kFloat).contiguous();
  const int64_t f = x.size(-1) / 2;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = f;
  at::Tensor y = at::empty(shape, x.options());
  silu_mul_rows(x.data_ptr<float>(), x.numel() / (2 * f), f, y.data_ptr<float>());
  return y;
}

// In place: rotate heads [0, heads) of x [B, T, NH, hd] (fp32, contiguous) by rot [B, T, hd/2, 2] = (cos, sin).
void rope_(const at::Tensor& x, const at::Tensor& rot_, int64_t heads) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous() && x.scalar_type() == at::kFloat, "rope_ wants contiguous fp32 [B, T, NH, hd]");
  const at::Tensor rot = rot_.contiguous();
  const int64_t bt = x.size(0) * x.size(1), hd = x.size(3);
  TORCH_CHECK(rot.scalar_type() == at::kFloat && rot.numel() == bt * hd && heads <= x.size(2), "rope_: rot must be [B, T, hd/2, 2]");
  rope_rows(x.data_ptr<float>(), rot.data_ptr<float>(), bt, x.size(2), heads, hd);
}

// ---- a whole decoder block for one new token per sequence -------------------------------------------------

// w holds (qs, d, m) for each projection; an empty m means q8 blocks.
at::Tensor project(const at::Tensor& x, at::TensorList w, int64_t i) {
  const at::Tensor &qs = w[3 * i], &d = w[3 * i + 1], &m = w[3 * i + 2];
  return m.numel() ? q4_linear(x, qs, d, m) : q8_linear(x, qs, d);
}

// TransformerBlock.forward for x [B, 1, D] (one token per row, every row at position `pos`, cache rows
// 0..B-1), the same steps in one call so that a decode step costs one op per layer instead of ~40:
//   h = x + wo(attention(rope(wqkv(rms_norm(x)))))   (k and v written to the cache at pos first)
//   out = h + w2(silu_mul(w13(rms_norm(h))))
// Projections in w: (qs, d, m) for wqkv, wo, w13, w2. rot: (cos, sin) pairs [B, 1, hd/2, 2]; rope=false for
// NoPE layers. Caches: fp32 [slots, Hkv, capacity, hd], contiguous.
at::Tensor decode_block(const at::Tensor& x_, const at::Tensor& attn_norm, const at::Tensor& ffn_norm, at::TensorList w,
                        const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& rot_, int64_t pos,
                        int64_t heads, int64_t kv_heads, double eps, bool rope) {
  const at::Tensor x = x_.contiguous(), rot = rot_.contiguous();
  const int64_t batch = x.size(0), dim = x.size(-1), hd = k_cache.size(3), capacity = k_cache.size(2);
  const int64_t nh = heads + 2 * kv_heads;
  TORCH_CHECK(x.dim() == 3 && x.size(1) == 1 && x.scalar_type() == at::kFloat, "decode_block wants fp32 x [B, 1, D]");
  TORCH_CHECK(w.size() == 12, "decode_block wants (qs, d, m) for wqkv, wo, w13 and w2");
  TORCH_CHECK(k_cache.scalar_type() == at::kFloat && k_cache.is_contiguous() && v_cache.sizes() == k_cache.sizes() &&
                  v_cache.scalar_type() == at::kFloat && v_cache.is_contiguous() && k_cache.size(1) == kv_heads &&
                  batch <= k_cache.size(0) && 0 <= pos && pos < capacity,
              "decode_block: the caches must be contiguous fp32 [slots >= B, Hkv, capacity > pos, hd]");
  TORCH_CHECK(!rope || rot.numel() == batch * hd, "decode_block: rot must be [B, 1, hd/2, 2]");
  for (const at::Tensor* norm : {&attn_norm, &ffn_norm})
    TORCH_CHECK(norm->scalar_type() == at::kFloat && norm->is_contiguous() && norm->numel() == dim,
                "decode_block: norm weights must be contiguous fp32 [D]");
  const float eps_f = static_cast<float>(eps);

  at::Tensor h = at::empty_like(x);
  rms_norm_rows(x.data_ptr<float>(), attn_norm.data_ptr<float>(), batch, dim, eps_f, h.data_ptr<float>());
  at::Tensor qkv = project(h, w, 0);  // [B, 1, (H + 2 Hkv) hd]: q heads, k heads, v heads
  TORCH_CHECK(qkv.size(-1) == nh * hd, "decode_block: wqkv has ", qkv.size(-1), " outputs, want ", nh * hd);
  float* qkvp = qkv.data_ptr<float>();
  if (rope) rope_rows(qkvp, rot.data_ptr<float>(), batch, nh, heads + kv_heads, hd);
  float *kc = k_cache.data_ptr<float>(), *vc = v_cache.data_ptr<float>();
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t g = 0; g < kv_heads; ++g) {
      const int64_t at_ = ((b * kv_heads + g) * capacity + pos) * hd;
      std::copy_n(qkvp + (b * nh + heads + g) * hd, hd, kc + at_);
      std::copy_n(qkvp + (b * nh + heads + kv_heads + g) * hd, hd, vc + at_);
    }
  at::Tensor att = at::empty({batch, 1, heads * hd}, x.options());
  const Cached keys{kc, kv_heads * capacity * hd, capacity * hd, hd}, values{vc, kv_heads * capacity * hd, capacity * hd, hd};
  attend_rows(qkvp, nh * hd, batch, heads, kv_heads, hd, keys, values, pos + 1, 1.f / std::sqrt(static_cast<float>(hd)),
              att.data_ptr<float>());
  at::Tensor hidden = project(att, w, 1);
  float* hp = hidden.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  for (int64_t i = 0; i < batch * dim; ++i) hp[i] += xp[i];

  rms_norm_rows(hp, ffn_norm.data_ptr<float>(), batch, dim, eps_f, h.data_ptr<float>());
  at::Tensor gate_up = project(h, w, 2);
  const int64_t f = gate_up.size(-1) / 2;
  at::Tensor act = at::empty({batch, 1, f}, x.options());
  silu_mul_rows(gate_up.data_ptr<float>(), batch, f, act.data_ptr<float>());
  at::Tensor out = project(act, w, 3);
  float* op = out.data_ptr<float>();
  for (int64_t i = 0; i < batch * dim; ++i) op[i] += hp[i];
  return out;
}

bool has_avx2() {
#ifdef HERD_AVX2
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(herd, lib) {
  lib.def("q4_linear(Tensor x, Tensor qs, Tensor d, Tensor m) -> Tensor", &q4_linear);
  lib.def("q8_linear(Tensor x, Tensor qs, Tensor d) -> Tensor", &q8_linear);
  lib.def("q4_dequantize(Tensor qs, Tensor d, Tensor m) -> Tensor", &q4_dequantize);
  lib.def("q8_dequantize(Tensor qs, Tensor d) -> Tensor", &q8_dequantize);
  lib.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", &rms_norm);
  lib.def("decode_attention(Tensor q, Tensor k, Tensor v, float scale) -> Tensor", &decode_attention);
  lib.def("silu_mul(Tensor x) -> Tensor", &silu_mul);
  lib.def("rope_(Tensor(a!) x, Tensor rot, int heads) -> ()", &rope_);
  lib.def("decode_block(Tensor x, Tensor attn_norm, Tensor ffn_norm, Tensor[] weights, Tensor(a!) k_cache, "
          "Tensor(b!) v_cache, Tensor rot, int pos, int heads, int kv_heads, float eps, bool rope) -> Tensor",
          &decode_block);
  lib.def("vectorized() -> bool", [] { return has_avx2(); });
}
