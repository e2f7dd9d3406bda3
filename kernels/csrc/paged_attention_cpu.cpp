// Paged attention on the CPU over a ragged batch, reading K/V in place through the block
// table (no gather copy). Registered as torch.ops.quire_cpu.paged_attention; the Python
// side (kernels/cpu_attention.py) owns the contract, kernels/cpu_extension.py the build.
//
// Work items. A request's query tokens are cut into tiles of kTileRows / group tokens. A tile
// with many rows per KV head (tokens x group >= kTransposeRows: prefill chunks) makes one item
// per KV head; its rows are the tile's tokens times the `group` query heads sharing the head,
// so each K/V row is read once for the whole group (GQA/MQA). A tile with few (decodes) makes
// one item for all KV heads: a position's rows for every head lie side by side in the cache,
// so the item streams whole blocks, which is what a decode's memory-bound pass needs. Long
// context ranges are cut into chunks (flash decoding) so a batch of few long decodes still
// keeps every thread busy; split items write partial (max, sum, acc) triples that a second
// pass combines. Items are handed out dynamically, longest first.
//
// Inner loop. kChunk context positions at a time: K/V rows are located through the block
// table (fp32 rows read where they lie, others converted to fp32 scratch). Prefill items
// transpose K to [head_dim][kChunk] so scores vectorise over positions, two query rows per K
// load; decode items take eight dot products at a time with a transposing reduction. Scores
// are masked causally and folded in with an online softmax in fp32 (vectorised exp); p.V runs
// two rows per V load.
// bf16/fp16 and quantized caches (int8 or e4m3 codes, fp16 scale per token and KV head) are
// converted as read, code * scale, into the fp32 scratch rows; e4m3 bytes go through a
// 256-entry table.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "vec8.h"

