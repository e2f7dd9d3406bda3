// Paged attention on the CPU over a ragged batch, reading K/V in place through the block
// table (no gather copy), and the K/V slot writes. Registered as torch.ops.quire_cpu.paged_attention
// and write_kv; the Python side (kernels/cpu_attention.py) owns the contract,
// kernels/cpu_extension.py the build.
//
// Work items. A request's query tokens are cut into tiles of kTileRows / group tokens. A tile
// with many rows per KV head (tokens x group >= kRowLanesMin: prefill chunks) makes one item
// per KV head; its rows are the tile's tokens times the `group` query heads sharing the head,
// so each K/V row is read once for the whole group (GQA/MQA). A tile with few (decodes) makes
// one item for all KV heads: a position's rows for every head lie side by side in the cache,
// so the item streams whole blocks, which is what a decode's memory-bound pass needs. Long
// context ranges are cut into chunks (flash decoding) so a batch of few long decodes still
// keeps every thread busy; split items write partial (max, sum, acc) triples that a second
// pass combines. Items are handed out dynamically, longest first. The items' loop nests are
// in attention_tiles.h.
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

#include "attention_tiles.h"

namespace {
using namespace quire_cpu;

constexpr int64_t kTileRows = 64;  // query rows (tokens x group) per tile
constexpr int64_t kMinSplit = 256;  // never split a context range into shorter pieces

enum Kind : int64_t { kValues = 0, kInt8 = 1, kFp8 = 2 };

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
      if (tokens * G < kRowLanesMin)  // decode-like: one item reads every head's K/V rows in one sweep
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
      for (int64_t i; (i = next.fetch_add(1)) < int64_t(order.size());) {
        const Item& it = work[order[i]];
        if (int64_t(it.tokens) * G < kRowLanesMin) run_decode_item<T>(a, it, scratch);
        else run_prefill_item<T>(a, it, scratch);
      }
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

// The slots of a K/V write, each checked against the caches' `slots` before anything is written
// (so a bad slot leaves the caches untouched).
const int64_t* checked_slots(const at::Tensor& slot_mapping, int64_t tokens, int64_t slots) {
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 && slot_mapping.is_contiguous() &&
              slot_mapping.size(0) == tokens, "slot_mapping: int64, one slot per token");
  const int64_t* slot = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t)
    TORCH_CHECK(slot[t] >= 0 && slot[t] < slots, "slot ", slot[t], " of token ", t, " is outside the cache's ", slots);
  return slot;
}

// Copies each token's K and V rows ([tokens, kv_heads, head_dim], rows may be strided: views of
// the fused QKV output) into its slot of the caches ([blocks, block_size, kv_heads, head_dim],
// contiguous, the rows' dtype). Every slot is checked before anything is written, so a bad
// slot leaves the caches untouched.
void write_kv(const at::Tensor& key, const at::Tensor& value, at::Tensor k_cache, at::Tensor v_cache,
              const at::Tensor& slot_mapping) {
  TORCH_CHECK(key.dim() == 3 && key.sizes() == value.sizes() && key.stride(2) == 1 && value.stride(2) == 1,
              "key and value must be [tokens, kv_heads, head_dim] alike, unit stride on head_dim");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.is_contiguous() &&
              v_cache.is_contiguous(), "caches must be contiguous [blocks, block_size, kv_heads, head_dim] alike");
  TORCH_CHECK(key.scalar_type() == k_cache.scalar_type() && value.scalar_type() == v_cache.scalar_type() &&
              key.scalar_type() == value.scalar_type(), "key, value and caches must share a dtype");
  TORCH_CHECK(key.size(1) == k_cache.size(2) && key.size(2) == k_cache.size(3), "rows and cache slots differ in shape");
  const int64_t tokens = key.size(0);
  const int64_t* slot = checked_slots(slot_mapping, tokens, k_cache.size(0) * k_cache.size(1));
  const int64_t e = key.element_size(), heads = key.size(1), row = key.size(2) * e, slot_bytes = heads * row;
  const int64_t k_st = key.stride(0) * e, k_sh = key.stride(1) * e, v_st = value.stride(0) * e, v_sh = value.stride(1) * e;
  const char* ks = static_cast<const char*>(key.data_ptr());
  const char* vs = static_cast<const char*>(value.data_ptr());
  char* kc = static_cast<char*>(k_cache.data_ptr());
  char* vc = static_cast<char*>(v_cache.data_ptr());
  at::parallel_for(0, tokens, 256, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t h = 0; h < heads; ++h) {
        std::memcpy(kc + slot[t] * slot_bytes + h * row, ks + t * k_st + h * k_sh, row);
        std::memcpy(vc + slot[t] * slot_bytes + h * row, vs + t * v_st + h * v_sh, row);
      }
  });
}

