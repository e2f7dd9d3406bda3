"""Triton paged attention over a ragged batch in one launch (prefill chunks and decodes
together), with a split-K (flash-decoding) path and its reduction kernel; the slot
writes are in triton_write_kv.py.

Layouts are those of `attention_ref` (the torch reference these kernels are tested
against): caches `[num_blocks, block_size, num_kv_heads, head_dim]`, queries
`[num_tokens, num_heads, head_dim]`.

Work split. The queries of a step are cut into tiles: a tile is up to `BLOCK_Q`
consecutive query tokens of one request. A program handles one (tile, KV head,
split): its `BLOCK_M = BLOCK_Q * group` rows are the tile's tokens times the query
heads that share that KV head, so each K/V element is loaded once for the whole
group (GQA/MQA). It walks the request's context `BLOCK_N` positions at a time,
looking up the physical blocks in the block table (any block size works; powers of
two take a faster path), with an online softmax accumulated in fp32 (in base 2);
causality also bounds the walk.

Split-K. With few programs (few requests, few KV heads) and long contexts a GPU sits
mostly idle, so the context is cut into `num_splits` chunks processed by separate
programs that write partial (max, sum, accumulator) triples; `_reduce_kernel`
combines them. The rule (`choose_num_splits`, triton_variants.py): split only when the
step launches fewer programs than the device can run at once (`2 * SMs`), into as many
chunks as fill it rounded down to a power of two, at most 16, and never into chunks
shorter than 256 positions.

Quantized caches (`kv_quant`: int8 or e4m3 codes, an fp16 scale per token and KV head).
The kernel loads codes, converts them to the query dtype (exact: |int8| <= 127 and e4m3
values fit fp16/bf16) and applies the scales where they cost least: K's scale multiplies
the score columns, V's the columns of p before the p.V product (the softmax sum takes p
unscaled). e4m3 codes are read as bytes and widened through fp16 bits (`_e4m3_to_f16`),
which works on every GPU generation. `QUANT` is a constexpr: a cache of values compiles
the same kernel as before and reads no scales.

Compiled variants. Which constexprs and launch options a launch uses, and which
integer arguments Triton must not specialise, are set in triton_variants.py, so a
worker compiles a handful of variants, all at startup (`TritonAttentionBackend.warm_up`).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from quire.kernels import kv_quant
from quire.kernels.backend import AttentionBackend, AttentionPlan, WarmUpResult
from quire.kernels.triton_variants import (MAX_SPLITS, SPLIT_LADDER, attention_variant, choose_num_splits,
                                           device_capability, reduce_variant, split_length,
                                           tile_rows, write_kv_variant)
from quire.kernels.triton_write_kv import WRITE_KV_DYNAMIC, check_scales, codes_view, write_kv

__all__ = ["WRITE_KV_DYNAMIC", "TritonAttentionBackend", "TritonAttentionPlan", "choose_num_splits",
           "paged_attention", "write_kv"]

LOG2E = 1.4426950408889634
# Arguments that vary from step to step: Triton must not specialise them (== 1, divisible
# by 16), or every new value class compiles anew.
ATTENTION_DYNAMIC = ("q_stride_t", "out_stride_t", "table_stride", "num_tokens", "split_len")
REDUCE_DYNAMIC = ("out_stride_t", "num_tokens", "num_splits")


@triton.jit
def _e4m3_to_f16(code):
    """e4m3 codes (as uint8) to fp16, exactly: placing e4m3's 7 exponent and mantissa bits
    under fp16's sign makes a value 2^-8 times the code's (normal and subnormal alike)."""
    bits = ((code.to(tl.uint16) & 0x80) << 8) | ((code.to(tl.uint16) & 0x7F) << 7)
    return bits.to(tl.float16, bitcast=True) * 256.0


@triton.jit(do_not_specialize=ATTENTION_DYNAMIC)
def _paged_attention_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, seq_lens_ptr, query_start_ptr,
        tile_req_ptr, tile_first_ptr, m_part_ptr, l_part_ptr, acc_part_ptr, k_scale_ptr, v_scale_ptr,
        qk_scale, q_stride_t, q_stride_h, out_stride_t, out_stride_h,
        k_stride_block, k_stride_pos, k_stride_head, table_stride, num_tokens, split_len,
        NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
        PAGING: tl.constexpr, SPLIT: tl.constexpr, IEEE_DOT: tl.constexpr, UPCAST: tl.constexpr,
        QUANT: tl.constexpr):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    req = tl.load(tile_req_ptr + tile)
    first = tl.load(tile_first_ptr + tile)  # index of the tile's first query within its request
    q_begin = tl.load(query_start_ptr + req)
    q_len = tl.load(query_start_ptr + req + 1) - q_begin
    seq_len = tl.load(seq_lens_ptr + req)
    ctx_before = seq_len - q_len

    rows = tl.arange(0, BLOCK_M)
    tok = first + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_valid = (rows < BLOCK_Q * GROUP) & (tok < q_len)
    q_pos = ctx_before + tok
    d = tl.arange(0, HEAD_DIM_PAD)
    d_valid = d < HEAD_DIM
    q_rows = (q_begin + tok).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * q_stride_t + head[:, None] * q_stride_h + d[None, :],
                mask=row_valid[:, None] & d_valid[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    # The tile's last query sees positions up to its own; nothing later is read.
    ctx_end = ctx_before + tl.minimum(first + BLOCK_Q, q_len)
    start = split * split_len
    end = tl.minimum(start + split_len, ctx_end)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    # Loop invariants, computed once: the block-table row, this KV head's K/V pointers over
    # the head dim, and the per-position offsets of a tile within its cache blocks.
    table_row = block_tables_ptr + req.to(tl.int64) * table_stride
    k_head = k_cache_ptr + kv_head * k_stride_head + d[None, :]
    v_head = v_cache_ptr + kv_head * k_stride_head + d[None, :]
    offs_n = tl.arange(0, BLOCK_N)
    if PAGING == 1:  # a tile lies inside one cache block: one table entry per iteration
        pos_offs = offs_n * k_stride_pos
    else:            # a tile spans whole blocks (2) or any block size (0)
        tile_blocks = offs_n // BLOCK_SIZE
        pos_offs = (offs_n % BLOCK_SIZE) * k_stride_pos
    for block_start in range(start, end, BLOCK_N):
        k_pos = block_start + offs_n
        k_valid = k_pos < end
        if PAGING == 1:
            block = tl.load(table_row + block_start // BLOCK_SIZE).to(tl.int64)
            base = block * k_stride_block + (block_start % BLOCK_SIZE) * k_stride_pos + pos_offs
        elif PAGING == 2:
            block = tl.load(table_row + block_start // BLOCK_SIZE + tile_blocks, mask=k_valid, other=0).to(tl.int64)
            base = block * k_stride_block + pos_offs
        else:
            block = tl.load(table_row + k_pos // BLOCK_SIZE, mask=k_valid, other=0).to(tl.int64)
            base = block * k_stride_block + (k_pos % BLOCK_SIZE) * k_stride_pos
        kv_mask = k_valid[:, None] & d_valid[None, :]
        k = tl.load(k_head + base[:, None], mask=kv_mask, other=0.0)
        v = tl.load(v_head + base[:, None], mask=kv_mask, other=0.0)
        if QUANT:
            if PAGING == 1:
                in_block = block_start % BLOCK_SIZE + offs_n
            elif PAGING == 2:
                in_block = offs_n % BLOCK_SIZE
            else:
                in_block = k_pos % BLOCK_SIZE
            # Scales are contiguous [num_blocks, block_size, num_kv_heads]: indexed by flat slot.
            scale_offs = (block * BLOCK_SIZE + in_block) * (NUM_HEADS // GROUP) + kv_head
            k_scale = tl.load(k_scale_ptr + scale_offs, mask=k_valid, other=0.0).to(tl.float32)
            v_scale = tl.load(v_scale_ptr + scale_offs, mask=k_valid, other=0.0).to(tl.float32)
            if QUANT == 2:
                k = _e4m3_to_f16(k)
                v = _e4m3_to_f16(v)
            k = k.to(q.dtype)
            v = v.to(q.dtype)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if IEEE_DOT:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        if QUANT:
            s = s * k_scale[None, :]  # the dot took K's codes: each column gets its token's scale
        s = s * qk_scale  # scale * log2(e): the softmax runs in base 2
        visible = (k_pos[None, :] <= q_pos[:, None]) & k_valid[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows that have seen nothing yet keep m = -inf; shift them by 0 to avoid inf - inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if QUANT:
            p = p * v_scale[None, :]  # V's codes follow: fold each token's scale into its column of p
        if IEEE_DOT:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    out_mask = row_valid[:, None] & d_valid[None, :]
    if SPLIT:
        part = (split * num_tokens + q_rows) * NUM_HEADS + head
        tl.store(m_part_ptr + part, m_i, mask=row_valid)
        tl.store(l_part_ptr + part, l_i, mask=row_valid)
        tl.store(acc_part_ptr + part[:, None] * HEAD_DIM_PAD + d[None, :], acc, mask=out_mask)
    else:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + q_rows[:, None] * out_stride_t + head[:, None] * out_stride_h + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit(do_not_specialize=REDUCE_DYNAMIC)
def _reduce_kernel(out_ptr, m_part_ptr, l_part_ptr, acc_part_ptr, out_stride_t, out_stride_h, num_tokens, num_splits,
                   NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                   SPLITS_PAD: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_PAD)
    split_valid = splits < num_splits
    part = (splits * num_tokens + token) * NUM_HEADS + head
    m = tl.load(m_part_ptr + part, mask=split_valid, other=float("-inf"))
    l = tl.load(l_part_ptr + part, mask=split_valid, other=0.0)
    m_max = tl.max(m, 0)
    weight = tl.where(m == float("-inf"), 0.0, tl.exp2(m - m_max))  # maxima are in base 2 (see above)
    d = tl.arange(0, HEAD_DIM_PAD)
    acc = tl.load(acc_part_ptr + part[:, None] * HEAD_DIM_PAD + d[None, :], mask=split_valid[:, None], other=0.0)
    total = tl.sum(weight * l, 0)
    out = tl.sum(weight[:, None] * acc, 0) / total
    tl.store(out_ptr + token * out_stride_t + head * out_stride_h + d, out.to(out_ptr.dtype.element_ty),
             mask=d < HEAD_DIM)


@dataclass
class TritonAttentionPlan:
    """The layer-independent launch description of one step (valid for that step): per-request
    lengths and query starts, the tiles (request, first query) as int32 device tensors, the tile
    shape, and the split-K factor with its chunk length."""

    seq_lens: torch.Tensor
    query_start: torch.Tensor
    tile_req: torch.Tensor
    tile_first: torch.Tensor
    block_m: int
    block_q: int
    num_splits: int
    split_len: int

    @classmethod
    def build(cls, seq_lens: list[int], query_start_loc: list[int], group: int, num_kv_heads: int,
              device: torch.device, num_splits: int | None = None) -> TritonAttentionPlan:
        """The plan for `seq_lens`/`query_start_loc` (as `AttentionPlan`). `num_splits` None applies
        the split-K rule; an explicit count (1..MAX_SPLITS, for tests and benchmarks) overrides it."""
        query_lens = [query_start_loc[i + 1] - query_start_loc[i] for i in range(len(seq_lens))]
        block_m, block_q = tile_rows(group, decode_only=max(query_lens) == 1)
        tile_req, tile_first = [], []
        for req, q_len in enumerate(query_lens):
            for first in range(0, q_len, block_q):
                tile_req.append(req)
                tile_first.append(first)
        max_seq = max(seq_lens)
        if num_splits is None:
            num_splits = choose_num_splits(len(tile_req) * num_kv_heads, max_seq, torch.device(device))
        if not 1 <= num_splits <= MAX_SPLITS:
            raise ValueError(f"num_splits must be in 1..{MAX_SPLITS}, got {num_splits}")
        as_tensor = lambda values: torch.tensor(values, dtype=torch.int32, device=device)  # noqa: E731
        return cls(as_tensor(seq_lens), as_tensor(query_start_loc), as_tensor(tile_req), as_tensor(tile_first),
                   block_m, block_q, num_splits, split_length(max_seq, num_splits))

    @classmethod
    def build_static_decode(cls, seq_lens: torch.Tensor, group: int, num_kv_heads: int, max_seq_len: int,
                            num_splits: int | None = None) -> TritonAttentionPlan:
        """A graph-safe plan for `seq_lens.numel()` single-token decodes whose lengths (`seq_lens`,
        an int32 device tensor the caller rewrites between launches, each in `1..max_seq_len`)
        are read by the kernels only. One tile per request (first query 0); the split-K factor
        and chunk length are fixed from `max_seq_len`, not from the batch's lengths: a split
        that starts past a request's context runs no iteration and stores (m=-inf, l=0, acc=0),
        which `_reduce_kernel` weighs 0 (split 0 always holds position 0, so the total is never 0).
        `num_splits` None applies the split-K rule to (num_reqs, max_seq_len)."""
        num_reqs, device = seq_lens.numel(), seq_lens.device
        block_m, block_q = tile_rows(group, decode_only=True)
        if num_splits is None:
            num_splits = choose_num_splits(num_reqs * num_kv_heads, max_seq_len, device)
        if not 1 <= num_splits <= MAX_SPLITS:
            raise ValueError(f"num_splits must be in 1..{MAX_SPLITS}, got {num_splits}")
        query_start = torch.arange(num_reqs + 1, dtype=torch.int32, device=device)
        return cls(seq_lens, query_start, query_start[:-1], torch.zeros(num_reqs, dtype=torch.int32, device=device),
                   block_m, block_q, num_splits, split_length(max_seq_len, num_splits))


def launch_variants(query: torch.Tensor, k_cache: torch.Tensor, plan: TritonAttentionPlan) -> tuple:
    """The (attention, reduction or None) variants `paged_attention` launches for this plan."""
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    split = plan.num_splits > 1
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    attention = attention_variant(num_heads, num_kv_heads, head_dim, block_size, query.dtype, plan.block_m, split,
                                  device_capability(query.device), interpret, k_cache.dtype)
    return attention, (reduce_variant(num_heads, head_dim, query.dtype) if split else None)


def paged_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    plan: TritonAttentionPlan, scale: float, k_scale: torch.Tensor | None = None,
                    v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as `attention_ref.paged_attention_ref`, from a step's TritonAttentionPlan; a
    quantized cache needs its contiguous float16 scales `k_scale`/`v_scale` (ValueError otherwise)."""
    num_tokens, num_heads, _ = query.shape
    attention, reduce = launch_variants(query, k_cache, plan)
    if kv_quant.is_quantized(k_cache.dtype):
        check_scales(k_cache, k_scale, v_scale)
        k_cache, v_cache = codes_view(k_cache), codes_view(v_cache)
    else:
        k_scale, v_scale = k_cache, v_cache  # unused by the kernel when not quantized
    head_dim_pad = dict(attention.constexprs)["HEAD_DIM_PAD"]
    out = torch.empty_like(query)
    splits = plan.num_splits
    if reduce is not None:
        m_part = torch.empty(splits, num_tokens, num_heads, dtype=torch.float32, device=query.device)
        l_part = torch.empty_like(m_part)
        acc_part = torch.empty(splits, num_tokens, num_heads, head_dim_pad, dtype=torch.float32, device=query.device)
    else:
        m_part = l_part = acc_part = out  # unused by the kernel when not split
    grid = (plan.tile_req.numel(), k_cache.shape[2], splits)
    _paged_attention_kernel[grid](
        query, k_cache, v_cache, out, block_tables, plan.seq_lens, plan.query_start, plan.tile_req, plan.tile_first,
        m_part, l_part, acc_part, k_scale, v_scale, scale * LOG2E, query.stride(0), query.stride(1),
        out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0), num_tokens, plan.split_len,
        **attention.launch_kwargs())
    if reduce is not None:
        _reduce_kernel[(num_tokens, num_heads)](out, m_part, l_part, acc_part, out.stride(0), out.stride(1),
                                                num_tokens, splits, **reduce.launch_kwargs())
    return out


