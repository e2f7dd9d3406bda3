// The work items of paged_attention_cpu.cpp: one query tile of one request against a range of
// its context, read in place through the block table. Two loop nests, by rows per KV head:
//
// - Decode tiles (fewer than kRowLanesMin rows per head: single-token decodes, GQA groups of
//   up to 7) cover every KV head of the request at once, because a position's rows for all
//   heads lie side by side and the item then streams whole blocks; the work is memory-bound.
//   Scores take lanes over head_dim, each K row loaded once for a block of query rows, and a
//   transposing reduction finishes kLanes of them at a time; the next chunk's rows are
//   prefetched while this chunk's arithmetic runs.
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

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "simd.h"

namespace quire_cpu {

constexpr int kChunk = 32;             // context positions per inner step
constexpr int64_t kRowLanesMin = 8;    // rows per KV head from which a tile is a prefill tile
constexpr int kChunkVecs = kChunk / kLanes;
static_assert(kChunk % kLanes == 0, "a chunk is whole vectors of positions");
// Query rows per register block of p.V and of decode scores (each K/V vector load feeds them
// all: as many as the vector registers hold, 32 with AVX-512, 16 with AVX2), and positions per
// register block of prefill scores.
constexpr int kRowBlock = kLanes == 16 ? 4 : 2;
constexpr int kPosBlock = kLanes == 16 ? 4 : 2;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Fp8Table {
  float v[256];
  Fp8Table() {  // float8 e4m3fn: bias 7, no infinities, only S.1111.111 is NaN
    for (int c = 0; c < 256; ++c) {
      int sign = c >> 7, exp = (c >> 3) & 0xF, man = c & 7;
      float mag = exp == 0 ? std::ldexp(man / 8.0f, -6) : std::ldexp(1.0f + man / 8.0f, exp - 7);
      if (exp == 15 && man == 7) mag = std::numeric_limits<float>::quiet_NaN();
      v[c] = sign ? -mag : mag;
    }
  }
};
inline const Fp8Table kFp8Table;

// One cache element to fp32 (before the scale of a quantized cache).
inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline float to_float(c10::Half x) { return static_cast<float>(x); }
inline float to_float(int8_t x) { return static_cast<float>(x); }
inline float to_float(uint8_t x) { return kFp8Table.v[x]; }

struct Item {
  int32_t req, kv_head, heads;          // KV heads kv_head .. kv_head + heads - 1
  int32_t first, tokens;                // the tile: query tokens first .. first + tokens - 1
  int64_t begin, end;                   // context positions attended by this item
  int64_t partial;                      // -1: writes the output; else its slot in the partials
};

struct Args {
  const float* q; float* out; int64_t q_st, q_sh, o_st, o_sh;
  const void* k; const void* v; int64_t c_sb, c_sp, c_sh;  // cache strides (elements)
  const c10::Half* ks; const c10::Half* vs; int64_t s_sb, s_sp, s_sh;
  const int64_t* table; int64_t table_stride;
  const int32_t* seq_lens; const int32_t* qsl;
  int64_t group, head_dim, block_size; float scale;
  float* part; int64_t part_row;  // partial rows: [m, l, acc[head_dim]]
};

// Per-thread scratch, reused across items (sized per item, never cleared: each region is
// written before it is read).
struct Scratch {
  std::vector<float> f;
  std::vector<vf> t;                // a decode chunk's partial dot products
  // the chunk's K/V rows, [head][position], by the element type the loops read
  std::tuple<std::vector<const float*>, std::vector<const int8_t*>, std::vector<const c10::BFloat16*>> rows;
  std::vector<vfi> seen;            // a prefill item's causal limits, a vector of rows each
};

// The item's geometry and where its query token rows sit.
struct Tile {
  int64_t D, G, NH, MH;       // head dim, group, KV heads, rows per head (tokens x group)
  int64_t q_begin, ctx_before;
  int64_t first_limit;        // row 0's causal limit: it sees positions < first_limit
  Tile(const Args& a, const Item& it)
      : D(a.head_dim), G(a.group), NH(it.heads), MH(int64_t(it.tokens) * a.group), q_begin(a.qsl[it.req]),
        ctx_before(a.seq_lens[it.req] - (a.qsl[it.req + 1] - a.qsl[it.req])),
        first_limit(ctx_before + it.first + 1) {}
  // positions of the chunk at c0 that row `local` (of a head) sees: 0 .. n_pos
  int limit(int64_t local, int64_t c0, int n_pos) const {
    const int64_t t = std::min(local, MH - 1) / G;
    return int(std::max<int64_t>(0, std::min<int64_t>(n_pos, first_limit + t - c0)));
  }
};

// Points krows/vrows ([NH][kChunk]) at positions c0 .. c0 + n_pos of the item's heads: fp32
// rows where they lie, others converted (code * scale) into kb/vb ([NH][kChunk][D]).
template <typename T>
void gather_rows(const Args& a, const Item& it, const Tile& tl, int64_t c0, int n_pos, const float** krows,
                 const float** vrows, float* kb, float* vb) {
  const T* kc = static_cast<const T*>(a.k);
  const T* vc = static_cast<const T*>(a.v);
  const int64_t* table = a.table + int64_t(it.req) * a.table_stride;
  const int64_t D = tl.D;
  int64_t block_idx = c0 / a.block_size, off = c0 % a.block_size;  // stepped, not divided, per position
  for (int n = 0; n < n_pos; ++n, ++off) {
    if (off == a.block_size) { off = 0; ++block_idx; }
    const int64_t block = table[block_idx];
    const int64_t base = block * a.c_sb + off * a.c_sp + it.kv_head * a.c_sh;
    const int64_t sbase = block * a.s_sb + off * a.s_sp + it.kv_head * a.s_sh;
    for (int64_t h = 0; h < tl.NH; ++h) {
      const int64_t row = base + h * a.c_sh;
      if constexpr (std::is_same_v<T, float>) {
        krows[h * kChunk + n] = kc + row;
        vrows[h * kChunk + n] = vc + row;
      } else {
        const float ksc = a.ks ? static_cast<float>(a.ks[sbase + h * a.s_sh]) : 1.0f;
        const float vsc = a.ks ? static_cast<float>(a.vs[sbase + h * a.s_sh]) : 1.0f;
        const T* kr = kc + row;
        const T* vr = vc + row;
        float* kd = kb + (h * kChunk + n) * D;
        float* vd = vb + (h * kChunk + n) * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) kd[d] = to_float(kr[d]) * ksc;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) vd[d] = to_float(vr[d]) * vsc;
        krows[h * kChunk + n] = kd;
        vrows[h * kChunk + n] = vd;
      }
    }
  }
}

