"""Paged attention on the CPU that reads K/V in place through the block table: a C++ kernel
(csrc/paged_attention_cpu.cpp with csrc/simd.h, registered as
`torch.ops.quire_cpu.paged_attention`) built with torch's extension tooling on first use and
cached, so later processes only load it (its design is in the .cpp's opening comment).

Why: the torch reference (`attention_ref`) gathers every request's K/V out of the paged pool
(index_select, transpose, contiguous copy) in every layer of every step; this kernel reads
each K/V row where it lies, once per group of query heads sharing its KV head, with an
online softmax in fp32, OpenMP-style parallel over (request, KV head, query tile, context
chunk) work items on torch's intra-op threads (`torch.get_num_threads()`).

Build and cache: `cpu_extension.load_extension()` (re-exported here), which builds this kernel
with the layer kernels of `cpu_layers` into one extension; a failed build raises
`ExtensionUnavailable` and `select_backend` falls back to the torch reference with one warning.

Contract: `attention_ref`'s, through `AttentionBackend` (kernels/backend.py). Queries fp32,
bf16 or fp16 (computed in fp32, returned in the query's dtype); caches fp32/bf16/fp16 values,
or int8 / float8_e4m3fn codes with fp16 scales `[num_blocks, block_size, num_kv_heads]`
(dequantized as code * scale in fp32); any block size and head dim; block tables int32/int64.
K/V writes: `torch.ops.quire_cpu.write_kv` (a slot copy) and `write_kv_quantized` (quantization
into the slots, `kv_quant`'s rule bit for bit), the reference's where neither applies.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from quire.kernels import kv_quant
from quire.kernels.attention_ref import TorchAttentionBackend, require_scales
from quire.kernels.backend import AttentionPlan, WarmUpResult
from quire.kernels.cpu_extension import ExtensionUnavailable, extension_name, is_loaded, load_extension, load_seconds

__all__ = ["CpuAttentionPlan", "CpuPagedAttentionBackend", "ExtensionUnavailable", "extension_name",
           "load_extension", "paged_attention_cpu"]

_KIND = {torch.int8: 1, torch.float8_e4m3fn: 2}  # the kernel's cache kinds; 0: values
_QUANTIZABLE = (torch.float32, torch.bfloat16, torch.float16)  # row dtypes write_kv_quantized reads


@dataclass(frozen=True)
class CpuAttentionPlan:
    """The step's tensors in the kernel's types, built once per step and shared by every layer:
    `block_tables` int64 contiguous, `seq_lens` `[num_reqs]` and `query_start_loc`
    `[num_reqs + 1]` int32 (host tensors)."""

    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor


def paged_attention_cpu(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: CpuAttentionPlan,
                        scale: float, k_scale: torch.Tensor | None = None,
                        v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """`attention_ref.paged_attention_ref`'s result, computed in place over the paged caches.
    Reads query `[T, H, D]`, the caches (and a quantized cache's required scales); writes only
    the returned `[T, H, D]` tensor, in the query's dtype. The extension must be loaded."""
    kind = _KIND.get(k_cache.dtype, 0)
    if kind:
        require_scales(k_cache, k_scale, v_scale)
        # e4m3 is read as its bytes (the kernel decodes them through a table); int8 as is.
        if kind == 2:
            k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    else:
        k_scale = v_scale = None
    q = query if query.dtype == torch.float32 else query.float()
    if q.stride(-1) != 1:
        q = q.contiguous()
    out = torch.ops.quire_cpu.paged_attention(q, k_cache, v_cache, plan.block_tables, plan.seq_lens,
                                              plan.query_start_loc, float(scale), k_scale, v_scale, kind)
    return out if query.dtype == torch.float32 else out.to(query.dtype)


class CpuPagedAttentionBackend(TorchAttentionBackend):
    """The C++ in-place kernel above as an `AttentionBackend` (CPU caches only); K/V writes go
    through the C++ slot copy (the torch reference's for quantized caches). Constructing
    one does not build the kernel: `select_backend` loads it first, `warm_up` (or the first
    `attend`) otherwise."""

    name = "cpu"

    def plan(self, block_tables: torch.Tensor, seq_lens: list[int], query_start_loc: list[int], *,
             block_size: int, num_heads: int, num_kv_heads: int) -> AttentionPlan:
        kernel_plan = CpuAttentionPlan(block_tables.to(torch.int64).contiguous(),
                                       torch.tensor(seq_lens, dtype=torch.int32),
                                       torch.tensor(query_start_loc, dtype=torch.int32))
        return AttentionPlan(block_tables, seq_lens, query_start_loc, kernel_plan)

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                 v_scale: torch.Tensor | None = None) -> None:
        """`write_kv_ref`'s contract. In C++, one pass with no index_copy_ dispatch per layer: rows
        already in the cache's dtype go straight into their slots; rows for a quantized cache
        are quantized there by `kv_quant.quantize`'s rule, bit for bit. Converting writes, and
        caches or scales not laid out contiguously, take the reference."""
        kind = _KIND.get(k_cache.dtype, 0)
        if (is_loaded() and key.stride(-1) == 1 and value.stride(-1) == 1 and key.dtype == value.dtype
                and k_cache.is_contiguous() and v_cache.is_contiguous()):
            if not kind and key.dtype == k_cache.dtype and value.dtype == v_cache.dtype:
                torch.ops.quire_cpu.write_kv(key, value, k_cache, v_cache, slot_mapping.to(torch.int64).contiguous())
                return
            if kind and key.dtype in _QUANTIZABLE and all(
                    t is not None and t.dtype == kv_quant.SCALE_DTYPE and t.is_contiguous() for t in (k_scale, v_scale)):
                torch.ops.quire_cpu.write_kv_quantized(key, value, k_cache.view(torch.uint8), v_cache.view(torch.uint8),
                                                       k_scale, v_scale, slot_mapping.to(torch.int64).contiguous(), kind)
                return
        super().write_kv(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)

    def attend(self, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: AttentionPlan,
               scale: float, k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
        if not is_loaded():
            load_extension()
        return paged_attention_cpu(query, k_cache, v_cache, plan.kernel_plan, scale, k_scale, v_scale)

    def warm_up(self, *, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
                device: torch.device | str, kv_cache_dtype: torch.dtype | None = None) -> WarmUpResult:
        """Builds or loads the kernel (the seconds include a build this process paid for, even one
        paid earlier in `select_backend`) and runs it once on a one-block batch of these shapes."""
        load_extension()
        began = time.perf_counter()
        cache_dtype = kv_cache_dtype or dtype
        shape = (1, block_size, num_kv_heads, head_dim)
        k_cache = torch.zeros(shape, dtype=torch.uint8).view(cache_dtype) if kv_quant.is_quantized(cache_dtype) \
            else torch.zeros(shape, dtype=cache_dtype)
        scales = [torch.ones(shape[:3], dtype=kv_quant.SCALE_DTYPE) for _ in "kv"] \
            if kv_quant.is_quantized(cache_dtype) else [None, None]
        plan = self.plan(torch.zeros(1, 1, dtype=torch.int32), [1], [0, 1], block_size=block_size,
                         num_heads=num_heads, num_kv_heads=num_kv_heads)
        self.attend(torch.zeros(1, num_heads, head_dim, dtype=dtype), k_cache, k_cache, plan, head_dim ** -0.5,
                    *scales)
        return WarmUpResult(variants=1, seconds=time.perf_counter() - began + load_seconds())
