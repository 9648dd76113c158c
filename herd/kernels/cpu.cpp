// herd's CPU kernels. The matmuls keep weights in GGML-style blocks of 32 and quantize the activations to
// int16 per block, so each block's dot product is an integer one (AVX2 vpmaddwd), scaled once per block; a
// prompt of many tokens instead multiplies by the dequantized weight with a float GEMM. The small ops of a
// decode step (RMSNorm, RoPE, one-token attention, SwiGLU) and decode_block, a whole decoder block for one
// token in one call, remove PyTorch's per-op dispatch from the decode loop. Built by herd/kernels/__init__.py
// with the local compiler and loaded as torch ops (torch.ops.herd.*); without a compiler herd uses PyTorch's.
//
// Weight layout: rows in groups of 8 (the last one padded with zero rows), each group's blocks of 32 inputs
// in order, one record per (group, block) holding the 8 rows' scales, offsets and values. A packed weight
// is a uint8 tensor [G, nb, record]; the record's size says which kind it is:
//   q4 (192 bytes): d[8] fp32, m[8] fp32, then four 32-byte vectors of 4-bit values: in vector v, 16-bit
//       lane 2r+h holds in bits 4s..4s+3 element 8v + 2s + h of row r. w = d*q + m, q 0..15.
//   q8 (288 bytes): d[8] fp32, then eight 32-byte vectors of int8 values: in vector v, 16-bit lane 2r+h
//       holds element 4v + h of row r in its low byte and element 4v + 2 + h in its high byte. w = d*q.
//   q8x (352 bytes): d[8] for elements 0-15, d[8] for 16-31, m[8], then the values as q8. w = d*q + m:
//       GGML Q5_1, Q5_K (5-bit values, scale and min per 32) and Q6_K (6-bit, scale per 16) exactly, and
//       any mix of the 4/5/6/8-bit types, so differently typed q/k/v can share one weight.
//   q4h (160 bytes) and q8xh (304 bytes): q4 and q8x with their scales and offsets in fp16 (F16C converts
//       them), a sixth and a seventh fewer bytes to read per token: decode reads every weight once per step.
// After one shift and mask (q4) or sign extension (q8), 32-bit lane r of a vector holds row r's elements
// (2j, 2j+1) as int16, so one vpmaddwd against the broadcast activation pair (a[2j], a[2j+1]) adds to all
// 8 rows' sums: 8 outputs per vector, no horizontal reduction, one scale multiply per block for 8 rows
// (llama.cpp's AVX2 gemv on its 8-row repacked Q4_0 works the same way).
// Built with -fopenmp: at::parallel_for is header code and runs serially without it.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HERD_AVX2 1
#endif

