// fp32 vector helpers for the CPU kernels. GCC/Clang vector types keep the hot loops
// vectorised whatever the auto-vectoriser decides (it scalarised them after unroll-and-jam),
// on any target. Two widths: `v8`, eight lanes (one AVX register, two SSE/NEON ones), for the
// layer kernels; `vf`, the build's native width `kLanes` (16 where the extension is compiled
// for AVX-512, else 8), for paged attention, whose inner loops are written for any width.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace quire_cpu {

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
inline v8 load8(const float* p) { v8 x; std::memcpy(&x, p, sizeof x); return x; }
inline void store8(float* p, v8 x) { std::memcpy(p, &x, sizeof x); }
inline v8 splat8(float x) { return v8{x, x, x, x, x, x, x, x}; }

// exp(x) lane-wise for x <= 0 (scores minus their row's running max): Cephes' expf (range
// reduction by ln 2, degree-6 polynomial, 2^n from the exponent bits), about 1 ulp; a libm
// call per score would cost more than the score's FMAs. Below -87 it returns exp(-87).
// V: a float vector type, I: the int32 vector type of the same lane count.
template <typename V, typename I>
inline V exp_lanes(V x) {
  x = x < -87.0f ? V{} - 87.0f : x;
  const I n = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, I);  // round(x / ln 2)
  const V fn = __builtin_convertvector(n, V);
  const V r = x - fn * 0.693359375f + fn * 2.12194440e-4f;  // |r| <= ln(2) / 2
  V y = r * 1.9875691500e-4f + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const I bits = (n + 127) << 23;
  V two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return y * two_n;
}
inline v8 exp8(v8 x) { return exp_lanes<v8, v8i>(x); }

// The native width: every paged-attention loop below is written for kLanes lanes.
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
typedef float vf __attribute__((vector_size(4 * kLanes)));
typedef int32_t vfi __attribute__((vector_size(4 * kLanes)));
inline vf loadv(const float* p) { vf x; std::memcpy(&x, p, sizeof x); return x; }
inline void storev(float* p, vf x) { std::memcpy(p, &x, sizeof x); }
inline vf splatv(float x) {
#if defined(__AVX512F__)
  const __m512 b = _mm512_set1_ps(x);
#elif defined(__AVX2__)
  const __m256 b = _mm256_set1_ps(x);
#else
  const vf b = vf{} + x;
#endif
  vf v;
  std::memcpy(&v, &b, sizeof v);
  return v;
}
inline vf maxv(vf a, vf b) { return a > b ? a : b; }
inline vf expv(vf x) { return exp_lanes<vf, vfi>(x); }
// Horizontal max and sum by halving: log2(kLanes) shuffles, not kLanes - 1 lane extracts.
#if defined(__AVX512F__)
#define QUIRE_HALVES(x, op)                                                                                  \
  x = op(x, __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));           \
  x = op(x, __builtin_shufflevector(x, x, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));           \
  x = op(x, __builtin_shufflevector(x, x, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));           \
  x = op(x, __builtin_shufflevector(x, x, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));
#else
#define QUIRE_HALVES(x, op)                                                \
  x = op(x, __builtin_shufflevector(x, x, 4, 5, 6, 7, 0, 1, 2, 3));          \
  x = op(x, __builtin_shufflevector(x, x, 2, 3, 0, 1, 6, 7, 4, 5));          \
  x = op(x, __builtin_shufflevector(x, x, 1, 0, 3, 2, 5, 4, 7, 6));
#endif
inline vf addv(vf a, vf b) { return a + b; }
inline float hmax(vf x) {
  QUIRE_HALVES(x, maxv)
  return x[0];
}
inline float hsum(vf x) {
  QUIRE_HALVES(x, addv)
  return x[0];
}
#undef QUIRE_HALVES