// kv_quant.quantize's rule, bit for bit (kernels/kv_quant.py states it): per row of head_dim
// values, scale = fp16(clamp(amax / limit, MIN_SCALE, MAX_SCALE)); per value, y = clamp(x / scale,
// -limit, limit), int8 codes floor(|y| + 0.5) * sign(y), e4m3 codes y rounded on e4m3's grid (step
// 2^(exponent - 3), the exponent never below -6) the same way. NaN propagates as torch's ops
// propagate it: a row holding one has a NaN scale and NaN (e4m3) or zero (int8) codes. torch.sign
// is 0 for -0, so only a negative nonzero y gives e4m3's -0.
constexpr float kMinScale = 0x1p-14f, kMaxScale = 65504.0f;
template <bool kE4m3> constexpr float code_limit() { return kE4m3 ? 448.0f : 127.0f; }

// kLanes values' codes at once, lane-wise without branches (floor of a value in [0, 2^23) is its
// truncation).
template <bool kE4m3>
inline void quantize_lanes(vf x, float scale, uint8_t* out) {
  constexpr float kLimit = code_limit<kE4m3>();
  const vf y0 = x / scale;
  const vfi nan = y0 != y0;
  vf y = y0 > kLimit ? splatv(kLimit) : y0;
  y = y < -kLimit ? splatv(-kLimit) : y;
  const vfi negative = y < 0.0f, positive = y > 0.0f;
  vfi bits;
  std::memcpy(&bits, &y, sizeof bits);
  bits &= 0x7FFFFFFF;
  vf magnitude;
  std::memcpy(&magnitude, &bits, sizeof magnitude);
  vfi code;
  if constexpr (kE4m3) {
    vfi exponent = ((bits >> 23) & 0xFF) - 127;
    exponent = exponent < -6 ? vfi{} - 6 : exponent;
    const vfi step_bits = (exponent + (127 - 3)) << 23;
    vf step;
    std::memcpy(&step, &step_bits, sizeof step);
    const vfi q = __builtin_convertvector(magnitude / step + 0.5f, vfi);  // 0 .. 16 steps
    const vfi normal = q == 16 ? (exponent + 8) << 3 : ((exponent + 7) << 3) | (q - 8);
    code = (q >= 8 ? normal : q) | (negative & 0x80);
    code = nan ? vfi{} + 0x7F : code;
  } else {
    const vfi q = __builtin_convertvector(magnitude + 0.5f, vfi);
    code = (positive & q) | (negative & -q);  // NaN lanes are neither: 0
  }
  for (int j = 0; j < kLanes; ++j) out[j] = static_cast<uint8_t>(code[j]);
}

// One row of D fp32 values: its codes into `codes`, its scale returned. A row's last values, short
// of a whole vector, are quantized as one padded with zeros (a zero changes no amax).
template <bool kE4m3>
c10::Half quantize_row(const float* x, int64_t D, uint8_t* codes) {
  const int64_t whole = D / kLanes * kLanes;
  float tail[kLanes] = {};
  std::memcpy(tail, x + whole, (D - whole) * sizeof(float));
  vf amax_lanes = vf{};
  vfi nan = vfi{};
  for (int64_t d = 0; d <= whole; d += kLanes) {
    const vf v = loadv(d < whole ? x + d : tail);
    nan |= v != v;
    amax_lanes = maxv(amax_lanes, v < 0.0f ? -v : v);
  }
  bool any_nan = false;
  for (int j = 0; j < kLanes; ++j) any_nan |= nan[j] != 0;
  const float s = any_nan ? std::numeric_limits<float>::quiet_NaN()
                          : std::min(std::max(hmax(amax_lanes) / code_limit<kE4m3>(), kMinScale), kMaxScale);
  const c10::Half scale(s);
  const float sf = static_cast<float>(scale);
  for (int64_t d = 0; d < whole; d += kLanes) quantize_lanes<kE4m3>(loadv(x + d), sf, codes + d);
  if (whole < D) {
    uint8_t tail_codes[kLanes];
    quantize_lanes<kE4m3>(loadv(tail), sf, tail_codes);
    std::memcpy(codes + whole, tail_codes, D - whole);
  }
  return scale;
}