namespace {

constexpr int64_t QK = 32;    // elements per block
constexpr int64_t ROWS = 8;   // rows per group: one 8-lane vector of outputs
constexpr int64_t TILE = 4;   // tokens sharing one unpacked weight vector
constexpr int64_t Q4_RECORD = 2 * ROWS * 4 + ROWS * QK / 2;  // 192 bytes: d[8], m[8], 128 bytes of nibbles
constexpr int64_t Q8_RECORD = ROWS * 4 + ROWS * QK;          // 288 bytes: d[8], 256 values
constexpr int64_t Q8X_RECORD = 3 * ROWS * 4 + ROWS * QK;     // 352 bytes: d[8] twice, m[8], 256 values
constexpr int64_t Q4H_RECORD = 2 * ROWS * 2 + ROWS * QK / 2;  // 160 bytes: as q4, d and m in fp16
constexpr int64_t Q8XH_RECORD = 3 * ROWS * 2 + ROWS * QK;     // 304 bytes: as q8x, d and m in fp16

// Where element j (0..31) of row r (0..7) lives in a record's values: byte offset and, for q4, bit shift.
inline int64_t q4_byte(int64_t r, int64_t j) { return (j / 8) * 32 + 2 * (2 * r + j % 2) + (j % 8) / 4; }
inline int q4_shift(int64_t j) { return 4 * ((j % 8) / 2 % 2); }
inline int64_t q8_byte(int64_t r, int64_t j) { return (j / 4) * 32 + 2 * (2 * r + j % 2) + (j % 4) / 2; }

enum class Kind { q4, q8, q8x, q4h, q8xh };

constexpr int64_t record_size(Kind kind) {
  switch (kind) {
    case Kind::q4: return Q4_RECORD;
    case Kind::q8: return Q8_RECORD;
    case Kind::q8x: return Q8X_RECORD;
    case Kind::q4h: return Q4H_RECORD;
    case Kind::q8xh: return Q8XH_RECORD;
  }
  return 0;
}

inline float half_at(const uint8_t* rec, int64_t i) {
  uint16_t bits;
  std::memcpy(&bits, rec + 2 * i, 2);
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

// Weight (row r, element j) of a record, dequantized: what the vector kernels compute with, one at a time.
inline float weight_at(Kind kind, const uint8_t* rec, int64_t r, int64_t j) {
  const float* f = reinterpret_cast<const float*>(rec);
  switch (kind) {
    case Kind::q4:
      return f[r] * static_cast<float>((rec[64 + q4_byte(r, j)] >> q4_shift(j)) & 0x0F) + f[ROWS + r];
    case Kind::q4h:
      return half_at(rec, r) * static_cast<float>((rec[32 + q4_byte(r, j)] >> q4_shift(j)) & 0x0F) + half_at(rec, ROWS + r);
    case Kind::q8:
      return f[r] * static_cast<float>(static_cast<int8_t>(rec[32 + q8_byte(r, j)]));
    case Kind::q8x:
      return f[(j / 16) * ROWS + r] * static_cast<float>(static_cast<int8_t>(rec[96 + q8_byte(r, j)])) + f[2 * ROWS + r];
    case Kind::q8xh:
      return half_at(rec, (j / 16) * ROWS + r) * static_cast<float>(static_cast<int8_t>(rec[48 + q8_byte(r, j)])) +
             half_at(rec, 2 * ROWS + r);
  }
  return 0.f;
}

// Activations: x ≈ d * a per block of 32, a int16 (scale amax/32767). int8 activations (llama.cpp's Q8 for
// these types) measured 96.7% greedy agreement with the fp32 path over 512 tokens of SmolLM2; 16 bits make
// the rounding negligible and cost the same multiplies on AVX2 (vpmaddwd either way).
struct QuantizedActivations {
  at::Tensor q, d, s;  // int16 [M, K], fp32 [M, K/32] (d), fp32 [M, K/32] (d * sum of a: the offset term)
  const int16_t* qp;  // their data, fetched once (data_ptr<T>() checks cost more than a group's work)
  const float *dp, *sp;
};

void quantize_row(const float* x, int64_t k, int16_t* q, float* d, float* s) {
  for (int64_t b = 0; b < k / QK; ++b) {
    const float* xb = x + b * QK;
    float amax = 0.f;
#pragma omp simd reduction(max : amax)
    for (int j = 0; j < QK; ++j) amax = std::max(amax, std::fabs(xb[j]));
    const float inv = amax > 0.f ? 32767.f / amax : 0.f;
    int sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int j = 0; j < QK; ++j) {
      const int v = static_cast<int>(std::nearbyint(xb[j] * inv));
      q[b * QK + j] = static_cast<int16_t>(v);
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

// Activations as int8 per block of 32, for prompts: many tokens share each unpacked weight vector, and
// vpmaddubsw multiplies 32 byte pairs where vpmaddwd multiplies 16 int16 pairs, so a q4 block costs about
// half the instructions (llama.cpp's prefill quantizes activations to 8 bits the same way). Decode keeps
// int16 (see above). Each block's bytes are stored in the order of a q4 record's nibbles: a 32-bit lane r
// of vector v holds row r's elements (8v, 8v+4, 8v+1, 8v+5) in its low nibbles and (8v+2, 8v+6, 8v+3,
// 8v+7) in its high ones, so one broadcast of 4 activation bytes meets 8 rows' 4 weights.
constexpr int Q4_NIBBLE_ORDER[8] = {0, 4, 1, 5, 2, 6, 3, 7};  // stored byte t holds element Q4_NIBBLE_ORDER[t]

struct QuantizedActivations8 {
  at::Tensor q, d, s;  // int8 [M, K] in nibble order, fp32 [M, K/32] (d), fp32 [M, K/32] (d * sum of a)
  const int8_t* qp;
  const float *dp, *sp;
};

void quantize_row8(const float* x, int64_t k, int8_t* q, float* d, float* s) {
  for (int64_t b = 0; b < k / QK; ++b) {
    const float* xb = x + b * QK;
    float amax = 0.f;
#pragma omp simd reduction(max : amax)
    for (int j = 0; j < QK; ++j) amax = std::max(amax, std::fabs(xb[j]));
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    int sum = 0;
    for (int v = 0; v < 4; ++v)
      for (int t = 0; t < 8; ++t) {
        const int a = static_cast<int>(std::nearbyint(xb[8 * v + Q4_NIBBLE_ORDER[t]] * inv));
        q[b * QK + 8 * v + t] = static_cast<int8_t>(a);
        sum += a;
      }
    d[b] = amax / 127.f;
    s[b] = d[b] * static_cast<float>(sum);
  }
}

QuantizedActivations8 quantize_activations8(const at::Tensor& x) {
  const int64_t m = x.size(0), k = x.size(1);
  QuantizedActivations8 a{at::empty({m, k}, x.options().dtype(at::kChar)), at::empty({m, k / QK}, x.options()),
                          at::empty({m, k / QK}, x.options()), nullptr, nullptr, nullptr};
  const float* xp = x.data_ptr<float>();
  int8_t* qp = a.q.data_ptr<int8_t>();
  float *dp = a.d.data_ptr<float>(), *sp = a.s.data_ptr<float>();
  a.qp = qp, a.dp = dp, a.sp = sp;
  at::parallel_for(0, m, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) quantize_row8(xp + i * k, k, qp + i * k, dp + i * (k / QK), sp + i * (k / QK));
  });
  return a;
}

inline float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// One group of 8 rows times t <= TILE tokens: out[i][r] for token i (its activations at aq + i*k, ad and as
// + i*nb) and row r; `records` are the group's nb records.
using GroupKernel = void (*)(const uint8_t* records, const int16_t* aq, const float* ad, const float* as, int64_t nb,
                             float (*out)[ROWS]);

#ifdef HERD_AVX2
// Records are read in order, a whole model's worth per token (far more than L3): asking for the one 3 KB
// ahead measured 20-30% faster decode steps than leaving it to the hardware prefetcher (2-core EPYC; 1-8 KB
// ahead all within noise of each other).
constexpr int64_t PREFETCH = 3072;

inline __m256i pair(const int16_t* a) {  // (a[0], a[1]) in every 32-bit lane
  int32_t v;
  std::memcpy(&v, a, 4);
  return _mm256_set1_epi32(v);
}

// 8 scales of a record: fp32, or (H) fp16.
template <bool H>
inline __m256 scales8(const uint8_t* p) {
  if constexpr (H) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_loadu_ps(reinterpret_cast<const float*>(p));
}

// H: q4h records (fp16 scales and offsets), else q4.
template <int T, bool H>
void q4_group(const uint8_t* rec, const int16_t* aq, const float* ad, const float* as, int64_t nb, float (*out)[ROWS]) {
  constexpr int64_t record = H ? Q4H_RECORD : Q4_RECORD, values = H ? 32 : 64, scale_bytes = H ? 2 : 4;
  const int64_t k = nb * QK;
  const __m256i low4 = _mm256_set1_epi16(0x000F);
  __m256 acc[T], offset[T];
  for (int i = 0; i < T; ++i) acc[i] = offset[i] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b, rec += record) {
    for (int l = 0; l < record; l += 64) _mm_prefetch(reinterpret_cast<const char*>(rec + PREFETCH + l), _MM_HINT_T0);
    __m256i isum[T];
    for (int v = 0; v < 4; ++v) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rec + values + 32 * v));
      const __m256i w0 = _mm256_and_si256(x, low4), w1 = _mm256_and_si256(_mm256_srli_epi16(x, 4), low4),
                    w2 = _mm256_and_si256(_mm256_srli_epi16(x, 8), low4), w3 = _mm256_srli_epi16(x, 12);
      for (int i = 0; i < T; ++i) {
        const int16_t* a = aq + i * k + b * QK + 8 * v;
        const __m256i s = _mm256_add_epi32(
            _mm256_add_epi32(_mm256_madd_epi16(w0, pair(a)), _mm256_madd_epi16(w1, pair(a + 2))),
            _mm256_add_epi32(_mm256_madd_epi16(w2, pair(a + 4)), _mm256_madd_epi16(w3, pair(a + 6))));
        isum[i] = v ? _mm256_add_epi32(isum[i], s) : s;
      }
    }
    const __m256 d = scales8<H>(rec), m = scales8<H>(rec + ROWS * scale_bytes);
    for (int i = 0; i < T; ++i) {
      acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[i]), _mm256_mul_ps(d, _mm256_set1_ps(ad[i * nb + b])), acc[i]);
      offset[i] = _mm256_fmadd_ps(m, _mm256_set1_ps(as[i * nb + b]), offset[i]);
    }
  }
  for (int i = 0; i < T; ++i) _mm256_storeu_ps(out[i], _mm256_add_ps(acc[i], offset[i]));
}

