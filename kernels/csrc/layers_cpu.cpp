// The decoder layer's elementwise steps on the CPU, each one pass over its rows instead of a
// chain of torch operators (each a pass over memory plus dispatch): RMSNorm with the fused
// residual add, SiLU-and-mul, and the rotary embedding in place. Registered beside the
// paged-attention kernel as torch.ops.quire_cpu.*; kernels/cpu_layers.py owns the contract.
//
// Arithmetic follows Hugging Face's modules step for step (fp32 math, the same roundings to
// the activation dtype at the same points); only summation order and the exp approximation
// differ, so results agree to a few ulps, not bit for bit.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "simd.h"

namespace {
using namespace quire_cpu;

constexpr int64_t kGrain = 16;  // rows per parallel task: a row is ~1-16k elements

// Rounds through the activation dtype where HF's module would hold a value in it.
template <typename T> inline float round_to(float x) { return static_cast<float>(static_cast<T>(x)); }
template <> inline float round_to<float>(float x) { return x; }

// Runs `run(T{})` for the activation dtypes the kernels take (fp32, bf16, fp16).
template <typename F>
void dispatch_activation(at::ScalarType dtype, const char* op, F&& run) {
  switch (dtype) {
    case at::kFloat: run(float{}); break;
    case at::kBFloat16: run(c10::BFloat16{}); break;
    case at::kHalf: run(c10::Half{}); break;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", dtype);
  }
}

template <typename T>
void rms_norm_rows(T* x, const T* residual, const T* weight, T* out, int64_t rows, int64_t H, int64_t x_st,
                   int64_t r_st, int64_t o_st, float eps) {
  at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* xr = x + r * x_st;
      if (residual) {  // x + residual, written back into x (the new residual stream)
        const T* rr = residual + r * r_st;
        for (int64_t i = 0; i < H; ++i) xr[i] = static_cast<T>(static_cast<float>(xr[i]) + static_cast<float>(rr[i]));
      }
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < H; ++i) {
        const float v = static_cast<float>(xr[i]);
        sum += v * v;
      }
      const float inv = 1.0f / std::sqrt(sum / static_cast<float>(H) + eps);
      T* orow = out + r * o_st;
#pragma omp simd
      for (int64_t i = 0; i < H; ++i)
        orow[i] = static_cast<T>(round_to<T>(static_cast<float>(xr[i]) * inv) * static_cast<float>(weight[i]));
    }
  });
}

// x [T, H] (rows may be strided, each contiguous); residual [T, H] or none; weight [H].
at::Tensor rms_norm(at::Tensor x, const c10::optional<at::Tensor>& residual, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && weight.is_contiguous() && weight.size(0) == x.size(1),
              "rms_norm: x [tokens, hidden] with contiguous rows and a [hidden] weight");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "rms_norm: weight and x dtypes differ");
  if (residual) TORCH_CHECK(residual->sizes() == x.sizes() && residual->stride(1) == 1 &&
                            residual->scalar_type() == x.scalar_type(), "rms_norm: residual must match x");
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t rows = x.size(0), H = x.size(1);
  const int64_t r_st = residual ? residual->stride(0) : 0;
  auto run = [&](auto tag) {
    using T = decltype(tag);
    rms_norm_rows<T>(x.data_ptr<T>(), residual ? residual->data_ptr<T>() : nullptr, weight.data_ptr<T>(),
                     out.data_ptr<T>(), rows, H, x.stride(0), r_st, out.stride(0), static_cast<float>(eps));
  };
  dispatch_activation(x.scalar_type(), "rms_norm", run);
  return out;
}

// silu(x) = x / (1 + exp(-x)), eight lanes; exp's argument clamped where exp8 is defined
// (-x > 88 only arises for x < -88, whose silu is below 1e-36 either way).
inline v8 silu8(v8 x) {
  v8 e = 0.0f - x;
  e = e > 88.0f ? splat8(88.0f) : e;
  return x / (1.0f + exp8(e));
}

template <typename T>
void silu_and_mul_rows(const T* in, T* out, int64_t rows, int64_t I, int64_t in_st, int64_t out_st) {
  at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* g = in + r * in_st;
      const T* u = g + I;
      T* o = out + r * out_st;
      int64_t i = 0;
      if constexpr (std::is_same_v<T, float>) {
        for (; i + 8 <= I; i += 8) store8(o + i, silu8(load8(g + i)) * load8(u + i));
      } else {
        float gate[8], up[8], res[8];
        for (; i + 8 <= I; i += 8) {
          for (int j = 0; j < 8; ++j) {
            gate[j] = static_cast<float>(g[i + j]);
            up[j] = static_cast<float>(u[i + j]);
          }
          store8(res, silu8(load8(gate)));
          for (int j = 0; j < 8; ++j) o[i + j] = static_cast<T>(round_to<T>(res[j]) * up[j]);
        }
      }
      for (; i < I; ++i) {  // the tail, scalar
        const float x = static_cast<float>(g[i]);
        o[i] = static_cast<T>(round_to<T>(x / (1.0f + std::exp(-x))) * static_cast<float>(u[i]));
      }
    }
  });
}

