// Eight-lane fp32 helpers for paged_attention_cpu.cpp. A GCC/Clang vector type keeps the hot
// loops vectorised whatever the auto-vectoriser decides (it scalarised them after
// unroll-and-jam), on any target: one AVX register, or two SSE/NEON ones.
#pragma once

#include <cstdint>
#include <cstring>

namespace quire_cpu {

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
inline v8 load8(const float* p) { v8 x; std::memcpy(&x, p, sizeof x); return x; }
inline void store8(float* p, v8 x) { std::memcpy(p, &x, sizeof x); }
inline v8 splat8(float x) { return v8{x, x, x, x, x, x, x, x}; }
inline float sum8(v8 x) { return ((x[0] + x[1]) + (x[2] + x[3])) + ((x[4] + x[5]) + (x[6] + x[7])); }
inline v8 max8(v8 a, v8 b) { return a > b ? a : b; }

// exp(x) lane-wise for x <= 0 (scores minus their row's running max): Cephes' expf (range
// reduction by ln 2, degree-6 polynomial, 2^n from the exponent bits), about 1 ulp; a libm
// call per score would cost more than the score's FMAs. Below -87 it returns exp(-87).
inline v8 exp8(v8 x) {
  x = x < -87.0f ? splat8(-87.0f) : x;
  const v8i n = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, v8i);  // round(x / ln 2)
  const v8 fn = __builtin_convertvector(n, v8);
  const v8 r = x - fn * 0.693359375f + fn * 2.12194440e-4f;  // |r| <= ln(2) / 2
  v8 y = r * 1.9875691500e-4f + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const v8i bits = (n + 127) << 23;
  v8 two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return y * two_n;
}

// sum_d q[d] * k[d]
inline float dot(const float* q, const float* k, int64_t D) {
  v8 a0 = splat8(0.0f), a1 = a0;
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    a0 += load8(q + d) * load8(k + d);
    a1 += load8(q + d + 8) * load8(k + d + 8);
  }
  for (; d + 8 <= D; d += 8) a0 += load8(q + d) * load8(k + d);
  float s = sum8(a0 + a1);
  for (; d < D; ++d) s += q[d] * k[d];
  return s;
}

// The eight dot products q . k[j], j < 8, as one vector: eight accumulators, then a
// transposing reduction (three levels of shuffle-and-add) in place of eight horizontal sums.
inline v8 pair_sums(v8 a, v8 b) {  // [a0+a1, b0+b1, a2+a3, b2+b3, a4+a5, b4+b5, a6+a7, b6+b7]
  return __builtin_shufflevector(a, b, 0, 8, 2, 10, 4, 12, 6, 14) +
         __builtin_shufflevector(a, b, 1, 9, 3, 11, 5, 13, 7, 15);
}
inline v8 quad_sums(v8 x, v8 y) {  // of two pair_sums results: four sums per half, by row
  return __builtin_shufflevector(x, y, 0, 1, 8, 9, 4, 5, 12, 13) +
         __builtin_shufflevector(x, y, 2, 3, 10, 11, 6, 7, 14, 15);
}
inline v8 dots8(const float* q, const float* const* k, int64_t D) {
  v8 a0 = splat8(0.0f), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    const v8 x = load8(q + d);
    a0 += x * load8(k[0] + d); a1 += x * load8(k[1] + d); a2 += x * load8(k[2] + d); a3 += x * load8(k[3] + d);
    a4 += x * load8(k[4] + d); a5 += x * load8(k[5] + d); a6 += x * load8(k[6] + d); a7 += x * load8(k[7] + d);
  }
  const v8 lo = quad_sums(pair_sums(a0, a1), pair_sums(a2, a3));
  const v8 hi = quad_sums(pair_sums(a4, a5), pair_sums(a6, a7));
  v8 r = __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 8, 9, 10, 11) +
         __builtin_shufflevector(lo, hi, 4, 5, 6, 7, 12, 13, 14, 15);
  for (; d < D; ++d)
    for (int j = 0; j < 8; ++j) r[j] += q[d] * k[j][d];
  return r;
}

// acc[d] += sum_n p[n] * v[n][d], four vectors of acc held in registers across the positions.
// (Lanes d_begin .. D - 1 only.)
inline void accumulate_pv(float* acc, const float* p, const float* const* v, int n_pos, int64_t D,
                          int64_t d_begin = 0) {
  int64_t d = d_begin;
  for (; d + 32 <= D; d += 32) {
    v8 a0 = load8(acc + d), a1 = load8(acc + d + 8), a2 = load8(acc + d + 16), a3 = load8(acc + d + 24);
    for (int n = 0; n < n_pos; ++n) {
      const v8 pn = splat8(p[n]);
      const float* vr = v[n] + d;
      a0 += pn * load8(vr); a1 += pn * load8(vr + 8); a2 += pn * load8(vr + 16); a3 += pn * load8(vr + 24);
    }
    store8(acc + d, a0); store8(acc + d + 8, a1); store8(acc + d + 16, a2); store8(acc + d + 24, a3);
  }
  for (; d + 8 <= D; d += 8) {
    v8 a0 = load8(acc + d);
    for (int n = 0; n < n_pos; ++n) a0 += splat8(p[n]) * load8(v[n] + d);
    store8(acc + d, a0);
  }
  for (; d < D; ++d)
    for (int n = 0; n < n_pos; ++n) acc[d] += p[n] * v[n][d];
}

// accumulate_pv for two rows sharing the V rows.
inline void accumulate_pv2(float* acc0, float* acc1, const float* p0, const float* p1, const float* const* v,
                           int n_pos, int64_t D) {
  int64_t d = 0;
  for (; d + 32 <= D; d += 32) {
    v8 a0 = load8(acc0 + d), a1 = load8(acc0 + d + 8), a2 = load8(acc0 + d + 16), a3 = load8(acc0 + d + 24);
    v8 b0 = load8(acc1 + d), b1 = load8(acc1 + d + 8), b2 = load8(acc1 + d + 16), b3 = load8(acc1 + d + 24);
    for (int n = 0; n < n_pos; ++n) {
      const float* vr = v[n] + d;
      const v8 v0 = load8(vr), v1 = load8(vr + 8), v2 = load8(vr + 16), v3 = load8(vr + 24);
      const v8 x = splat8(p0[n]), y = splat8(p1[n]);
      a0 += x * v0; a1 += x * v1; a2 += x * v2; a3 += x * v3;
      b0 += y * v0; b1 += y * v1; b2 += y * v2; b3 += y * v3;
    }
    store8(acc0 + d, a0); store8(acc0 + d + 8, a1); store8(acc0 + d + 16, a2); store8(acc0 + d + 24, a3);
    store8(acc1 + d, b0); store8(acc1 + d + 8, b1); store8(acc1 + d + 16, b2); store8(acc1 + d + 24, b3);
  }
  if (d < D) {
    accumulate_pv(acc0, p0, v, n_pos, D, d);
    accumulate_pv(acc1, p1, v, n_pos, D, d);
  }
}

}  // namespace quire_cpu