// X: q8x records (a scale per 16 and an offset per 32), else q8; H (with X): q8xh, those in fp16.
template <int T, bool X, bool H = false>
void q8_group(const uint8_t* rec, const int16_t* aq, const float* ad, const float* as, int64_t nb, float (*out)[ROWS]) {
  constexpr int64_t record = X ? (H ? Q8XH_RECORD : Q8X_RECORD) : Q8_RECORD, values = X ? (H ? 48 : 96) : 32;
  constexpr int64_t scale_bytes = H ? 2 : 4;
  const int64_t k = nb * QK;
  __m256 acc[T], offset[T];
  for (int i = 0; i < T; ++i) acc[i] = offset[i] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b, rec += record) {
    for (int l = 0; l < record; l += 64) _mm_prefetch(reinterpret_cast<const char*>(rec + PREFETCH + l), _MM_HINT_T0);
    __m256i isum[2][T];  // elements 0-15 and 16-31
    for (int v = 0; v < 8; v += 2) {  // two vectors per step: elements 4v..4v+7
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rec + values + 32 * v));
      const __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rec + values + 32 + 32 * v));
      const __m256i x0 = _mm256_srai_epi16(_mm256_slli_epi16(x, 8), 8), x1 = _mm256_srai_epi16(x, 8);
      const __m256i y0 = _mm256_srai_epi16(_mm256_slli_epi16(y, 8), 8), y1 = _mm256_srai_epi16(y, 8);
      for (int i = 0; i < T; ++i) {
        const int16_t* a = aq + i * k + b * QK + 4 * v;
        const __m256i s = _mm256_add_epi32(
            _mm256_add_epi32(_mm256_madd_epi16(x0, pair(a)), _mm256_madd_epi16(x1, pair(a + 2))),
            _mm256_add_epi32(_mm256_madd_epi16(y0, pair(a + 4)), _mm256_madd_epi16(y1, pair(a + 6))));
        isum[v / 4][i] = v % 4 ? _mm256_add_epi32(isum[v / 4][i], s) : s;
      }
    }
    const __m256 d = scales8<H>(rec);
    for (int i = 0; i < T; ++i) {
      const __m256 scale = _mm256_set1_ps(ad[i * nb + b]);
      if constexpr (X) {
        acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[0][i]), _mm256_mul_ps(d, scale), acc[i]);
        acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[1][i]), _mm256_mul_ps(scales8<H>(rec + ROWS * scale_bytes), scale),
                                 acc[i]);
        offset[i] = _mm256_fmadd_ps(scales8<H>(rec + 2 * ROWS * scale_bytes), _mm256_set1_ps(as[i * nb + b]), offset[i]);
      } else {
        acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(isum[0][i], isum[1][i])), _mm256_mul_ps(d, scale),
                                 acc[i]);
      }
    }
  }
  for (int i = 0; i < T; ++i) _mm256_storeu_ps(out[i], _mm256_add_ps(acc[i], offset[i]));
}
// q4 / q4h records times int8 activations in nibble order: per block, 8 vpmaddubsw per token summed in
// int16 (each at most 2 x 15 x 127, eight of them under 32767), widened once.
template <int T, bool H>
void q4_group8(const uint8_t* rec, const int8_t* aq, const float* ad, const float* as, int64_t nb, float (*out)[ROWS]) {
  constexpr int64_t record = H ? Q4H_RECORD : Q4_RECORD, values = H ? 32 : 64, scale_bytes = H ? 2 : 4;
  const int64_t k = nb * QK;
  const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 acc[T], offset[T];
  for (int i = 0; i < T; ++i) acc[i] = offset[i] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b, rec += record) {
    for (int l = 0; l < record; l += 64) _mm_prefetch(reinterpret_cast<const char*>(rec + PREFETCH + l), _MM_HINT_T0);
    __m256i s16[T];
    for (int v = 0; v < 4; ++v) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rec + values + 32 * v));
      const __m256i lo = _mm256_and_si256(x, low4), hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), low4);
      for (int i = 0; i < T; ++i) {
        const int8_t* a = aq + i * k + b * QK + 8 * v;
        int32_t a0, a1;
        std::memcpy(&a0, a, 4);
        std::memcpy(&a1, a + 4, 4);
        const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(a0)),
                                           _mm256_maddubs_epi16(hi, _mm256_set1_epi32(a1)));
        s16[i] = v ? _mm256_add_epi16(s16[i], p) : p;
      }
    }
    const __m256 d = scales8<H>(rec), m = scales8<H>(rec + ROWS * scale_bytes);
    for (int i = 0; i < T; ++i) {
      const __m256i isum = _mm256_madd_epi16(s16[i], ones);
      acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(d, _mm256_set1_ps(ad[i * nb + b])), acc[i]);
      offset[i] = _mm256_fmadd_ps(m, _mm256_set1_ps(as[i * nb + b]), offset[i]);
    }
  }
  for (int i = 0; i < T; ++i) _mm256_storeu_ps(out[i], _mm256_add_ps(acc[i], offset[i]));
}
#else
// Without AVX2: each weight dequantized (weight_at) times the dequantized activation, one at a time.
template <Kind kind, int T>
void scalar_group(const uint8_t* rec, const int16_t* aq, const float* ad, const float* as, int64_t nb, float (*out)[ROWS]) {
  const int64_t k = nb * QK, record = record_size(kind);
  for (int i = 0; i < T; ++i) std::fill(out[i], out[i] + ROWS, 0.f);
  for (int64_t b = 0; b < nb; ++b, rec += record)
    for (int64_t r = 0; r < ROWS; ++r)
      for (int i = 0; i < T; ++i)
        for (int64_t j = 0; j < QK; ++j)
          out[i][r] += weight_at(kind, rec, r, j) * ad[i * nb + b] * static_cast<float>(aq[i * k + b * QK + j]);
}

template <int T, bool H>
void q4_group(const uint8_t* rec, const int16_t* aq, const float* ad, const float* as, int64_t nb, float (*out)[ROWS]) {
  scalar_group<H ? Kind::q4h : Kind::q4, T>(rec, aq, ad, as, nb, out);
}

template <int T, bool X, bool H = false>
void q8_group(const uint8_t* rec, const int16_t* aq, const float* ad, const float* as, int64_t nb, float (*out)[ROWS]) {
  scalar_group<X ? (H ? Kind::q8xh : Kind::q8x) : Kind::q8, T>(rec, aq, ad, as, nb, out);
}

template <int T, bool H>
void q4_group8(const uint8_t* rec, const int8_t* aq, const float* ad, const float* as, int64_t nb, float (*out)[ROWS]) {
  constexpr int stored_at[8] = {0, 2, 4, 6, 1, 3, 5, 7};  // the inverse of Q4_NIBBLE_ORDER
  const int64_t k = nb * QK, record = record_size(H ? Kind::q4h : Kind::q4);
  for (int i = 0; i < T; ++i) std::fill(out[i], out[i] + ROWS, 0.f);
  for (int64_t b = 0; b < nb; ++b, rec += record)
    for (int64_t r = 0; r < ROWS; ++r)
      for (int i = 0; i < T; ++i)
        for (int64_t j = 0; j < QK; ++j)
          out[i][r] += weight_at(H ? Kind::q4h : Kind::q4, rec, r, j) * ad[i * nb + b] *
                       static_cast<float>(aq[i * k + b * QK + (j / 8) * 8 + stored_at[j % 8]]);
}
#endif

