// The work items of paged_attention_cpu.cpp: one query tile of one request against a range of
// its context, read in place through the block table. Two loop nests, by rows per KV head:
//
// - Decode tiles (fewer than kRowLanesMin rows per head: single-token decodes, GQA groups of
//   up to 7) cover every KV head of the request at once, because a position's rows for all
//   heads lie side by side and the item then streams whole blocks; the work is memory-bound.
//   Scores take lanes over head_dim, each K row loaded once for a block of query rows, and a
//   transposing reduction finishes kLanes of them at a time; the next chunk's rows are
//   prefetched into L2, a position per position of this chunk's scores.
// - Prefill tiles (more rows: chunks of prompt tokens x the group) take one KV head each and
//   are compute-bound. The queries are transposed once per item to [head_dim][rows], so the
//   scores of a position vectorise over rows with K's elements broadcast (no per-chunk
//   transpose of K), and the online softmax runs lane-wise over rows.
//
// Both fold kChunk positions at a time into an online softmax in fp32 (vectorised exp) and
// accumulate p.V with each V load feeding a block of rows. Decode tiles read fp32, bf16 and
// int8 rows in place, converting in registers (an int8 code's scale, one fp16 per token and
// KV head, multiplies the score and the probability instead of every element); prefill tiles,
// and decode tiles over fp16 or e4m3 caches, convert rows as read, code * scale, into fp32
// scratch rows (e4m3 bytes through a 256-entry table).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "attention_items.h"
#include "simd.h"

namespace quire_cpu {

// Calls f(std::integral_constant<int, R>) for a block of R = 1 .. kRowBlock rows.
template <typename F>
inline void with_rows(int R, F&& f) {
  static_assert(kRowBlock == 2 || kRowBlock == 4, "a row block of 2 or 4");
  switch (R) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: if constexpr (kRowBlock == 4) f(std::integral_constant<int, 3>{}); break;
    default: if constexpr (kRowBlock == 4) f(std::integral_constant<int, 4>{}); break;
  }
}