namespace {
using namespace quire_cpu;

constexpr int64_t kTileRows = 64;  // query rows (tokens x group) per tile, so K's transpose is amortised
constexpr int kChunk = 32;   // context positions per inner step
constexpr int64_t kTransposeRows = 8;  // rows per item from which K is transposed
constexpr int64_t kMinSplit = 256;  // never split a context range into shorter pieces

enum Kind : int64_t { kValues = 0, kInt8 = 1, kFp8 = 2 };

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
const Fp8Table kFp8Table;

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

// Per-thread scratch, reused across items: floats (queries, accumulators, converted rows,
// probabilities) and the K/V row pointers of the current chunk, [head][position].
struct Scratch {
  std::vector<float> f;
  std::vector<const float*> rows;
};

template <typename T>
void run_item(const Args& a, const Item& it, Scratch& sc) {
  // Rows are (head, token, group) with each head's rows padded to an even count (PH): the
  // hot loops take rows in pairs; a padding row keeps a zero query and zero probabilities
  // and is never written out.
  const int64_t D = a.head_dim, G = a.group, NH = it.heads;
  const int64_t MH = int64_t(it.tokens) * G, PH = MH + (MH & 1), P = NH * PH;
  sc.f.assign(P * D * 2 + P * 2 + D * kChunk + 2 * NH * kChunk * D + P * kChunk, 0.0f);
  sc.rows.assign(2 * NH * kChunk, nullptr);
  float* q = sc.f.data();
  float* acc = q + P * D;
  float* mrow = acc + P * D;
  float* lrow = mrow + P;
  float* kt = lrow + P;             // [D][kChunk]
  float* kb = kt + D * kChunk;      // [NH][kChunk][D] converted K rows
  float* vb = kb + NH * kChunk * D; // [NH][kChunk][D] converted V rows
  float* s = vb + NH * kChunk * D;  // [P][kChunk] probabilities
  const float** krows = sc.rows.data();     // [NH][kChunk]
  const float** vrows = krows + NH * kChunk;
  const int64_t q_begin = a.qsl[it.req], q_len = a.qsl[it.req + 1] - q_begin;
  const int64_t ctx_before = a.seq_lens[it.req] - q_len;
  for (int64_t h = 0; h < NH; ++h)
    for (int64_t t = 0; t < it.tokens; ++t)
      for (int64_t g = 0; g < G; ++g) {
        const float* src = a.q + (q_begin + it.first + t) * a.q_st + ((it.kv_head + h) * G + g) * a.q_sh;
        float* dst = q + (h * PH + t * G + g) * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) dst[d] = src[d] * a.scale;
      }
  std::fill(mrow, mrow + P, -std::numeric_limits<float>::infinity());
  const T* kc = static_cast<const T*>(a.k);
  const T* vc = static_cast<const T*>(a.v);
  const int64_t* table = a.table + int64_t(it.req) * a.table_stride;
  // Many rows per head (prefill tiles, one head per item): transpose K once so each row's
  // scores vectorise over positions. Few (decodes, all heads per item): eight dot products
  // at a time straight from the rows, no transpose to pay.
  const bool transposed = MH >= kTransposeRows;
  // causal: the row's query token t sits at position ctx_before + first + t and sees up to it
  int64_t c0 = it.begin;
  auto limit_of = [&](int64_t local, int n_pos) {
    const int64_t t = std::min(local, MH - 1) / G;
    return int(std::max<int64_t>(0, std::min<int64_t>(n_pos, ctx_before + it.first + t + 1 - c0)));
  };
  for (; c0 < it.end; c0 += kChunk) {
    const int n_pos = int(std::min<int64_t>(kChunk, it.end - c0));
    int64_t block_idx = c0 / a.block_size, off = c0 % a.block_size;  // stepped, not divided, per position
    for (int n = 0; n < n_pos; ++n, ++off) {
      if (off == a.block_size) { off = 0; ++block_idx; }
      const int64_t block = table[block_idx];
      // All the item's heads of one position lie side by side: read them in one sweep.
      const int64_t base = block * a.c_sb + off * a.c_sp + it.kv_head * a.c_sh;
      const int64_t sbase = block * a.s_sb + off * a.s_sp + it.kv_head * a.s_sh;
      for (int64_t h = 0; h < NH; ++h) {
        const int64_t row = base + h * a.c_sh;
        if constexpr (std::is_same_v<T, float>) {
          krows[h * kChunk + n] = kc + row;  // fp32 rows are used where they lie
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
    // 1. scores s[m][n]
    if (transposed) {  // one head; two rows at a time (each K load feeds both)
      static_assert(kChunk == 32, "the transposed scores are four vectors per row");
      for (int n = 0; n < kChunk; ++n)
        for (int64_t d = 0; d < D; ++d) kt[d * kChunk + n] = n < n_pos ? krows[n][d] : 0.0f;
      for (int64_t m = 0; m < P; m += 2) {
        const float* q0 = q + m * D;
        const float* q1 = q0 + D;
        v8 a0 = splat8(0.0f), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
        for (int64_t d = 0; d < D; ++d) {
          const float* kd = kt + d * kChunk;
          const v8 k0 = load8(kd), k1 = load8(kd + 8), k2 = load8(kd + 16), k3 = load8(kd + 24);
          const v8 x = splat8(q0[d]), y = splat8(q1[d]);
          a0 += x * k0; a1 += x * k1; a2 += x * k2; a3 += x * k3;
          b0 += y * k0; b1 += y * k1; b2 += y * k2; b3 += y * k3;
        }
        float* s0 = s + m * kChunk;
        store8(s0, a0); store8(s0 + 8, a1); store8(s0 + 16, a2); store8(s0 + 24, a3);
        store8(s0 + 32, b0); store8(s0 + 40, b1); store8(s0 + 48, b2); store8(s0 + 56, b3);
      }
    } else {
      for (int64_t h = 0; h < NH; ++h) {
        const float** kr = krows + h * kChunk;
        for (int n = n_pos; n < ((n_pos + 7) & ~7); ++n) kr[n] = kr[0];  // dots8 reads whole groups of 8
        for (int64_t local = 0; local < MH; ++local) {
          const int64_t m = h * PH + local;
          for (int n = 0, limit = limit_of(local, n_pos); n < limit; n += 8)
            store8(s + m * kChunk + n, dots8(q + m * D, kr + n, D));
        }
      }
    }
    // 2. online softmax per row: s becomes p (0 past the row's position), acc is rescaled
    constexpr float kNegInf = -std::numeric_limits<float>::infinity();
    const v8 zero = splat8(0.0f);
    for (int64_t m = 0; m < P; ++m) {
      const int64_t local = m % PH;
      float* sr = s + m * kChunk;
      const int limit = limit_of(local, n_pos);
      if (limit == 0 || local >= MH) {
        std::fill(sr, sr + kChunk, 0.0f);
        continue;
      }
      for (int n = limit; n < kChunk; ++n) sr[n] = kNegInf;
      const v8 s0 = load8(sr), s1 = load8(sr + 8), s2 = load8(sr + 16), s3 = load8(sr + 24);
      const v8 mv = max8(max8(s0, s1), max8(s2, s3));
      float mx = mrow[m];
      for (int j = 0; j < 8; ++j) mx = std::max(mx, mv[j]);
      const float alpha = std::exp(mrow[m] - mx);  // exp(-inf) = 0 on the first chunk
      const v8 e0 = s0 == kNegInf ? zero : exp8(s0 - mx), e1 = s1 == kNegInf ? zero : exp8(s1 - mx);
      const v8 e2 = s2 == kNegInf ? zero : exp8(s2 - mx), e3 = s3 == kNegInf ? zero : exp8(s3 - mx);
      store8(sr, e0); store8(sr + 8, e1); store8(sr + 16, e2); store8(sr + 24, e3);
      mrow[m] = mx;
      lrow[m] = lrow[m] * alpha + sum8((e0 + e1) + (e2 + e3));
      if (alpha != 1.0f) {
        float* ar = acc + m * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) ar[d] *= alpha;
      }
    }
    // 3. acc += p V, two rows of one head at a time (each V load feeds both)
    for (int64_t h = 0; h < NH; ++h)
      for (int64_t local = 0; local < PH; local += 2) {
        const int64_t m = h * PH + local;
        accumulate_pv2(acc + m * D, acc + (m + 1) * D, s + m * kChunk, s + (m + 1) * kChunk, vrows + h * kChunk,
                       std::max(limit_of(local, n_pos), limit_of(local + 1, n_pos)), D);
      }
  }
  for (int64_t h = 0; h < NH; ++h)
    for (int64_t local = 0; local < MH; ++local) {
      const int64_t m = h * PH + local, t = local / G, head = (it.kv_head + h) * G + local % G;
      if (it.partial >= 0) {
        float* dst = a.part + (it.partial + h * MH + local) * a.part_row;
        dst[0] = mrow[m];
        dst[1] = lrow[m];
        std::memcpy(dst + 2, acc + m * D, D * sizeof(float));
      } else {
        float* dst = a.out + (q_begin + it.first + t) * a.o_st + head * a.o_sh;
        const float inv = lrow[m] > 0.0f ? 1.0f / lrow[m] : 0.0f;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) dst[d] = acc[m * D + d] * inv;
      }
    }
}

// Combine the partial triples of one tile's splits (items[first_item .. first_item + n)).
void reduce_splits(const Args& a, const Item* items, int64_t n) {
  const Item& it = items[0];
  const int64_t D = a.head_dim, G = a.group, MH = int64_t(it.tokens) * G, M = MH * it.heads;
  const int64_t q_begin = a.qsl[it.req];
  for (int64_t m = 0; m < M; ++m) {
    const int64_t local = m % MH, head = (it.kv_head + m / MH) * G + local % G;
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < n; ++i) mx = std::max(mx, a.part[(items[i].partial + m) * a.part_row]);
    float* dst = a.out + (q_begin + it.first + local / G) * a.o_st + head * a.o_sh;
    std::fill(dst, dst + D, 0.0f);
    float l = 0.0f;
    for (int64_t i = 0; i < n; ++i) {
      const float* src = a.part + (items[i].partial + m) * a.part_row;
      if (src[1] == 0.0f) continue;  // a chunk wholly after this row's position
      const float w = std::exp(src[0] - mx);
      l += src[1] * w;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) dst[d] += src[2 + d] * w;
    }
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) dst[d] *= inv;
  }
}