constexpr GroupKernel kernel_table[5][TILE + 1] = {  // by Kind
    {nullptr, q4_group<1, false>, q4_group<2, false>, q4_group<3, false>, q4_group<4, false>},
    {nullptr, q8_group<1, false>, q8_group<2, false>, q8_group<3, false>, q8_group<4, false>},
    {nullptr, q8_group<1, true>, q8_group<2, true>, q8_group<3, true>, q8_group<4, true>},
    {nullptr, q4_group<1, true>, q4_group<2, true>, q4_group<3, true>, q4_group<4, true>},
    {nullptr, q8_group<1, true, true>, q8_group<2, true, true>, q8_group<3, true, true>, q8_group<4, true, true>}};

// A packed weight: its records and shape. n: the real rows (the last group may be padded).
struct Packed {
  const uint8_t* p;
  int64_t groups, nb, n, record;
  Kind kind;
  const GroupKernel* kernels() const { return kernel_table[static_cast<int>(kind)]; }
};

Packed packed(const at::Tensor& w, int64_t n) {
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 3 && w.is_contiguous(),
              "a packed weight is a contiguous uint8 [groups, blocks, record] tensor");
  const int64_t record = w.size(2), groups = w.size(0);
  const Kind kind = record == Q4_RECORD ? Kind::q4 : record == Q8_RECORD ? Kind::q8 : record == Q8X_RECORD ? Kind::q8x
                    : record == Q4H_RECORD ? Kind::q4h : Kind::q8xh;
  TORCH_CHECK(record == record_size(kind), "records of ", record,
              " bytes are none of herd's (q4 192, q8 288, q8x 352, q4h 160, q8xh 304)");
  if (n < 0) n = groups * ROWS;
  TORCH_CHECK(n > (groups - 1) * ROWS && n <= groups * ROWS, n, " rows do not fill ", groups, " groups of 8");
  return {static_cast<const uint8_t*>(w.data_ptr()), groups, w.size(1), n, record, kind};
}

using GroupKernel8 = void (*)(const uint8_t* records, const int8_t* aq, const float* ad, const float* as, int64_t nb,
                              float (*out)[ROWS]);
constexpr GroupKernel8 kernel_table8[2][TILE + 1] = {  // q4, q4h
    {nullptr, q4_group8<1, false>, q4_group8<2, false>, q4_group8<3, false>, q4_group8<4, false>},
    {nullptr, q4_group8<1, true>, q4_group8<2, true>, q4_group8<3, true>, q4_group8<4, true>}};

// One thread's share of y [m, n] = x W^T, x already quantized (int16, or int8 with `kernels8`): groups
// [lo, hi) (a padded last group's extra rows are not written).
template <typename A, typename Kernel>
void matmul_groups_with(const A& a, int64_t m, const Packed& w, const Kernel* kernels, float* y, int64_t lo, int64_t hi) {
  const int64_t k = w.nb * QK, stride = w.nb * w.record;
  float out[TILE][ROWS];
  for (int64_t g = lo; g < hi; ++g)
    for (int64_t i0 = 0; i0 < m; i0 += TILE) {
      const int64_t t = std::min(TILE, m - i0), rows = std::min(ROWS, w.n - g * ROWS);
      kernels[t](w.p + g * stride, a.qp + i0 * k, a.dp + i0 * w.nb, a.sp + i0 * w.nb, w.nb, out);
      for (int64_t i = 0; i < t; ++i) std::copy_n(out[i], rows, y + (i0 + i) * w.n + g * ROWS);
    }
}

void matmul_groups(const QuantizedActivations& a, int64_t m, const Packed& w, float* y, int64_t lo, int64_t hi) {
  matmul_groups_with(a, m, w, w.kernels(), y, lo, hi);
}

at::Tensor dequantize(const at::Tensor& w_, int64_t n);

// From this many tokens on, dequantize and use a float GEMM. Measured (2-core AVX2 EPYC): dequantizing a whole
// weight to fp32 per call costs more than the integer path saves below ~512 tokens (Llama-3.2-1B-shaped Q4_K_M:
// 46-token prefill 25 tok/s through the GEMM, 69 through dot products; SmolLM2 at 512 tokens: 562 vs 502).
constexpr int64_t GEMM_TOKENS = 512;

bool takes_int8(const Packed& w) { return w.kind == Kind::q4 || w.kind == Kind::q4h; }

at::Tensor linear_int8_rows(const at::Tensor& x, const Packed& w) {
  const int64_t m = x.size(0);
  const QuantizedActivations8 a = quantize_activations8(x);
  at::Tensor y = at::empty({m, w.n}, x.options());
  float* yp = y.data_ptr<float>();
  const GroupKernel8* kernels = kernel_table8[w.kind == Kind::q4h ? 1 : 0];
  at::parallel_for(0, w.groups, 4, [&](int64_t lo, int64_t hi) { matmul_groups_with(a, m, w, kernels, yp, lo, hi); });
  return y;
}

// y [..., n] for x [..., K]: few tokens by integer dot products, many by a float GEMM of the dequantized
// weight. `int8_tokens` > 0 opts in to int8 activations for q4 weights from that many tokens on (a prompt;
// see quantize_row8): faster, and the arithmetic then depends on how many tokens share the call.
at::Tensor linear(const at::Tensor& x_, const at::Tensor& w_, int64_t n_, int64_t int8_tokens) {
  const Packed w = packed(w_, n_);
  const int64_t k = w.nb * QK;
  TORCH_CHECK(x_.size(-1) == k, "x has ", x_.size(-1), " features, the weight ", k);
  std::vector<int64_t> shape(x_.sizes().begin(), x_.sizes().end());
  shape.back() = w.n;
  const at::Tensor x = x_.reshape({-1, k}).to(at::kFloat).contiguous();
  const int64_t m = x.size(0);
  if (int8_tokens > 0 && m >= int8_tokens && takes_int8(w)) return linear_int8_rows(x, w).view(shape);
  if (m >= GEMM_TOKENS) return at::mm(x, dequantize(w_, w.n).t()).view(shape);
  const QuantizedActivations a = quantize_activations(x);
  at::Tensor y = at::empty({m, w.n}, x.options());
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, w.groups, 4, [&](int64_t lo, int64_t hi) { matmul_groups(a, m, w, yp, lo, hi); });
  return y.view(shape);
}

// Row `row` of a packed weight, dequantized into out[K].
void dequantize_row(const Packed& w, int64_t row, float* out) {
  const int64_t g = row / ROWS, r = row % ROWS;
  const uint8_t* rec = w.p + g * w.nb * w.record;
  for (int64_t b = 0; b < w.nb; ++b, rec += w.record, out += QK)
    for (int64_t j = 0; j < QK; ++j) out[j] = weight_at(w.kind, rec, r, j);
}

// The dequantized weight, fp32 [n, K]: prompts of many tokens multiply by it with a float GEMM.
at::Tensor dequantize(const at::Tensor& w_, int64_t n) {
  const Packed w = packed(w_, n);
  const int64_t k = w.nb * QK;
  at::Tensor out = at::empty({w.n, k}, at::kFloat);
  float* op = out.data_ptr<float>();
  at::parallel_for(0, w.n, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) dequantize_row(w, r, op + r * k);
  });
  return out;
}