template <typename T>
void run_decode_item(const Args& a, const Item& it, Scratch& sc) {
  // Rows are (head, token, group), taken RB at a time: a head's rows (a GQA group of 3 is one
  // block of 3, not 4 with a wasted row) or kRowBlock. Each head's rows are padded to a
  // multiple of RB (PH): a padding row keeps a zero query and zero probabilities and is never
  // written out.
  //
  // fp32, bf16 and int8 rows are read in place, converted in registers (an int8 row's scale
  // multiplies its score, and its probability before p.V): a quarter of fp32's bytes is then
  // a quarter of the work too. fp16 and e4m3 rows are converted into fp32 scratch rows.
  constexpr bool kInPlace = std::is_same_v<T, float> || std::is_same_v<T, int8_t> || std::is_same_v<T, c10::BFloat16>;
  constexpr bool kScaled = std::is_same_v<T, int8_t>;  // int8 caches always carry scales
  constexpr bool kConverted = !kInPlace;
  using E = std::conditional_t<kInPlace, T, float>;  // the element type the loops read
  const Tile tl(a, it);
  const int64_t D = tl.D, G = tl.G, NH = tl.NH, MH = tl.MH;
  const int RB = int(std::min<int64_t>(MH, kRowBlock));
  const int64_t PH = (MH + RB - 1) / RB * RB, P = NH * PH;
  const int64_t converted = kConverted ? NH * kChunk * D : 0, scales = kScaled ? NH * kChunk : 0;
  sc.f.resize(P * D * 2 + P * 2 + P * kChunk + 2 * converted + 2 * scales);
  sc.t.resize(kRowBlock * kChunk);
  auto& rows = std::get<std::vector<const E*>>(sc.rows);
  rows.resize(2 * NH * kChunk);
  float* q = sc.f.data();
  float* acc = q + P * D;
  float* mrow = acc + P * D;
  float* lrow = mrow + P;
  float* s = lrow + P;         // [P][kChunk] scores, then probabilities
  float* kb = s + P * kChunk;  // converted K rows, then V rows: [NH][kChunk][D] each
  float* vb = kb + converted;
  float* kscale = vb + converted;  // an int8 chunk's scales: [NH][kChunk] each
  float* vscale = kscale + scales;
  const E** krows = rows.data();
  const E** vrows = krows + NH * kChunk;
  std::fill(q, q + 2 * P * D, 0.0f);  // queries (padding rows stay 0) and accumulators
  std::fill(mrow, mrow + P, kNegInf);
  std::fill(lrow, lrow + P, 0.0f);
  for (int64_t h = 0; h < NH; ++h)
    for (int64_t local = 0; local < MH; ++local) {
      const float* src = a.q + (tl.q_begin + it.first + local / G) * a.q_st + ((it.kv_head + h) * G + local % G) * a.q_sh;
      float* dst = q + (h * PH + local) * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) dst[d] = src[d] * a.scale;
    }
  // One head's K and V rows of one position (and an int8 cache's scales) into L2.
  auto prefetch_position = [&](int64_t row, int64_t srow) __attribute__((always_inline)) {
    prefetch_l2(static_cast<const T*>(a.k) + row, D * int64_t(sizeof(T)));
    prefetch_l2(static_cast<const T*>(a.v) + row, D * int64_t(sizeof(T)));
    if constexpr (kScaled) {
      __builtin_prefetch(a.ks + srow, 0, 2);
      __builtin_prefetch(a.vs + srow, 0, 2);
    }
  };
  // The first chunk has no chunk before it to hide its reads behind: fetched at once.
  for_each_position(a, it, it.begin, int(std::min<int64_t>(kChunk, it.end - it.begin)),
                    [&](int, int64_t row, int64_t srow) __attribute__((always_inline)) {
    for (int64_t h = 0; h < NH; ++h) prefetch_position(row + h * a.c_sh, srow + h * a.s_sh);
  });
  int64_t ahead[kChunk], ahead_scales[kChunk];  // the next chunk's positions (element offsets)
  for (int64_t c0 = it.begin; c0 < it.end; c0 += kChunk) {
    const int n_pos = int(std::min<int64_t>(kChunk, it.end - c0));
    if constexpr (kInPlace)
      point_rows<T>(a, it, tl, c0, n_pos, krows, vrows, kScaled ? kscale : nullptr, kScaled ? vscale : nullptr);
    else
      gather_rows<T>(a, it, tl, c0, n_pos, krows, vrows, kb, vb);
    // The next chunk's positions, prefetched into L2 a position per position of this chunk's
    // scores (for each head), so its reads overlap this chunk's arithmetic. Measured against
    // a burst of whole-chunk prefetches into L1 at the start of each chunk: 1.14x over 64
    // decodes of 32-768 positions out of L3 (the burst filled the line-fill buffers and
    // evicted the rows in use).
    const int n_ahead = int(std::max<int64_t>(0, std::min<int64_t>(kChunk, it.end - c0 - kChunk)));
    for_each_position(a, it, c0 + kChunk, n_ahead, [&](int n, int64_t row, int64_t srow) {
      ahead[n] = row;
      ahead_scales[n] = srow;
    });
    // 1. scores s[m][n]: RB rows per K load, lanes over head_dim, then transposing sums
    const int n_vec = (n_pos + kLanes - 1) / kLanes * kLanes;  // whole vectors of positions
    vf* t = sc.t.data();
    for (int64_t h = 0; h < NH; ++h) {
      const E** kr = krows + h * kChunk;
      for (int n = n_pos; n < n_vec; ++n) kr[n] = kr[0];  // padding positions, masked below
      for (int64_t local = 0; local < MH; local += RB) {
        const int64_t m = h * PH + local;
        const float* qr[kRowBlock];
        for (int r = 0; r < RB; ++r) qr[r] = q + (m + r) * D;
        // the block's last row sees the most positions; whole vectors of them
        const int n_dot = (tl.limit(local + RB - 1, c0, n_pos) + kLanes - 1) / kLanes * kLanes;
        // the head's first row block prefetches the head's rows of the next chunk
        const int n_fetch = local == 0 ? n_ahead : 0;
        const int64_t head = h * a.c_sh, head_scales = h * a.s_sh;
        auto fetch = [&](int n) __attribute__((always_inline)) {
          if (n < n_fetch) prefetch_position(ahead[n] + head, ahead_scales[n] + head_scales);
        };
        with_rows(RB, [&](auto rows) { dot_rows<rows()>(qr, kr, n_dot, D, t, kChunk, fetch); });
        for (int r = 0; r < RB; ++r)
          for (int n = 0, limit = tl.limit(local + r, c0, n_pos); n < limit; n += kLanes) {
            const vf dots = transpose_sums(t + r * kChunk + n);
            storev(s + (m + r) * kChunk + n, kScaled ? dots * loadv(kscale + h * kChunk + n) : dots);
          }
      }
    }
    // 2. online softmax per row: s becomes p (0 past the row's position), acc is rescaled
    for (int64_t m = 0; m < P; ++m) {
      const int64_t local = m % PH;
      float* sr = s + m * kChunk;
      const int limit = tl.limit(local, c0, n_pos);
      if (limit == 0 || local >= MH) {
        std::fill(sr, sr + kChunk, 0.0f);
        continue;
      }
      for (int n = limit; n < kChunk; ++n) sr[n] = kNegInf;
      vf sv[kChunkVecs];
      vf mv = splatv(kNegInf);
      for (int j = 0; j < kChunkVecs; ++j) mv = maxv(mv, sv[j] = loadv(sr + j * kLanes));
      const float chunk_max = hmax(mv);
      if (chunk_max > mrow[m]) {  // the row's max grew: rescale what it has summed so far
        const float alpha = std::exp(mrow[m] - chunk_max);  // exp(-inf) = 0 on the first chunk
        mrow[m] = chunk_max;
        lrow[m] *= alpha;
        float* ar = acc + m * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) ar[d] *= alpha;
      }
      const vf mx = splatv(mrow[m]);
      vf sum = vf{};
      const float* vsr = kScaled ? vscale + (m / PH) * kChunk : nullptr;  // this row's head's V scales
      for (int j = 0; j < kChunkVecs; ++j) {
        const vf e = sv[j] == kNegInf ? vf{} : expv(sv[j] - mx);
        storev(sr + j * kLanes, kScaled ? e * loadv(vsr + j * kLanes) : e);
        sum += e;
      }
      lrow[m] += hsum(sum);
    }
    // 3. acc += p V, RB rows of one head at a time
    for (int64_t h = 0; h < NH; ++h) {
      for (int64_t local = 0; local < MH; local += RB) {
        const int64_t m = h * PH + local;
        float* ar[kRowBlock];
        const float* pr[kRowBlock];
        for (int r = 0; r < RB; ++r) {
          ar[r] = acc + (m + r) * D;
          pr[r] = s + (m + r) * kChunk;
        }
        const int limit = tl.limit(local + RB - 1, c0, n_pos);
        with_rows(RB, [&](auto rows) { accumulate_pv<rows()>(ar, pr, 1, vrows + h * kChunk, limit, D); });
      }
    }
  }
  write_rows(a, it, tl, acc, mrow, lrow, PH);
}