at::Tensor paged_attention(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_tables, const at::Tensor& seq_lens,
                           const at::Tensor& query_start_loc, double scale,
                           const c10::optional<at::Tensor>& k_scale, const c10::optional<at::Tensor>& v_scale,
                           int64_t kind) {
  TORCH_CHECK(query.scalar_type() == at::kFloat && query.dim() == 3 && query.stride(2) == 1,
              "query must be fp32 [tokens, heads, head_dim] with unit stride on head_dim");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.strides() == v_cache.strides() && k_cache.stride(3) == 1,
              "caches must be [blocks, block_size, kv_heads, head_dim] alike, unit stride on head_dim");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && block_tables.is_contiguous(), "block tables: int64");
  TORCH_CHECK(seq_lens.scalar_type() == at::kInt && query_start_loc.scalar_type() == at::kInt, "lengths: int32");
  const int64_t num_reqs = seq_lens.size(0), H = query.size(1), D = query.size(2);
  const int64_t KV = k_cache.size(2), G = H / KV;
  TORCH_CHECK(G * KV == H && k_cache.size(3) == D, "heads must be a multiple of kv heads; head dims must match");
  at::Tensor out = at::empty(query.sizes(), query.options());
  Args a{query.data_ptr<float>(), out.data_ptr<float>(), query.stride(0), query.stride(1),
         out.stride(0), out.stride(1), k_cache.data_ptr(), v_cache.data_ptr(),
         k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), nullptr, nullptr, 0, 0, 0,
         block_tables.data_ptr<int64_t>(), block_tables.size(1), seq_lens.data_ptr<int32_t>(),
         query_start_loc.data_ptr<int32_t>(), G, D, k_cache.size(1), static_cast<float>(scale), nullptr, D + 2};
  if (kind != kValues) {
    TORCH_CHECK(k_scale && v_scale && k_scale->scalar_type() == at::kHalf && k_scale->strides() == v_scale->strides(),
                "a quantized cache needs fp16 k_scale / v_scale");
    a.ks = reinterpret_cast<const c10::Half*>(k_scale->data_ptr());
    a.vs = reinterpret_cast<const c10::Half*>(v_scale->data_ptr());
    a.s_sb = k_scale->stride(0); a.s_sp = k_scale->stride(1); a.s_sh = k_scale->stride(2);
  }
  // Items, then the split rule: cut any context range longer than half a thread's fair
  // share of all positions (and than kMinSplit), so no thread is left with one long tail.
  std::vector<Item> items;
  int64_t total = 0;
  for (int64_t r = 0; r < num_reqs; ++r) {
    const int64_t q_len = a.qsl[r + 1] - a.qsl[r], ctx_before = a.seq_lens[r] - q_len;
    const int64_t tile = std::max<int64_t>(1, kTileRows / G);  // query tokens per tile
    for (int64_t f = 0; f < q_len; f += tile) {
      const int64_t tokens = std::min<int64_t>(tile, q_len - f), end = ctx_before + f + tokens;
      if (tokens * G < kTransposeRows)  // decode-like: one item reads every head's K/V rows in one sweep
        items.push_back({int32_t(r), 0, int32_t(KV), int32_t(f), int32_t(tokens), 0, end, -1});
      else
        for (int64_t h = 0; h < KV; ++h)
          items.push_back({int32_t(r), int32_t(h), 1, int32_t(f), int32_t(tokens), 0, end, -1});
      total += end * KV;
    }
  }
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t max_units = std::max<int64_t>(kMinSplit, (total + 2 * threads - 1) / (2 * threads));
  std::vector<Item> work;
  std::vector<std::pair<int64_t, int64_t>> groups;  // (first item, count) of each split tile
  int64_t part_rows = 0;
  for (const Item& it : items) {
    const int64_t max_len = std::max<int64_t>(kMinSplit, max_units / it.heads);  // positions
    const int64_t pieces = (it.end + max_len - 1) / max_len;
    if (pieces <= 1) { work.push_back(it); continue; }
    const int64_t len = (it.end + pieces - 1) / pieces, first = int64_t(work.size());
    for (int64_t b = 0; b < it.end; b += len) {
      Item piece = it;
      piece.begin = b; piece.end = std::min(it.end, b + len); piece.partial = part_rows;
      part_rows += int64_t(it.tokens) * G * it.heads;
      work.push_back(piece);
    }
    groups.emplace_back(first, int64_t(work.size()) - first);
  }
  std::vector<float> part(part_rows * a.part_row);
  a.part = part.data();
  std::vector<int64_t> order(work.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = int64_t(i);
  auto cost = [&](int64_t i) { return (work[i].end - work[i].begin) * work[i].tokens * work[i].heads; };
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return cost(x) > cost(y); });
  std::atomic<int64_t> next{0};
  auto drain = [&](auto tag) {
    using T = decltype(tag);
    const int64_t workers = std::min<int64_t>(threads, int64_t(work.size()));
    at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
      Scratch scratch;
      for (int64_t i; (i = next.fetch_add(1)) < int64_t(order.size());) run_item<T>(a, work[order[i]], scratch);
    });
  };
  const auto dtype = k_cache.scalar_type();
  if (kind == kInt8) drain(int8_t{});
  else if (kind == kFp8) drain(uint8_t{});
  else if (dtype == at::kFloat) drain(float{});
  else if (dtype == at::kBFloat16) drain(c10::BFloat16{});
  else if (dtype == at::kHalf) drain(c10::Half{});
  else TORCH_CHECK(false, "unsupported cache dtype ", dtype);
  if (!groups.empty())
    at::parallel_for(0, int64_t(groups.size()), 1, [&](int64_t b, int64_t e) {
      for (int64_t g = b; g < e; ++g) reduce_splits(a, work.data() + groups[g].first, groups[g].second);
    });
  return out;
}

}  // namespace

TORCH_LIBRARY(quire_cpu, m) {
  m.def("paged_attention(Tensor query, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, "
        "Tensor query_start_loc, float scale, Tensor? k_scale, Tensor? v_scale, int kind) -> Tensor");
}

TORCH_LIBRARY_IMPL(quire_cpu, CPU, m) { m.impl("paged_attention", &paged_attention); }