// Rows `rows` (int64, any shape) of a packed weight of n rows, dequantized: fp32 [*rows.shape, K]. An
// embedding table tied to the output projection is looked up here, from the output's packed weight.
at::Tensor dequantize_rows(const at::Tensor& w_, const at::Tensor& rows_, int64_t n) {
  const Packed w = packed(w_, n);
  const at::Tensor rows = rows_.to(at::kLong).contiguous();
  const int64_t* rp = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows.numel(); ++i)
    TORCH_CHECK(0 <= rp[i] && rp[i] < w.n, "row ", rp[i], " is out of range for ", w.n, " rows");
  std::vector<int64_t> shape(rows.sizes().begin(), rows.sizes().end());
  shape.push_back(w.nb * QK);
  at::Tensor out = at::empty(shape, at::kFloat);
  float* op = out.data_ptr<float>();
  for (int64_t i = 0; i < rows.numel(); ++i) dequantize_row(w, rp[i], op + i * w.nb * QK);
  return out;
}

// Pack values q [N, K] and scales into records: uint8 q (0..15), d [N, K/32] and offsets m -> q4; int8 q,
// d [N, K/32], no m -> q8; int8 q, d [N, K/16] (one per 16) and m [N, K/32] -> q8x. Scales given in fp16
// (d and m both) make q4h and q8xh records.
at::Tensor pack(const at::Tensor& q_, const at::Tensor& d_, const c10::optional<at::Tensor>& m_) {
  const bool half = d_.scalar_type() == at::kHalf && m_.has_value() && m_->scalar_type() == at::kHalf;
  const at::Tensor q = q_.contiguous(), d = d_.to(at::kFloat).contiguous();
  const at::Tensor m = m_.has_value() ? m_->to(at::kFloat).contiguous() : at::Tensor();
  TORCH_CHECK(q.dim() == 2 && q.size(1) % QK == 0 && (q.scalar_type() == at::kByte || q.scalar_type() == at::kChar),
              "pack wants values [N, K], K a multiple of 32: uint8 (q4) or int8 (q8)");
  const int64_t n = q.size(0), k = q.size(1), nb = k / QK, groups = (n + ROWS - 1) / ROWS;
  const Kind kind = q.scalar_type() == at::kByte ? (half ? Kind::q4h : Kind::q4)
                    : m.defined() ? (half ? Kind::q8xh : Kind::q8x) : Kind::q8;
  const int64_t scales = kind == Kind::q8x || kind == Kind::q8xh ? 2 * nb : nb;
  TORCH_CHECK(q.scalar_type() != at::kByte || m.defined(), "q4 values need offsets m");
  TORCH_CHECK(d.dim() == 2 && d.size(0) == n && d.size(1) == scales, "scales must be [N, ", scales, "], got ", d.sizes());
  TORCH_CHECK(!m.defined() || (m.dim() == 2 && m.size(0) == n && m.size(1) == nb), "offsets must be [N, K/32]");
  if (q.scalar_type() == at::kByte) TORCH_CHECK(n == 0 || q.max().item<uint8_t>() < 16, "q4 values must be 0..15");
  const int64_t record = record_size(kind);
  at::Tensor out = at::zeros({groups, nb, record}, q.options().dtype(at::kByte));  // padding rows: all zero
  uint8_t* op = out.data_ptr<uint8_t>();
  const uint8_t* qp = static_cast<const uint8_t*>(q.data_ptr());
  const float *dp = d.data_ptr<float>(), *mp = m.defined() ? m.data_ptr<float>() : nullptr;
  at::parallel_for(0, groups, 8, [&](int64_t lo, int64_t hi) {
    for (int64_t g = lo; g < hi; ++g)
      for (int64_t r = 0; r < std::min(ROWS, n - g * ROWS); ++r) {
        const int64_t row = g * ROWS + r;
        for (int64_t b = 0; b < nb; ++b) {
          uint8_t* rec = op + (g * nb + b) * record;
          float* f = reinterpret_cast<float*>(rec);
          uint16_t* h = reinterpret_cast<uint16_t*>(rec);
          auto to_half = [](float x) { return c10::Half(x).x; };
          const uint8_t* src = qp + row * k + b * QK;
          switch (kind) {
            case Kind::q4h:
              h[r] = to_half(dp[row * nb + b]), h[ROWS + r] = to_half(mp[row * nb + b]);
              for (int64_t j = 0; j < QK; ++j) rec[32 + q4_byte(r, j)] |= static_cast<uint8_t>(src[j] << q4_shift(j));
              break;
            case Kind::q8xh:
              h[r] = to_half(dp[row * 2 * nb + 2 * b]), h[ROWS + r] = to_half(dp[row * 2 * nb + 2 * b + 1]);
              h[2 * ROWS + r] = to_half(mp[row * nb + b]);
              for (int64_t j = 0; j < QK; ++j) rec[48 + q8_byte(r, j)] = src[j];
              break;
            case Kind::q4:
              f[r] = dp[row * nb + b], f[ROWS + r] = mp[row * nb + b];
              for (int64_t j = 0; j < QK; ++j) rec[64 + q4_byte(r, j)] |= static_cast<uint8_t>(src[j] << q4_shift(j));
              break;
            case Kind::q8:
              f[r] = dp[row * nb + b];
              for (int64_t j = 0; j < QK; ++j) rec[32 + q8_byte(r, j)] = src[j];
              break;
            case Kind::q8x:
              f[r] = dp[row * 2 * nb + 2 * b], f[ROWS + r] = dp[row * 2 * nb + 2 * b + 1], f[2 * ROWS + r] = mp[row * nb + b];
              for (int64_t j = 0; j < QK; ++j) rec[96 + q8_byte(r, j)] = src[j];
              break;
          }
        }
      }
  });
  return out;
}

// ---- the small ops of a decode step, each one pass over a few KB (PyTorch's take 25-35 us each) ----------

// e^x for 8 lanes: x = n ln2 + r, |r| <= ln2/2, e^r by Cephes' degree-6 polynomial (about 1 ulp), times 2^n.
#ifdef HERD_AVX2
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.f)), _mm256_set1_ps(-87.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln2 in two parts: r exact to fp32
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

// y = x / sqrt(mean(x^2) + eps) * w for one row.
inline void rms_norm_row(const float* x, const float* w, int64_t dim, float eps, float* y) {
  const float inv = 1.f / std::sqrt(dot(x, x, dim) / static_cast<float>(dim) + eps);
#pragma omp simd
  for (int64_t i = 0; i < dim; ++i) y[i] = x[i] * inv * w[i];
}

// y[i] = silu(gate[i]) * up[i] for n values.
inline void silu_mul_row(const float* gate, const float* up, int64_t n, float* y) {
  int64_t i = 0;
#ifdef HERD_AVX2
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    const __m256 s = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
    _mm256_storeu_ps(y + i, _mm256_mul_ps(s, _mm256_loadu_ps(up + i)));
  }
#endif
  for (; i < n; ++i) y[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
}

// p[l] = exp(p[l] - top) for l < n; returns their sum.
inline float exp_shifted(float* p, int64_t n, float top) {
  int64_t l = 0;
  float total = 0.f;
#ifdef HERD_AVX2
  __m256 sum = _mm256_setzero_ps();
  for (; l + 8 <= n; l += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + l), _mm256_set1_ps(top)));
    _mm256_storeu_ps(p + l, e);
    sum = _mm256_add_ps(sum, e);
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, sum);
  for (const float v : lanes) total += v;