// write_kv for a quantized cache (kind 1: int8, 2: e4m3 as bytes): each token's K and V rows
// ([tokens, kv_heads, head_dim], fp32/bf16/fp16, rows may be strided) quantized by
// quantize_row into their slots' codes and fp16 scales ([blocks, block_size, kv_heads],
// contiguous). Every slot is checked before anything is written.
void write_kv_quantized(const at::Tensor& key, const at::Tensor& value, at::Tensor k_cache, at::Tensor v_cache,
                        at::Tensor k_scale, at::Tensor v_scale, const at::Tensor& slot_mapping, int64_t kind) {
  TORCH_CHECK(kind == kInt8 || kind == kFp8, "kind must be 1 (int8) or 2 (e4m3)");
  TORCH_CHECK(key.dim() == 3 && key.sizes() == value.sizes() && key.stride(2) == 1 && value.stride(2) == 1 &&
              key.scalar_type() == value.scalar_type(),
              "key and value must be [tokens, kv_heads, head_dim] alike, unit stride on head_dim");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.is_contiguous() &&
              v_cache.is_contiguous() && k_cache.element_size() == 1 && v_cache.element_size() == 1,
              "caches must be contiguous one-byte [blocks, block_size, kv_heads, head_dim] alike");
  TORCH_CHECK(k_scale.scalar_type() == at::kHalf && v_scale.scalar_type() == at::kHalf && k_scale.is_contiguous() &&
              v_scale.is_contiguous() && k_scale.sizes() == k_cache.sizes().slice(0, 3) &&
              v_scale.sizes() == k_scale.sizes(), "scales must be contiguous fp16 [blocks, block_size, kv_heads]");
  TORCH_CHECK(key.size(1) == k_cache.size(2) && key.size(2) == k_cache.size(3), "rows and cache slots differ in shape");
  const int64_t tokens = key.size(0), heads = key.size(1), D = key.size(2);
  const int64_t* slot = checked_slots(slot_mapping, tokens, k_cache.size(0) * k_cache.size(1));
  uint8_t* kc = static_cast<uint8_t*>(k_cache.data_ptr());
  uint8_t* vc = static_cast<uint8_t*>(v_cache.data_ptr());
  c10::Half* ks = static_cast<c10::Half*>(k_scale.data_ptr());
  c10::Half* vs = static_cast<c10::Half*>(v_scale.data_ptr());
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const T* kr = static_cast<const T*>(key.data_ptr());
    const T* vr = static_cast<const T*>(value.data_ptr());
    at::parallel_for(0, tokens, 64, [&](int64_t begin, int64_t end) {
      std::vector<float> widened(std::is_same_v<T, float> ? 0 : D);
      // a row as fp32 values: in place for fp32, else widened (exactly, as torch's .float())
      auto as_float = [&](const T* row) -> const float* {
        if constexpr (std::is_same_v<T, float>) {
          return row;
        } else {
          for (int64_t d = 0; d < D; ++d) widened[d] = to_float(row[d]);
          return widened.data();
        }
      };
      for (int64_t t = begin; t < end; ++t)
        for (int64_t h = 0; h < heads; ++h) {
          const int64_t at_slot = slot[t] * heads + h;
          const T* krow = kr + t * key.stride(0) + h * key.stride(1);
          const T* vrow = vr + t * value.stride(0) + h * value.stride(1);
          if (kind == kFp8) {
            ks[at_slot] = quantize_row</*kE4m3=*/true>(as_float(krow), D, kc + at_slot * D);
            vs[at_slot] = quantize_row</*kE4m3=*/true>(as_float(vrow), D, vc + at_slot * D);
          } else {
            ks[at_slot] = quantize_row</*kE4m3=*/false>(as_float(krow), D, kc + at_slot * D);
            vs[at_slot] = quantize_row</*kE4m3=*/false>(as_float(vrow), D, vc + at_slot * D);
          }
        }
    });
  };
  const auto dtype = key.scalar_type();
  if (dtype == at::kFloat) run(float{});
  else if (dtype == at::kBFloat16) run(c10::BFloat16{});
  else if (dtype == at::kHalf) run(c10::Half{});
  else TORCH_CHECK(false, "unsupported row dtype ", dtype);
}

// How many threads a parallel region of this extension runs on: at::parallel_for is inlined
// here, so whether it is parallel depends on how this file was compiled (-fopenmp), not on torch.
int64_t parallel_width() {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  std::vector<std::atomic<int>> seen(threads);
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) { seen[at::get_thread_num() % threads] = 1; });
  int64_t width = 0;
  for (auto& s : seen) width += s.load();
  return width;
}

}  // namespace

TORCH_LIBRARY(quire_cpu, m) {
  m.def("paged_attention(Tensor query, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, "
        "Tensor query_start_loc, float scale, Tensor? k_scale, Tensor? v_scale, int kind) -> Tensor");
  m.def("write_kv(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()");
  m.def("write_kv_quantized(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!) k_scale, "
        "Tensor(d!) v_scale, Tensor slot_mapping, int kind) -> ()");
  m.def("parallel_width() -> int", &parallel_width);
}

TORCH_LIBRARY_IMPL(quire_cpu, CPU, m) {
  m.impl("paged_attention", &paged_attention);
  m.impl("write_kv", &write_kv);
  m.impl("write_kv_quantized", &write_kv_quantized);
}