// Points krows/vrows ([NH][kChunk]) at positions c0 .. c0 + n_pos of the item's heads where they
// lie, for loops that convert as they read; a quantized cache's scales go to kscale/vscale
// ([NH][kChunk], 0 for the padding positions up to whole vectors).
template <typename T>
void point_rows(const Args& a, const Item& it, const Tile& tl, int64_t c0, int n_pos, const T** krows,
                const T** vrows, float* kscale, float* vscale) {
  const T* kc = static_cast<const T*>(a.k);
  const T* vc = static_cast<const T*>(a.v);
  const int64_t* table = a.table + int64_t(it.req) * a.table_stride;
  int64_t block_idx = c0 / a.block_size, off = c0 % a.block_size;
  for (int n = 0; n < n_pos; ++n, ++off) {
    if (off == a.block_size) { off = 0; ++block_idx; }
    const int64_t block = table[block_idx];
    const int64_t base = block * a.c_sb + off * a.c_sp + it.kv_head * a.c_sh;
    for (int64_t h = 0; h < tl.NH; ++h) {
      krows[h * kChunk + n] = kc + base + h * a.c_sh;
      vrows[h * kChunk + n] = vc + base + h * a.c_sh;
    }
    if (kscale != nullptr) {
      const int64_t sbase = block * a.s_sb + off * a.s_sp + it.kv_head * a.s_sh;
      for (int64_t h = 0; h < tl.NH; ++h) {
        kscale[h * kChunk + n] = static_cast<float>(a.ks[sbase + h * a.s_sh]);
        vscale[h * kChunk + n] = static_cast<float>(a.vs[sbase + h * a.s_sh]);
      }
    }
  }
  if (kscale != nullptr)
    for (int64_t h = 0; h < tl.NH; ++h)
      for (int n = n_pos; n < kChunk; ++n) kscale[h * kChunk + n] = vscale[h * kChunk + n] = 0.0f;
}