#endif
  for (; l < n; ++l) total += (p[l] = std::exp(p[l] - top));
  return total;
}

// Attention of one query per (row b, head h) at q + b*q_stride + h*dim over `len` cached keys and values
// (row b, kv head h / (heads / kv_heads), position l at base + b*s0 + kvh*s1 + l*s2), every key visible.
// fp32 softmax, max-subtracted; out [B, heads, dim] contiguous. Pairs bh = b*heads + h in [lo, hi); p: len floats.
struct Cached {
  const float* p;
  int64_t s0, s1, s2;
};

void attend(const float* q, int64_t q_stride, int64_t heads, int64_t kv_heads, int64_t dim, Cached k, Cached v,
            int64_t len, float scale, float* out, int64_t lo, int64_t hi, float* p) {
  const int64_t group = heads / kv_heads;
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
    const float inv_total = 1.f / exp_shifted(p, len, top);
    float* o = out + bh * dim;
    std::fill(o, o + dim, 0.f);
    for (int64_t l = 0; l < len; ++l) {
      const float* vr = vb + l * v.s2;
      const float pl = p[l] * inv_total;
#pragma omp simd
      for (int64_t i = 0; i < dim; ++i) o[i] += pl * vr[i];
    }
  }
}

// The same for keys and values in a paged cache [blocks, Hkv, block_size, dim]: row b's position l is at offset
// l % bs of block table[b * width + l / bs]; row b sees positions 0..lens[b]-1. p: max(lens) floats.
// E: the cache's element: float, BF16 or F16 (16-bit: half the bytes per token; widened exactly to fp32).
struct BF16 {
  uint16_t bits;
};
struct F16 {
  uint16_t bits;
};

template <typename E>
struct Paged {
  const E *k, *v;
  int64_t kv_heads, bs;
  const int64_t* table;
  int64_t width;
  const int64_t* lens;
};

inline float widen(float x) { return x; }
inline float widen(BF16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.bits) << 16;
  float x;
  std::memcpy(&x, &bits, 4);
  return x;
}
inline float widen(F16 v) { return static_cast<float>(c10::Half(v.bits, c10::Half::from_bits())); }

// A cached row as fp32: the 16-bit types are widened first (exactly), so the dot products and sums below
// are the fp32 path's, operation for operation, whatever the cache holds.
inline const float* as_fp32(const float* row, int64_t, float*) { return row; }
inline const float* as_fp32(const BF16* row, int64_t n, float* out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = widen(row[i]);
  return out;
}
inline const float* as_fp32(const F16* row, int64_t n, float* out) {
  int64_t i = 0;
#ifdef HERD_AVX2
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + i))));
#endif
  for (; i < n; ++i) out[i] = widen(row[i]);
  return out;
}
constexpr int64_t MAX_HEAD_DIM = 512;

template <typename E>
void attend_paged(const float* q, int64_t q_stride, int64_t heads, int64_t dim, const Paged<E>& c, float scale, float* out,
                  int64_t lo, int64_t hi, float* p) {
  const int64_t group = heads / c.kv_heads, block_floats = c.bs * dim;
  float wide[MAX_HEAD_DIM];  // one widened 16-bit row
  for (int64_t bh = lo; bh < hi; ++bh) {
    const int64_t b = bh / heads, h = bh % heads, kvh = h / group, len = c.lens[b];
    const float* qr = q + b * q_stride + h * dim;
    const int64_t* blocks = c.table + b * c.width;
    float top = -INFINITY;
    for (int64_t at = 0; at < len; at += c.bs) {
      const E* kb = c.k + (blocks[at / c.bs] * c.kv_heads + kvh) * block_floats;
      for (int64_t j = 0, n = std::min(c.bs, len - at); j < n; ++j) {
        p[at + j] = dot(qr, as_fp32(kb + j * dim, dim, wide), dim) * scale;
        top = std::max(top, p[at + j]);
      }
    }
    const float inv_total = 1.f / exp_shifted(p, len, top);
    float* o = out + bh * dim;
    std::fill(o, o + dim, 0.f);
    for (int64_t at = 0; at < len; at += c.bs) {
      const E* vb = c.v + (blocks[at / c.bs] * c.kv_heads + kvh) * block_floats;
      for (int64_t j = 0, n = std::min(c.bs, len - at); j < n; ++j) {
        const float* vr = as_fp32(vb + j * dim, dim, wide);
        const float pl = p[at + j] * inv_total;
#pragma omp simd
        for (int64_t i = 0; i < dim; ++i) o[i] += pl * vr[i];
      }
    }
  }
}

// Rotate values [lo, hi) of one row of heads of hd values (Meta's interleaved layout: dims (2i, 2i+1) rotate
// together; lo even) by rot = (cos, sin) pairs for the row's position, hd/2 of them.
inline void rope_span(float* x, const float* rot, int64_t hd, int64_t lo, int64_t hi) {
  for (int64_t e = lo; e < hi; e += 2) {
    const int64_t i = (e % hd) / 2;
    const float a = x[e], b = x[e + 1], c = rot[2 * i], s = rot[2 * i + 1];
    x[e] = a * c - b * s;
    x[e + 1] = a * s + b * c;
  }
}

at::Tensor rms_norm(const at::Tensor& x_, const at::Tensor& w_, double eps) {
  const at::Tensor x = x_.contiguous(), w = w_.contiguous();
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat && w.dim() == 1 && x.size(-1) == w.size(0),
              "rms_norm wants fp32 x [..., D] and weight [D]");
  at::Tensor y = at::empty_like(x);
  const int64_t dim = w.size(0);
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, x.numel() / dim, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) rms_norm_row(xp + r * dim, wp, dim, static_cast<float>(eps), yp + r * dim);
  });
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
  const int64_t heads = q.size(1), dim = q.size(3), len = k.size(2);
  const Cached keys{k.data_ptr<float>(), k.stride(0), k.stride(1), k.stride(2)};
  const Cached values{v.data_ptr<float>(), v.stride(0), v.stride(1), v.stride(2)};
  at::parallel_for(0, q.size(0) * heads, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> p(len);
    attend(q.data_ptr<float>(), heads * dim, heads, k.size(1), dim, keys, values, len, static_cast<float>(scale),
           out.data_ptr<float>(), lo, hi, p.data());
  });
  return out;
}

// silu(gate) * up for x [..., 2F] = [gate | up] (the fused w1/w3 projection's output) -> [..., F].
at::Tensor silu_mul(const at::Tensor& x_) {
  const at::Tensor x = x_.to(at::kFloat).contiguous();
  const int64_t f = x.size(-1) / 2;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = f;
  at::Tensor y = at::empty(shape, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, x.numel() / (2 * f), 16, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) silu_mul_row(xp + r * 2 * f, xp + r * 2 * f + f, f, yp + r * f);
  });
  return y;
}