class TritonAttentionBackend(AttentionBackend):
    """The `AttentionBackend` of the kernels above: CUDA caches (or Triton's interpreter on the CPU)."""

    name = "triton"

    def plan(self, block_tables: torch.Tensor, seq_lens: list[int], query_start_loc: list[int], *,
             block_size: int, num_heads: int, num_kv_heads: int) -> AttentionPlan:
        # Any block size works: the kernel reads it from the cache's shape.
        kernel_plan = TritonAttentionPlan.build(seq_lens, query_start_loc, num_heads // num_kv_heads, num_kv_heads,
                                                block_tables.device)
        return AttentionPlan(block_tables, seq_lens, query_start_loc, kernel_plan)

    def static_decode_plan(self, block_tables: torch.Tensor, seq_lens: torch.Tensor, *, max_seq_len: int,
                           block_size: int, num_heads: int, num_kv_heads: int) -> AttentionPlan:
        kernel_plan = TritonAttentionPlan.build_static_decode(seq_lens, num_heads // num_kv_heads, num_kv_heads,
                                                              max_seq_len)
        return AttentionPlan(block_tables, [], [], kernel_plan)

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                 v_scale: torch.Tensor | None = None) -> None:
        write_kv(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)

    def attend(self, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: AttentionPlan,
               scale: float, k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
        return paged_attention(query, k_cache, v_cache, plan.block_tables, plan.kernel_plan, scale, k_scale, v_scale)

    def warm_up(self, *, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
                device: torch.device | str, kv_cache_dtype: torch.dtype | None = None) -> WarmUpResult:
        """Compile every variant of `compile_variants` by launching each once on a tiny batch of
        the worker's geometry (the real caches are not touched): a decode step and a two-token
        prefill, each unsplit and split (split count 2 stands for the whole ladder, which is a
        runtime argument), with caches in `kv_cache_dtype` (None: `dtype`; a quantized one
        with its scales). Compiled kernels land in Triton's caches; later launches with these
        shapes compile nothing. In the interpreter the launches just run."""
        began = time.perf_counter()
        device = torch.device(device)
        cache_dtype = kv_cache_dtype or dtype
        group = num_heads // num_kv_heads
        blocks = 2 * -(-3 // block_size)  # two requests of up to 3 positions
        k_cache = torch.zeros(blocks, block_size, num_kv_heads, head_dim, dtype=cache_dtype, device=device)
        v_cache = torch.zeros_like(k_cache)
        scales = (None, None)
        if kv_quant.is_quantized(cache_dtype):
            scales = tuple(torch.ones(k_cache.shape[:3], dtype=kv_quant.SCALE_DTYPE, device=device) for _ in "kv")
        # int64 tables and slots, as the worker builds them (a pointer's dtype is part of the variant).
        tables = torch.arange(blocks, dtype=torch.int64, device=device).view(2, -1)
        launched = set()  # the variants of these launches: `compile_variants` of this geometry
        for query_lens in ([1, 1], [2, 1]):
            seq_lens, starts = [q + 1 for q in query_lens], [0, query_lens[0], sum(query_lens)]
            tokens = starts[-1]
            key = torch.zeros(tokens, num_kv_heads, head_dim, dtype=dtype, device=device)
            slots = torch.arange(tokens, dtype=torch.int64, device=device)
            self.write_kv(key, key, k_cache, v_cache, slots, *scales)
            launched.add(write_kv_variant(num_kv_heads, head_dim, dtype, cache_dtype))
            query = torch.zeros(tokens, num_heads, head_dim, dtype=dtype, device=device)
            for splits in (1, SPLIT_LADDER[1]):
                plan = TritonAttentionPlan.build(seq_lens, starts, group, num_kv_heads, device, num_splits=splits)
                paged_attention(query, k_cache, v_cache, tables, plan, head_dim ** -0.5, *scales)
                launched.update(v for v in launch_variants(query, k_cache, plan) if v is not None)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return WarmUpResult(variants=len(launched), seconds=time.perf_counter() - began)