// t[0 .. kLanes) -> one vector whose lane j is the sum of t[j]'s lanes: a transposing reduction
// (log2(kLanes) levels of shuffle-and-add, kLanes - 1 adds in all) in place of kLanes
// horizontal sums. Each level adds lane pairs of two vectors and interleaves the results.
#if defined(__AVX512F__)
inline vf sums_level1(vf a, vf b) {  // per lane pair: (a, b)
  return __builtin_shufflevector(a, b, 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
         __builtin_shufflevector(a, b, 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
}
inline vf sums_level2(vf x, vf y) {  // per lane quad: (a, b, c, d) from x = (a, b), y = (c, d)
  return __builtin_shufflevector(x, y, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
         __builtin_shufflevector(x, y, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
}
inline vf sums_level3(vf x, vf y) {  // per 8 lanes: eight vectors' partial sums
  return __builtin_shufflevector(x, y, 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
         __builtin_shufflevector(x, y, 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
}
inline vf transpose_sums(const vf* t) {
  const vf a0 = sums_level2(sums_level1(t[0], t[1]), sums_level1(t[2], t[3]));
  const vf a1 = sums_level2(sums_level1(t[4], t[5]), sums_level1(t[6], t[7]));
  const vf a2 = sums_level2(sums_level1(t[8], t[9]), sums_level1(t[10], t[11]));
  const vf a3 = sums_level2(sums_level1(t[12], t[13]), sums_level1(t[14], t[15]));
  const vf x = sums_level3(a0, a1), y = sums_level3(a2, a3);
  return __builtin_shufflevector(x, y, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
         __builtin_shufflevector(x, y, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
}
#else
inline vf sums_level1(vf a, vf b) {
  return __builtin_shufflevector(a, b, 0, 8, 2, 10, 4, 12, 6, 14) + __builtin_shufflevector(a, b, 1, 9, 3, 11, 5, 13, 7, 15);
}
inline vf sums_level2(vf x, vf y) {
  return __builtin_shufflevector(x, y, 0, 1, 8, 9, 4, 5, 12, 13) + __builtin_shufflevector(x, y, 2, 3, 10, 11, 6, 7, 14, 15);
}
inline vf transpose_sums(const vf* t) {
  const vf lo = sums_level2(sums_level1(t[0], t[1]), sums_level1(t[2], t[3]));
  const vf hi = sums_level2(sums_level1(t[4], t[5]), sums_level1(t[6], t[7]));
  return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 8, 9, 10, 11) +
         __builtin_shufflevector(lo, hi, 4, 5, 6, 7, 12, 13, 14, 15);
}
#endif

// dst[j * dst_stride + i] = rows[i][d0 + j] * scale for i, j < kLanes: kLanes rows' vectors
// transposed in registers (kLanes vector stores, not kLanes^2 scalar ones).
inline void transpose_scaled(const float* const* rows, int64_t d0, float scale, float* dst, int64_t dst_stride) {
#if defined(__AVX512F__)
  __m512 r[16], t[16];
  const __m512 sc = _mm512_set1_ps(scale);
  for (int i = 0; i < 16; ++i) r[i] = _mm512_mul_ps(_mm512_loadu_ps(rows[i] + d0), sc);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    const __m512d a = _mm512_castps_pd(t[i]), b = _mm512_castps_pd(t[i + 1]);
    const __m512d c = _mm512_castps_pd(t[i + 2]), d = _mm512_castps_pd(t[i + 3]);
    r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  // r[4q + c] holds, in 128-bit lane l, column 4l + c of rows 4q .. 4q + 3
  for (int c = 0; c < 4; ++c) {
    t[c] = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x88);       // lanes 0, 2 of rows 0-3, 4-7
    t[4 + c] = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xdd);   // lanes 1, 3
    t[8 + c] = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x88);
    t[12 + c] = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xdd);
  }
  for (int c = 0; c < 4; ++c) {
    _mm512_storeu_ps(dst + c * dst_stride, _mm512_shuffle_f32x4(t[c], t[8 + c], 0x88));
    _mm512_storeu_ps(dst + (4 + c) * dst_stride, _mm512_shuffle_f32x4(t[4 + c], t[12 + c], 0x88));
    _mm512_storeu_ps(dst + (8 + c) * dst_stride, _mm512_shuffle_f32x4(t[c], t[8 + c], 0xdd));
    _mm512_storeu_ps(dst + (12 + c) * dst_stride, _mm512_shuffle_f32x4(t[4 + c], t[12 + c], 0xdd));
  }
#elif defined(__AVX2__)
  __m256 r[8], t[8];
  const __m256 sc = _mm256_set1_ps(scale);
  for (int i = 0; i < 8; ++i) r[i] = _mm256_mul_ps(_mm256_loadu_ps(rows[i] + d0), sc);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xee);
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xee);
  }
  for (int c = 0; c < 4; ++c) {
    _mm256_storeu_ps(dst + c * dst_stride, _mm256_permute2f128_ps(r[c], r[4 + c], 0x20));
    _mm256_storeu_ps(dst + (4 + c) * dst_stride, _mm256_permute2f128_ps(r[c], r[4 + c], 0x31));
  }
#else
  for (int i = 0; i < kLanes; ++i)
    for (int j = 0; j < kLanes; ++j) dst[j * dst_stride + i] = rows[i][d0 + j] * scale;
#endif
}