// In place: rotate heads [0, heads) of x [B, T, NH, hd] (fp32, contiguous) by rot [B, T, hd/2, 2] = (cos, sin).
void rope_(const at::Tensor& x, const at::Tensor& rot_, int64_t heads) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous() && x.scalar_type() == at::kFloat, "rope_ wants contiguous fp32 [B, T, NH, hd]");
  const at::Tensor rot = rot_.contiguous();
  const int64_t bt = x.size(0) * x.size(1), nh = x.size(2), hd = x.size(3);
  TORCH_CHECK(rot.scalar_type() == at::kFloat && rot.numel() == bt * hd && heads <= nh && hd % 2 == 0,
              "rope_: rot must be [B, T, hd/2, 2]");
  float* xp = x.data_ptr<float>();
  const float* rp = rot.data_ptr<float>();
  at::parallel_for(0, bt, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t p = lo; p < hi; ++p) rope_span(xp + p * nh * hd, rp + p * hd, hd, 0, heads * hd);
  });
}

// ---- a whole decoder block for one new token per sequence -------------------------------------------------

// Buffers of one decode_block call, kept between calls (per calling thread): a step allocates nothing.
struct Scratch {
  std::vector<float> qkv, att, hidden, gate_up, floats;  // floats: each thread's normed input, act, d, s, scores
  std::vector<int16_t> ints;                            // each thread's quantized activations
};

// TransformerBlock.forward for x [B, 1, D] (one token per row, row b at position positions[b], its keys in the
// paged cache blocks block_tables[b]), the same steps in one call so a decode step costs one op per layer, not ~40:
//   h = x + wo(attention(rope(wqkv(rms_norm(x)))))   (k and v written to the cache at pos first)
//   out = h + w2(silu_mul(w13(rms_norm(h))))
// One parallel region: each thread computes its own groups of rows of every projection; the small steps
// between them (norm, quantizing the activations, SwiGLU) are repeated by every thread on its own copy
// instead of being shared behind another barrier, so a block costs four barriers.
// Projections in w: the packed wqkv, wo, w13, w2 (q4 or q8, whole groups of 8 rows). rot: (cos, sin) pairs
// [B, 1, hd/2, 2]; rope=false for NoPE layers. Caches: fp32 or bf16 [blocks, Hkv, block_size, hd], contiguous
// (herd's PagedKVCache), or fp16; positions int64 [B]; block_tables int64 [B, width], covering each row's position.
at::Tensor decode_block(const at::Tensor& x_, const at::Tensor& attn_norm, const at::Tensor& ffn_norm, at::TensorList w,
                        const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& rot_,
                        const at::Tensor& positions_, const at::Tensor& tables_, int64_t heads, int64_t kv_heads,
                        double eps, bool rope) {
  const at::Tensor x = x_.contiguous(), rot = rot_.contiguous(), positions = positions_.contiguous(),
                   tables = tables_.contiguous();
  const int64_t batch = x.size(0), dim = x.size(-1), hd = k_cache.size(3), bs = k_cache.size(2);
  const int64_t nh = heads + 2 * kv_heads;
  TORCH_CHECK(x.dim() == 3 && x.size(1) == 1 && x.scalar_type() == at::kFloat, "decode_block wants fp32 x [B, 1, D]");
  TORCH_CHECK(w.size() == 4, "decode_block wants the packed wqkv, wo, w13 and w2");
  const Packed wqkv = packed(w[0], -1), wo = packed(w[1], -1), w13 = packed(w[2], -1), w2 = packed(w[3], -1);
  const int64_t f = w13.n / 2;
  TORCH_CHECK(wqkv.nb * QK == dim && wqkv.n == nh * hd && wo.nb * QK == heads * hd && wo.n == dim &&
                  w13.nb * QK == dim && w13.n % 2 == 0 && w2.nb * QK == f && w2.n == dim,
              "decode_block: the projections' shapes do not fit dim ", dim, ", ", heads, "+2x", kv_heads, " heads of ", hd);
  const at::ScalarType kv = k_cache.scalar_type();
  TORCH_CHECK((kv == at::kFloat || kv == at::kBFloat16 || kv == at::kHalf) && k_cache.is_contiguous() &&
                  v_cache.sizes() == k_cache.sizes() && v_cache.scalar_type() == kv && v_cache.is_contiguous() &&
                  k_cache.size(1) == kv_heads,
              "decode_block: the caches must be contiguous fp32, bf16 or fp16 [blocks, Hkv, block_size, hd]");
  TORCH_CHECK(hd <= MAX_HEAD_DIM, "decode_block: head size ", hd, " is over ", MAX_HEAD_DIM);
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.numel() == batch && tables.scalar_type() == at::kLong &&
                  tables.dim() == 2 && tables.size(0) == batch,
              "decode_block: positions must be int64 [B] and block_tables int64 [B, width]");
  const int64_t width = tables.size(1), n_blocks = k_cache.size(0);
  const int64_t *pos = positions.data_ptr<int64_t>(), *table = tables.data_ptr<int64_t>();
  int64_t longest = 0;
  for (int64_t b = 0; b < batch; ++b) {  // checked here: the kernel indexes the cache with these
    TORCH_CHECK(0 <= pos[b] && pos[b] < width * bs, "decode_block: position ", pos[b], " of row ", b,
                " is past its block table (", width, " blocks of ", bs, ")");
    for (int64_t i = 0; i <= pos[b] / bs; ++i)
      TORCH_CHECK(0 <= table[b * width + i] && table[b * width + i] < n_blocks, "decode_block: block ",
                  table[b * width + i], " is not in the cache (", n_blocks, " blocks)");
    longest = std::max(longest, pos[b] + 1);
  }
  std::vector<int64_t> lens(batch);
  for (int64_t b = 0; b < batch; ++b) lens[b] = pos[b] + 1;
  TORCH_CHECK(!rope || rot.numel() == batch * hd, "decode_block: rot must be [B, 1, hd/2, 2]");
  for (const at::Tensor* norm : {&attn_norm, &ffn_norm})
    TORCH_CHECK(norm->scalar_type() == at::kFloat && norm->is_contiguous() && norm->numel() == dim,
                "decode_block: norm weights must be contiguous fp32 [D]");
  const float eps_f = static_cast<float>(eps), scale = 1.f / std::sqrt(static_cast<float>(hd));
  const int64_t widest = std::max({dim, heads * hd, f}), len = longest;
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), wqkv.groups)));

  thread_local Scratch s;  // the calling thread's: the region below reads it through these pointers only
  s.qkv.resize(batch * nh * hd), s.att.resize(batch * heads * hd), s.hidden.resize(batch * dim);
  s.gate_up.resize(batch * 2 * f);
  const int64_t floats = batch * widest + 2 * batch * (widest / QK) + len;  // per thread: input, d, s, scores
  s.floats.resize(threads * floats), s.ints.resize(threads * batch * widest);
  at::Tensor out = at::empty_like(x);
  const float *xp = x.data_ptr<float>(), *rp = rope ? rot.data_ptr<float>() : nullptr;
  const float *norm1 = attn_norm.data_ptr<float>(), *norm2 = ffn_norm.data_ptr<float>();
  float *qkv = s.qkv.data(), *att = s.att.data(), *hidden = s.hidden.data(), *gate_up = s.gate_up.data();
  float* op = out.data_ptr<float>();
  void *kc = k_cache.data_ptr(), *vc = v_cache.data_ptr();
  float* thread_floats = s.floats.data();
  int16_t* thread_ints = s.ints.data();
  const Paged<float> cache32{static_cast<const float*>(kc), static_cast<const float*>(vc), kv_heads, bs, table, width,
                             lens.data()};
  const Paged<BF16> cache_bf16{static_cast<const BF16*>(kc), static_cast<const BF16*>(vc), kv_heads, bs, table, width,
                               lens.data()};
  const Paged<F16> cache_f16{static_cast<const F16*>(kc), static_cast<const F16*>(vc), kv_heads, bs, table, width,
                             lens.data()};