// gate_up [T, 2I] (gate then up) -> silu(gate) * up, [T, I].
at::Tensor silu_and_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.stride(1) == 1 && gate_up.size(1) % 2 == 0,
              "silu_and_mul: gate_up [tokens, 2 * intermediate] with contiguous rows");
  const int64_t rows = gate_up.size(0), I = gate_up.size(1) / 2;
  at::Tensor out = at::empty({rows, I}, gate_up.options());
  auto run = [&](auto tag) {
    using T = decltype(tag);
    silu_and_mul_rows<T>(gate_up.data_ptr<T>(), out.data_ptr<T>(), rows, I, gate_up.stride(0), out.stride(0));
  };
  dispatch_activation(gate_up.scalar_type(), "silu_and_mul", run);
  return out;
}

// qk [T, n * D] in place (rows may be strided): each head x -> x * cos + swap_halves(x) * sin,
// with cos/sin [T, D] in qk's dtype as RotaryEmbedding gives them (sin signed for the first half).
template <typename T>
void rotate_rows(T* qk, const T* cos, const T* sin, int64_t rows, int64_t heads, int64_t D, int64_t st,
                 int64_t cs_st) {
  const int64_t half = D / 2;
  at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* c = cos + r * cs_st;
      const T* s = sin + r * cs_st;
      for (int64_t h = 0; h < heads; ++h) {
        T* x = qk + r * st + h * D;
        int64_t i = 0;
        if constexpr (std::is_same_v<T, float>) {
          for (; i + 8 <= half; i += 8) {
            const v8 x1 = load8(x + i), x2 = load8(x + i + half);
            store8(x + i, x1 * load8(c + i) + x2 * load8(s + i));
            store8(x + i + half, x2 * load8(c + i + half) + x1 * load8(s + i + half));
          }
        }
        for (; i < half; ++i) {
          const float x1 = static_cast<float>(x[i]), x2 = static_cast<float>(x[i + half]);
          const float c1 = static_cast<float>(c[i]), c2 = static_cast<float>(c[i + half]);
          const float s1 = static_cast<float>(s[i]), s2 = static_cast<float>(s[i + half]);
          x[i] = static_cast<T>(round_to<T>(x1 * c1) + round_to<T>(x2 * s1));
          x[i + half] = static_cast<T>(round_to<T>(x2 * c2) + round_to<T>(x1 * s2));
        }
      }
    }
  });
}

void rotate_qk(at::Tensor qk, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(qk.dim() == 2 && qk.stride(1) == 1, "rotate_qk: qk [tokens, heads * head_dim], contiguous rows");
  TORCH_CHECK(cos.scalar_type() == qk.scalar_type() && sin.scalar_type() == qk.scalar_type() && cos.dim() == 2 &&
              cos.sizes() == sin.sizes() && cos.strides() == sin.strides() && cos.stride(1) == 1 &&
              cos.size(0) == qk.size(0), "rotate_qk: cos/sin [tokens, head_dim] alike, in qk's dtype");
  const int64_t D = cos.size(1);
  TORCH_CHECK(D % 2 == 0 && qk.size(1) % D == 0, "rotate_qk: head_dim must be even and divide qk's width");
  auto run = [&](auto tag) {
    using T = decltype(tag);
    rotate_rows<T>(qk.data_ptr<T>(), cos.data_ptr<T>(), sin.data_ptr<T>(), qk.size(0), qk.size(1) / D, D,
                   qk.stride(0), cos.stride(0));
  };
  dispatch_activation(qk.scalar_type(), "rotate_qk", run);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(quire_cpu, m) {
  m.def("rms_norm(Tensor(a!) x, Tensor? residual, Tensor weight, float eps) -> Tensor");
  m.def("silu_and_mul(Tensor gate_up) -> Tensor");
  m.def("rotate_qk(Tensor(a!) qk, Tensor cos, Tensor sin) -> ()");
}

TORCH_LIBRARY_IMPL(quire_cpu, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("rotate_qk", &rotate_qk);
}