// One cache element to fp32 (before the scale of a quantized cache; e4m3 bytes, through their
// table, in attention_items.h).
inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline float to_float(c10::Half x) { return static_cast<float>(x); }
inline float to_float(int8_t x) { return static_cast<float>(x); }
// kLanes cache elements as one fp32 vector: fp32 as is, int8 codes converted (the scale is
// applied by the caller), bf16 widened (its bits are fp32's upper half).
inline vf load_f(const float* p) { return loadv(p); }
inline vf load_f(const int8_t* p) {
  // Intrinsics where there are any: GCC scalarises __builtin_convertvector from 8-bit lanes.
#if defined(__AVX512F__)
  const __m512 x = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif defined(__AVX2__)
  const __m256 x = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#else
  vf x;
  for (int j = 0; j < kLanes; ++j) x[j] = static_cast<float>(p[j]);
#endif
  vf f;
  std::memcpy(&f, &x, sizeof f);
  return f;
}
inline vf load_f(const c10::BFloat16* p) {
  typedef uint16_t vh __attribute__((vector_size(2 * kLanes)));
  vh x;
  std::memcpy(&x, p, sizeof x);
  const vfi bits = __builtin_convertvector(x, vfi) << 16;
  vf f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
// Brings [p, p + bytes) into L2 (prefetcht1), for rows wanted a chunk from now: into L1 they
// would evict the rows in use (a decode chunk's K and V rows outgrow L1). Always inlined: GCC's
// mod/ref analysis finds a function of nothing but prefetches free of side effects and deletes
// calls to it (and to lambdas around it) as dead code.
__attribute__((always_inline)) inline void prefetch_l2(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 2);
}

// Partial dot products of R query rows with n_pos K rows, each K row loaded once for all R:
// t[r * t_stride + n] holds q[r] . k[n] spread over lanes (transpose_sums finishes them).
// before(n) runs before position n's dot: the caller's hook for spreading prefetches over the loop.
template <int R, typename E, typename F>
inline void dot_rows(const float* const* q, const E* const* k, int n_pos, int64_t D, vf* t, int t_stride, F&& before) {
  for (int n = 0; n < n_pos; ++n) {
    before(n);
    const E* kr = k[n];
    vf a[R];
    for (int r = 0; r < R; ++r) a[r] = vf{};
    int64_t d = 0;
    for (; d + kLanes <= D; d += kLanes) {
      const vf kv = load_f(kr + d);
      for (int r = 0; r < R; ++r) a[r] += loadv(q[r] + d) * kv;
    }
    for (; d < D; ++d)  // a head dim that is not a multiple of the width: the rest in lane 0
      for (int r = 0; r < R; ++r) a[r][0] += q[r][d] * to_float(kr[d]);
    for (int r = 0; r < R; ++r) t[r * t_stride + n] = a[r];
  }
}

// acc[r][d] += sum_n p[r][n * p_stride] * v[n][d] for R rows sharing the V rows (each V load
// feeds all R), four vectors of each row's accumulator held in registers across the positions.
template <int R, typename E>
inline void accumulate_pv(float* const* acc, const float* const* p, int64_t p_stride, const E* const* v,
                          int n_pos, int64_t D) {
  int64_t d = 0;
  for (; d + 4 * kLanes <= D; d += 4 * kLanes) {
    vf a[R][4];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < 4; ++j) a[r][j] = loadv(acc[r] + d + j * kLanes);
    for (int n = 0; n < n_pos; ++n) {
      const E* vr = v[n] + d;
      const vf v0 = load_f(vr), v1 = load_f(vr + kLanes), v2 = load_f(vr + 2 * kLanes), v3 = load_f(vr + 3 * kLanes);
      for (int r = 0; r < R; ++r) {
        const vf x = splatv(p[r][n * p_stride]);
        a[r][0] += x * v0; a[r][1] += x * v1; a[r][2] += x * v2; a[r][3] += x * v3;
      }
    }
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < 4; ++j) storev(acc[r] + d + j * kLanes, a[r][j]);
  }
  for (; d + kLanes <= D; d += kLanes) {
    vf a[R];
    for (int r = 0; r < R; ++r) a[r] = loadv(acc[r] + d);
    for (int n = 0; n < n_pos; ++n) {
      const vf vv = load_f(v[n] + d);
      for (int r = 0; r < R; ++r) a[r] += splatv(p[r][n * p_stride]) * vv;
    }
    for (int r = 0; r < R; ++r) storev(acc[r] + d, a[r]);
  }
  for (; d < D; ++d)
    for (int r = 0; r < R; ++r)
      for (int n = 0; n < n_pos; ++n) acc[r][d] += p[r][n * p_stride] * to_float(v[n][d]);
}

}  // namespace quire_cpu