// The item's results: row (h, local) at acc + (h * row_stride + local) * D with its max and
// sum, written to the output (normalised) or to its partial slot.
inline void write_rows(const Args& a, const Item& it, const Tile& tl, const float* acc, const float* mrow,
                       const float* lrow, int64_t row_stride) {
  const int64_t D = tl.D;
  for (int64_t h = 0; h < tl.NH; ++h)
    for (int64_t local = 0; local < tl.MH; ++local) {
      const int64_t m = h * row_stride + local, t = local / tl.G, head = (it.kv_head + h) * tl.G + local % tl.G;
      if (it.partial >= 0) {
        float* dst = a.part + (it.partial + h * tl.MH + local) * a.part_row;
        dst[0] = mrow[m];
        dst[1] = lrow[m];
        std::memcpy(dst + 2, acc + m * D, D * sizeof(float));
      } else {
        float* dst = a.out + (tl.q_begin + it.first + t) * a.o_st + head * a.o_sh;
        const float inv = lrow[m] > 0.0f ? 1.0f / lrow[m] : 0.0f;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) dst[d] = acc[m * D + d] * inv;
      }
    }
}

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
  const int64_t* table = a.table + int64_t(it.req) * a.table_stride;
  const int64_t row_bytes = NH * a.c_sh * int64_t(sizeof(T));  // one position's rows of the item's heads
  for (int64_t c0 = it.begin; c0 < it.end; c0 += kChunk) {
    const int n_pos = int(std::min<int64_t>(kChunk, it.end - c0));
    if constexpr (kInPlace)
      point_rows<T>(a, it, tl, c0, n_pos, krows, vrows, kScaled ? kscale : nullptr, kScaled ? vscale : nullptr);
    else
      gather_rows<T>(a, it, tl, c0, n_pos, krows, vrows, kb, vb);
    // The next chunk's K/V rows are prefetched (whole positions, every head of the item) while
    // this chunk's arithmetic runs: a decode reads each row once, so without it every chunk
    // would wait on memory (measured ~10% faster over a 350 MB working set than no prefetch,
    // or prefetching a head's share as each head is processed).
    const int64_t next_end = std::min<int64_t>(it.end, c0 + 2 * kChunk);
    for (int64_t c = c0 + kChunk; c < next_end; ++c) {
      const int64_t row = table[c / a.block_size] * a.c_sb + (c % a.block_size) * a.c_sp + it.kv_head * a.c_sh;
      const char* k_row = reinterpret_cast<const char*>(static_cast<const T*>(a.k) + row);
      const char* v_row = reinterpret_cast<const char*>(static_cast<const T*>(a.v) + row);
      for (int64_t o = 0; o < row_bytes; o += 64) {
        __builtin_prefetch(k_row + o, 0, 3);
        __builtin_prefetch(v_row + o, 0, 3);
      }
      if constexpr (kScaled) {
        const int64_t srow = table[c / a.block_size] * a.s_sb + (c % a.block_size) * a.s_sp + it.kv_head * a.s_sh;
        __builtin_prefetch(a.ks + srow, 0, 3);
        __builtin_prefetch(a.vs + srow, 0, 3);
      }
    }
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
        with_rows(RB, [&](auto rows) { dot_rows<rows()>(qr, kr, n_dot, D, t, kChunk); });
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
  for (int64_t m = 0; m < MH; ++m) {
    const float* src = a.q + (tl.q_begin + it.first + m / G) * a.q_st + (it.kv_head * G + m % G) * a.q_sh;
    for (int64_t d = 0; d < D; ++d) qT[d * PR + m] = src[d] * a.scale;
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
