// The work items of paged_attention_cpu.cpp and how they reach their rows: the item and
// argument structs, per-thread scratch, a tile's geometry, the block-table walk that points at
// a chunk's K/V rows in place (or converts them into fp32 scratch rows), and the write-out of
// finished rows. The loop nests over them are in attention_tiles.h.
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

// An e4m3 byte to fp32 (before its scale); the other cache types' `to_float` are in simd.h.
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

// Calls f(n, row, scale_row) for positions n = 0 .. n_pos of the chunk at c0: the element
// offsets of the position's row of the item's first KV head in the caches and in the scales.
// Always inlined, so a callback that only prefetches is not deleted (see prefetch_l2).
template <typename F>
__attribute__((always_inline)) inline void for_each_position(const Args& a, const Item& it, int64_t c0, int n_pos, F&& f) {
  const int64_t* table = a.table + int64_t(it.req) * a.table_stride;
  int64_t block_idx = c0 / a.block_size, off = c0 % a.block_size;  // stepped, not divided, per position
  for (int n = 0; n < n_pos; ++n, ++off) {
    if (off == a.block_size) { off = 0; ++block_idx; }
    const int64_t block = table[block_idx];
    f(n, block * a.c_sb + off * a.c_sp + it.kv_head * a.c_sh, block * a.s_sb + off * a.s_sp + it.kv_head * a.s_sh);
  }
}

// Points krows/vrows ([NH][kChunk]) at positions c0 .. c0 + n_pos of the item's heads where they
// lie, for loops that read the cache's own elements; a quantized cache's scales go to
// kscale/vscale ([NH][kChunk], 0 for the padding positions up to whole vectors) when given.
template <typename T>
void point_rows(const Args& a, const Item& it, const Tile& tl, int64_t c0, int n_pos, const T** krows,
                const T** vrows, float* kscale, float* vscale) {
  const T* kc = static_cast<const T*>(a.k);
  const T* vc = static_cast<const T*>(a.v);
  for_each_position(a, it, c0, n_pos, [&](int n, int64_t row, int64_t srow) {
    for (int64_t h = 0; h < tl.NH; ++h) {
      krows[h * kChunk + n] = kc + row + h * a.c_sh;
      vrows[h * kChunk + n] = vc + row + h * a.c_sh;
      if (kscale != nullptr) {
        kscale[h * kChunk + n] = static_cast<float>(a.ks[srow + h * a.s_sh]);
        vscale[h * kChunk + n] = static_cast<float>(a.vs[srow + h * a.s_sh]);
      }
    }
  });
  if (kscale != nullptr)
    for (int64_t h = 0; h < tl.NH; ++h)
      for (int n = n_pos; n < kChunk; ++n) kscale[h * kChunk + n] = vscale[h * kChunk + n] = 0.0f;
}

// Points krows/vrows ([NH][kChunk]) at fp32 rows for positions c0 .. c0 + n_pos of the item's
// heads: fp32 rows where they lie, others converted (code * scale) into kb/vb ([NH][kChunk][D]).
template <typename T>
void gather_rows(const Args& a, const Item& it, const Tile& tl, int64_t c0, int n_pos, const float** krows,
                 const float** vrows, float* kb, float* vb) {
  if constexpr (std::is_same_v<T, float>) {
    point_rows<float>(a, it, tl, c0, n_pos, krows, vrows, nullptr, nullptr);
  } else {
    const T* kc = static_cast<const T*>(a.k);
    const T* vc = static_cast<const T*>(a.v);
    const int64_t D = tl.D;
    for_each_position(a, it, c0, n_pos, [&](int n, int64_t row, int64_t srow) {
      for (int64_t h = 0; h < tl.NH; ++h) {
        const float ksc = a.ks ? static_cast<float>(a.ks[srow + h * a.s_sh]) : 1.0f;
        const float vsc = a.ks ? static_cast<float>(a.vs[srow + h * a.s_sh]) : 1.0f;
        const T* kr = kc + row + h * a.c_sh;
        const T* vr = vc + row + h * a.c_sh;
        float* kd = kb + (h * kChunk + n) * D;
        float* vd = vb + (h * kChunk + n) * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) kd[d] = to_float(kr[d]) * ksc;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) vd[d] = to_float(vr[d]) * vsc;
        krows[h * kChunk + n] = kd;
        vrows[h * kChunk + n] = vd;
      }
    });
  }
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

}  // namespace quire_cpu