#pragma omp parallel num_threads(threads)
  {
    const int id = omp_get_thread_num(), nt = omp_get_num_threads();
    float* input = thread_floats + id * floats;  // this thread's copy of the current matmul input
    QuantizedActivations a;
    a.qp = thread_ints + id * batch * widest;
    a.dp = input + batch * widest;
    a.sp = a.dp + batch * (widest / QK);
    float* scores = const_cast<float*>(a.sp) + batch * (widest / QK);
    auto quantize = [&](int64_t k) {  // input [batch, k] -> a
      for (int64_t b = 0; b < batch; ++b)
        quantize_row(input + b * k, k, const_cast<int16_t*>(a.qp) + b * k, const_cast<float*>(a.dp) + b * (k / QK),
                     const_cast<float*>(a.sp) + b * (k / QK));
    };
    auto share = [&](const Packed& p, int64_t& lo, int64_t& hi) {  // this thread's groups of p
      lo = p.groups * id / nt, hi = p.groups * (id + 1) / nt;
    };
    int64_t lo, hi;

    // attention: q, k, v of this thread's rows, rotated, k and v into the cache
    for (int64_t b = 0; b < batch; ++b) rms_norm_row(xp + b * dim, norm1, dim, eps_f, input + b * dim);
    quantize(dim);
    share(wqkv, lo, hi);
    matmul_groups(a, batch, wqkv, qkv, lo, hi);
    const int64_t first = lo * ROWS, last = std::min(hi * ROWS, wqkv.n), rotated = (heads + kv_heads) * hd;
    for (int64_t b = 0; b < batch; ++b) {
      float* row = qkv + b * nh * hd;
      if (rope && first < rotated) rope_span(row, rp + b * hd, hd, first, std::min(last, rotated));
      for (int64_t e = std::max(first, heads * hd); e < last; ++e) {  // k and v values of this thread's rows
        const bool is_k = e < rotated;
        const int64_t g = (e - (is_k ? heads * hd : rotated)) / hd, i = e % hd;
        const int64_t block = table[b * width + pos[b] / bs], offset = pos[b] % bs;
        const int64_t at = ((block * kv_heads + g) * bs + offset) * hd + i;
        void* cache = is_k ? kc : vc;
        if (kv == at::kBFloat16)
          static_cast<uint16_t*>(cache)[at] = c10::BFloat16(row[e]).x;  // round to nearest even
        else if (kv == at::kHalf)
          static_cast<uint16_t*>(cache)[at] = c10::Half(row[e]).x;
        else
          static_cast<float*>(cache)[at] = row[e];
      }
    }
#pragma omp barrier
    const int64_t pair_lo = batch * heads * id / nt, pair_hi = batch * heads * (id + 1) / nt;
    if (kv == at::kBFloat16)
      attend_paged(qkv, nh * hd, heads, hd, cache_bf16, scale, att, pair_lo, pair_hi, scores);
    else if (kv == at::kHalf)
      attend_paged(qkv, nh * hd, heads, hd, cache_f16, scale, att, pair_lo, pair_hi, scores);
    else
      attend_paged(qkv, nh * hd, heads, hd, cache32, scale, att, pair_lo, pair_hi, scores);
#pragma omp barrier
    // h = x + wo(att)
    std::copy_n(att, batch * heads * hd, input);
    quantize(heads * hd);
    share(wo, lo, hi);
    matmul_groups(a, batch, wo, hidden, lo, hi);
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t e = lo * ROWS; e < hi * ROWS; ++e) hidden[b * dim + e] += xp[b * dim + e];
#pragma omp barrier
    // out = h + w2(silu(gate) * up)
    for (int64_t b = 0; b < batch; ++b) rms_norm_row(hidden + b * dim, norm2, dim, eps_f, input + b * dim);
    quantize(dim);
    share(w13, lo, hi);
    matmul_groups(a, batch, w13, gate_up, lo, hi);
#pragma omp barrier
    for (int64_t b = 0; b < batch; ++b) silu_mul_row(gate_up + b * 2 * f, gate_up + b * 2 * f + f, f, input + b * f);
    quantize(f);
    share(w2, lo, hi);
    matmul_groups(a, batch, w2, op, lo, hi);
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t e = lo * ROWS; e < hi * ROWS; ++e) op[b * dim + e] += hidden[b * dim + e];
  }
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

// Schemas here, CPU kernels below, shape functions ("fakes", for torch.compile and the meta device) in
// herd/kernels/__init__.py. (A kernel given to def() would be a catch-all that every backend, the fakes'
// included, must route around: measured 5x slower decoding once fakes were added.)
TORCH_LIBRARY(herd, lib) {
  lib.def("pack(Tensor q, Tensor d, Tensor? m=None) -> Tensor");
  lib.def("linear(Tensor x, Tensor w, int n=-1, int int8_tokens=0) -> Tensor");
  lib.def("dequantize(Tensor w, int n=-1) -> Tensor");
  lib.def("dequantize_rows(Tensor w, Tensor rows, int n=-1) -> Tensor");
  lib.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  lib.def("decode_attention(Tensor q, Tensor k, Tensor v, float scale) -> Tensor");
  lib.def("silu_mul(Tensor x) -> Tensor");
  lib.def("rope_(Tensor(a!) x, Tensor rot, int heads) -> ()");
  lib.def("decode_block(Tensor x, Tensor attn_norm, Tensor ffn_norm, Tensor[] weights, Tensor(a!) k_cache, "
          "Tensor(b!) v_cache, Tensor rot, Tensor positions, Tensor block_tables, int heads, int kv_heads, float eps, "
          "bool rope) -> Tensor");
  lib.def("vectorized() -> bool", [] { return has_avx2(); });  // no tensor to dispatch on
}

TORCH_LIBRARY_IMPL(herd, CPU, lib) {
  lib.impl("pack", &pack);
  lib.impl("linear", &linear);
  lib.impl("dequantize", &dequantize);
  lib.impl("dequantize_rows", &dequantize_rows);
  lib.impl("rms_norm", &rms_norm);
  lib.impl("decode_attention", &decode_attention);
  lib.impl("silu_mul", &silu_mul);
  lib.impl("rope_", &rope_);
  lib.impl("decode_block", &decode_block);
}