// Prefill scores: sT[n][row] = sum_d qT[d][row] k[n][d] for RB vectors of rows and positions
// n < n_blk (a multiple of kPosBlock), K's elements broadcast.
template <int RB>
inline void scores_by_rows(const float* qT, int64_t q_stride, const float* const* k, int n_blk, int64_t D,
                           float* sT, int64_t s_stride) {
  for (int n = 0; n < n_blk; n += kPosBlock) {
    vf acc[kPosBlock][RB];
    for (int i = 0; i < kPosBlock; ++i)
      for (int j = 0; j < RB; ++j) acc[i][j] = vf{};
    for (int64_t d = 0; d < D; ++d) {
      vf qv[RB];
      for (int j = 0; j < RB; ++j) qv[j] = loadv(qT + d * q_stride + j * kLanes);
      for (int i = 0; i < kPosBlock; ++i) {
        const vf kx = splatv(k[n + i][d]);
        for (int j = 0; j < RB; ++j) acc[i][j] += kx * qv[j];
      }
    }
    for (int i = 0; i < kPosBlock; ++i)
      for (int j = 0; j < RB; ++j) storev(sT + (n + i) * s_stride + j * kLanes, acc[i][j]);
  }
}

template <typename T>
void run_prefill_item(const Args& a, const Item& it, Scratch& sc) {
  // One KV head; rows (token, group) padded to whole vectors (PR), laid out [head_dim][rows]
  // for the queries and [position][rows] for the scores. Padding rows have zero queries and
  // are never written out.
  constexpr bool kConverted = !std::is_same_v<T, float>;
  const Tile tl(a, it);
  const int64_t D = tl.D, G = tl.G, MH = tl.MH;
  const int64_t RV = (MH + kLanes - 1) / kLanes, PR = RV * kLanes;
  sc.f.resize(D * PR + PR * D + 2 * PR + kChunk * PR + (kConverted ? 2 * kChunk * D : 0));
  auto& rows = std::get<std::vector<const float*>>(sc.rows);
  rows.resize(2 * kChunk);
  float* qT = sc.f.data();
  float* acc = qT + D * PR;     // [PR][D]
  float* mrow = acc + PR * D;
  float* lrow = mrow + PR;
  float* sT = lrow + PR;        // [kChunk][PR] scores, then probabilities
  float* kb = sT + kChunk * PR;
  float* vb = kb + kChunk * D;
  const float** krows = rows.data();
  const float** vrows = krows + kChunk;
  std::fill(qT, qT + 2 * PR * D, 0.0f);
  std::fill(mrow, mrow + PR, kNegInf);
  std::fill(lrow, lrow + PR, 0.0f);
  {
    // the queries, scaled, into [head_dim][rows]: kLanes rows by kLanes dims per register transpose
    const float* src[kLanes];
    const float* zeros = acc;  // zero until the first chunk's p.V
    const int64_t d_vec = D / kLanes * kLanes;
    for (int64_t m0 = 0; m0 < PR; m0 += kLanes) {
      for (int i = 0; i < kLanes; ++i) {
        const int64_t m = m0 + i;
        src[i] = m < MH ? a.q + (tl.q_begin + it.first + m / G) * a.q_st + (it.kv_head * G + m % G) * a.q_sh : zeros;
      }
      for (int64_t d0 = 0; d0 < d_vec; d0 += kLanes) transpose_scaled(src, d0, a.scale, qT + d0 * PR + m0, PR);
      for (int64_t d = d_vec; d < D; ++d)
        for (int i = 0; i < kLanes; ++i) qT[d * PR + m0 + i] = src[i][d] * a.scale;
    }
  }
  // Each row's causal limit as a position (padding rows take the last real row's).
  std::vector<vfi>& seen = sc.seen;
  seen.resize(RV);
  for (int64_t m = 0; m < PR; ++m) seen[m / kLanes][m % kLanes] = int32_t(tl.first_limit + std::min(m, MH - 1) / G);
  for (int64_t c0 = it.begin; c0 < it.end; c0 += kChunk) {
    const int n_pos = int(std::min<int64_t>(kChunk, it.end - c0));
    gather_rows<T>(a, it, tl, c0, n_pos, krows, vrows, kb, vb);
    const int n_blk = (n_pos + kPosBlock - 1) / kPosBlock * kPosBlock;
    for (int n = n_pos; n < n_blk; ++n) krows[n] = krows[0];  // padding positions, never used
    // 1. scores, four vectors of rows at a time
    for (int64_t rv = 0; rv < RV; rv += 4) {
      const float* qv = qT + rv * kLanes;
      float* sv = sT + rv * kLanes;
      switch (std::min<int64_t>(4, RV - rv)) {
        case 4: scores_by_rows<4>(qv, PR, krows, n_blk, D, sv, PR); break;
        case 3: scores_by_rows<3>(qv, PR, krows, n_blk, D, sv, PR); break;
        case 2: scores_by_rows<2>(qv, PR, krows, n_blk, D, sv, PR); break;
        default: scores_by_rows<1>(qv, PR, krows, n_blk, D, sv, PR); break;
      }
    }
    // 2. online softmax, lane-wise over rows: masked causally, s becomes p, acc is rescaled
    for (int64_t rv = 0; rv < RV; ++rv) {
      const vfi limit = seen[rv] - int32_t(c0);  // row sees positions n < limit of this chunk
      vf mv = splatv(kNegInf);
      for (int n = 0; n < n_pos; ++n) {
        float* p = sT + n * PR + rv * kLanes;
        const vf sc_n = vfi{} + n < limit ? loadv(p) : splatv(kNegInf);
        storev(p, sc_n);
        mv = maxv(mv, sc_n);
      }
      const vf m_old = loadv(mrow + rv * kLanes), m_new = maxv(m_old, mv);
      // a row with nothing to see yet keeps max -inf and alpha 1 (no NaN from -inf - -inf)
      const vf alpha = m_new == kNegInf ? splatv(1.0f) : expv(m_old - m_new);
      storev(mrow + rv * kLanes, m_new);
      vf sum = vf{};
      for (int n = 0; n < n_pos; ++n) {
        float* p = sT + n * PR + rv * kLanes;
        const vf x = loadv(p);
        const vf e = x == kNegInf ? vf{} : expv(x - m_new);
        storev(p, e);
        sum += e;
      }
      storev(lrow + rv * kLanes, loadv(lrow + rv * kLanes) * alpha + sum);
      for (int j = 0; j < kLanes; ++j)
        if (alpha[j] != 1.0f && rv * kLanes + j < MH) {
          float* ar = acc + (rv * kLanes + j) * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) ar[d] *= alpha[j];
        }
    }
    // 3. acc += p V, kRowBlock rows at a time (real rows only)
    for (int64_t m = 0; m < MH; m += kRowBlock) {
      float* ar[kRowBlock];
      const float* pr[kRowBlock];
      for (int r = 0; r < kRowBlock; ++r) {
        ar[r] = acc + (m + r) * D;
        pr[r] = sT + m + r;
      }
      accumulate_pv<kRowBlock>(ar, pr, PR, vrows, tl.limit(m + kRowBlock - 1, c0, n_pos), D);
    }
  }
  write_rows(a, it, tl, acc, mrow, lrow, PR);
}

}  // namespace quire_cpu
