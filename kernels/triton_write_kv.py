"""Triton kernels that write a step's K/V into their cache slots: a plain copy (cast to the
cache dtype) and, for quantized caches (`kv_quant`), quantization in the kernel.

Layouts are those of `attention_ref`: K/V `[num_tokens, num_kv_heads, head_dim]` (each
token's row contiguous), caches `[num_blocks, block_size, num_kv_heads, head_dim]` and
scales `[num_blocks, block_size, num_kv_heads]`, both contiguous; slot `s` is
`block * block_size + offset`.

The quantized writer follows `kv_quant.quantize` operation for operation, in fp32 with
correctly rounded divisions, so its codes and scales are bit-identical to the torch
backend's. e4m3 codes are assembled from bits and stored as bytes (the cache is passed as
a uint8 view): GPUs before sm89 have no e4m3 conversions in Triton, and its interpreter
mis-rounds some direct fp32 → fp8 casts.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from quire.kernels import kv_quant
from quire.kernels.triton_variants import write_kv_variant

__all__ = ["WRITE_KV_DYNAMIC", "write_kv"]

# Token strides are the model's (a view of a fused projection): Triton must not specialise them.
WRITE_KV_DYNAMIC = ("key_stride", "value_stride")
_MIN_SCALE = tl.constexpr(kv_quant.MIN_SCALE)
_MAX_SCALE = tl.constexpr(kv_quant.MAX_SCALE)
_INT8_MAX = tl.constexpr(kv_quant.INT8_MAX)
_FP8_MAX = tl.constexpr(kv_quant.FP8_MAX)
_FP8_MIN_EXPONENT = tl.constexpr(kv_quant.FP8_MIN_EXPONENT)
_FP8_MANTISSA_BITS = tl.constexpr(kv_quant.FP8_MANTISSA_BITS)


@triton.jit(do_not_specialize=WRITE_KV_DYNAMIC)
def _write_kv_kernel(key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, key_stride, value_stride,
                     ROW: tl.constexpr, ROW_PAD: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    offs = tl.arange(0, ROW_PAD)
    mask = offs < ROW
    key = tl.load(key_ptr + token.to(tl.int64) * key_stride + offs, mask=mask)
    value = tl.load(value_ptr + token.to(tl.int64) * value_stride + offs, mask=mask)
    tl.store(k_cache_ptr + slot * ROW + offs, key.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + slot * ROW + offs, value.to(v_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _quantize_store(src, dst, scale_dst, mask, head_valid, FP8: tl.constexpr):
    """Quantize the `[heads, head_dim]` rows at `src` as `kv_quant.quantize` does; store the
    codes at `dst` (int8, or e4m3 bits as uint8) and the fp16 scales at `scale_dst`."""
    if FP8:
        limit = _FP8_MAX
    else:
        limit = _INT8_MAX
    x = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), 1)
    # div_rn: correctly rounded as torch's division (a GPU's default fp32 division may not be).
    scale = tl.minimum(tl.maximum(tl.math.div_rn(amax, limit), _MIN_SCALE), _MAX_SCALE).to(tl.float16)
    tl.store(scale_dst, scale, mask=head_valid)
    y = tl.math.div_rn(x, scale.to(tl.float32)[:, None])
    y = tl.minimum(tl.maximum(y, -limit), limit)
    magnitude = tl.abs(y)
    if FP8:
        # kv_quant.round_to_fp8_grid: the step is 2^(exponent - 3), the exponent from the fp32 bits.
        exponent = ((magnitude.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        exponent = tl.maximum(exponent, _FP8_MIN_EXPONENT)
        step = ((exponent - _FP8_MANTISSA_BITS + 127) << 23).to(tl.float32, bitcast=True)
        rounded = tl.floor(tl.math.div_rn(magnitude, step) + 0.5) * step  # exactly an e4m3 magnitude
        bits = rounded.to(tl.int32, bitcast=True)
        normal = ((((bits >> 23) & 0xFF) - 127 + 7) << 3) | ((bits >> 20) & 7)  # e4m3 bias 7
        subnormal = (rounded * 512.0).to(tl.int32)  # below 2^-6: multiples of 2^-9
        code = tl.where(rounded >= 0.015625, normal, subnormal)
        # torch's `rounded * sign(y)` is -0.0 for a negative y rounded to zero: the sign bit follows y.
        code = code | tl.where(y < 0.0, 0x80, 0)
        tl.store(dst, code.to(tl.uint8), mask=mask)
    else:
        sign = tl.where(y > 0.0, 1.0, tl.where(y < 0.0, -1.0, 0.0))
        tl.store(dst, (tl.floor(magnitude + 0.5) * sign).to(tl.int8), mask=mask)


@triton.jit(do_not_specialize=WRITE_KV_DYNAMIC)
def _write_kv_quant_kernel(key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, slot_ptr,
                           key_stride, value_stride, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                           HEADS_PAD: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, FP8: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    h = tl.arange(0, HEADS_PAD)
    d = tl.arange(0, HEAD_DIM_PAD)
    head_valid = h < HEADS
    mask = head_valid[:, None] & (d < HEAD_DIM)[None, :]
    offs = h[:, None] * HEAD_DIM + d[None, :]
    cache_row = slot * (HEADS * HEAD_DIM) + offs
    _quantize_store(key_ptr + token * key_stride + offs, k_cache_ptr + cache_row, k_scale_ptr + slot * HEADS + h,
                    mask, head_valid, FP8)
    _quantize_store(value_ptr + token * value_stride + offs, v_cache_ptr + cache_row,
                    v_scale_ptr + slot * HEADS + h, mask, head_valid, FP8)


def check_scales(k_cache: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> None:
    """ValueError unless `k_scale`/`v_scale` are the contiguous float16 `[num_blocks, block_size,
    num_kv_heads]` scales a quantized cache shaped like `k_cache` needs."""
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if scale is None:
            raise ValueError(f"a {k_cache.dtype} KV cache needs `k_scale` and `v_scale` (`{name}` is None)")
        if scale.shape != k_cache.shape[:3] or scale.dtype != kv_quant.SCALE_DTYPE or not scale.is_contiguous():
            raise ValueError(f"`{name}` must be a contiguous {kv_quant.SCALE_DTYPE} tensor of shape "
                             f"{tuple(k_cache.shape[:3])} (got {scale.dtype} {tuple(scale.shape)})")


def codes_view(cache: torch.Tensor) -> torch.Tensor:
    """What the kernels address a quantized cache as: int8 as is, e4m3 as its bytes (see above)."""
    return cache.view(torch.uint8) if cache.dtype == torch.float8_e4m3fn else cache


def write_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
             v_scale: torch.Tensor | None = None) -> None:
    """Write `key`/`value` `[num_tokens, num_kv_heads, head_dim]` into their slots (in place), cast
    to the cache dtype, or, for a quantized cache, as codes with their scales in `k_scale`/`v_scale`
    (`AttentionBackend.write_kv`)."""
    quantized = kv_quant.is_quantized(k_cache.dtype)
    if quantized:
        check_scales(k_cache, k_scale, v_scale)
    num_tokens = key.shape[0]
    if num_tokens == 0:
        return
    key = key if key[0].is_contiguous() else key.contiguous()
    value = value if value[0].is_contiguous() else value.contiguous()
    variant = write_kv_variant(k_cache.shape[2], k_cache.shape[3], key.dtype, k_cache.dtype)
    if quantized:
        _write_kv_quant_kernel[(num_tokens,)](key, value, codes_view(k_cache), codes_view(v_cache), k_scale, v_scale,
                                              slot_mapping, key.stride(0), value.stride(0), **variant.launch_kwargs())
    else:
        _write_kv_kernel[(num_tokens,)](key, value, k_cache, v_cache, slot_mapping, key.stride(0), value.stride(0),
                                        **variant.launch_kwargs())
