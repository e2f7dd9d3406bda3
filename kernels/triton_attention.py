"""Triton kernels over the paged KV cache: write K/V into slots, and paged attention
over a ragged batch in one launch (prefill chunks and decodes together), with a
split-K (flash-decoding) path and its reduction kernel.

Layouts are those of `attention_ref` (the torch reference these kernels are tested
against): caches `[num_blocks, block_size, num_kv_heads, head_dim]`, queries
`[num_tokens, num_heads, head_dim]`.

Work split. The queries of a step are cut into tiles: a tile is up to `BLOCK_Q`
consecutive query tokens of one request. A program handles one (tile, KV head,
split): its `BLOCK_M = BLOCK_Q * group` rows are the tile's tokens times the query
heads that share that KV head, so each K/V element is loaded once for the whole
group (GQA/MQA). It walks the request's context `BLOCK_N` positions at a time,
looking up each position's physical block in the block table (any block size works),
with an online softmax accumulated in fp32; causality also bounds the walk.

Split-K. With few programs (few requests, few KV heads) and long contexts a GPU sits
mostly idle, so the context is cut into `num_splits` chunks processed by separate
programs that write partial (max, sum, accumulator) triples; `_reduce_kernel`
combines them. The rule (`choose_num_splits`): split only when the step launches fewer
programs than the device can run at once (`2 * SMs`), into as many chunks as fill it,
at most 16, and never into chunks shorter than 256 positions.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from quire.kernels.backend import AttentionBackend, AttentionPlan

MIN_SPLIT_LEN = 256
MAX_SPLITS = 16
BLOCK_N = 32  # context positions per inner iteration


@triton.jit
def _write_kv_kernel(key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, key_stride, value_stride,
                     ROW: tl.constexpr, ROW_PAD: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    offs = tl.arange(0, ROW_PAD)
    mask = offs < ROW
    key = tl.load(key_ptr + token * key_stride + offs, mask=mask)
    value = tl.load(value_ptr + token * value_stride + offs, mask=mask)
    tl.store(k_cache_ptr + slot * ROW + offs, key.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + slot * ROW + offs, value.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write `key`/`value` `[num_tokens, num_kv_heads, head_dim]` into their slots (in place)."""
    num_tokens = key.shape[0]
    if num_tokens == 0:
        return
    key = key if key[0].is_contiguous() else key.contiguous()
    value = value if value[0].is_contiguous() else value.contiguous()
    row = k_cache.shape[2] * k_cache.shape[3]
    _write_kv_kernel[(num_tokens,)](key, value, k_cache, v_cache, slot_mapping, key.stride(0), value.stride(0),
                                    ROW=row, ROW_PAD=triton.next_power_of_2(row))


@triton.jit
def _paged_attention_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, seq_lens_ptr, query_start_ptr,
        tile_req_ptr, tile_first_ptr, m_part_ptr, l_part_ptr, acc_part_ptr,
        scale, q_stride_t, q_stride_h, out_stride_t, out_stride_h,
        k_stride_block, k_stride_pos, k_stride_head, table_stride, num_tokens, split_len,
        NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
        NUM_SPLITS: tl.constexpr, IEEE_DOT: tl.constexpr, UPCAST: tl.constexpr):
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
    table_row = block_tables_ptr + req.to(tl.int64) * table_stride
    for block_start in range(start, end, BLOCK_N):
        k_pos = block_start + tl.arange(0, BLOCK_N)
        k_valid = k_pos < end
        block = tl.load(table_row + k_pos // BLOCK_SIZE, mask=k_valid, other=0).to(tl.int64)
        base = block * k_stride_block + (k_pos % BLOCK_SIZE) * k_stride_pos + kv_head * k_stride_head
        kv_mask = k_valid[:, None] & d_valid[None, :]
        k = tl.load(k_cache_ptr + base[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + base[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if IEEE_DOT:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scale
        visible = (k_pos[None, :] <= q_pos[:, None]) & k_valid[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows that have seen nothing yet keep m = -inf; shift them by 0 to avoid inf - inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE_DOT:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    out_mask = row_valid[:, None] & d_valid[None, :]
    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + q_rows[:, None] * out_stride_t + head[:, None] * out_stride_h + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        part = (split * num_tokens + q_rows) * NUM_HEADS + head
        tl.store(m_part_ptr + part, m_i, mask=row_valid)
        tl.store(l_part_ptr + part, l_i, mask=row_valid)
        tl.store(acc_part_ptr + part[:, None] * HEAD_DIM_PAD + d[None, :], acc, mask=out_mask)


@triton.jit
def _reduce_kernel(out_ptr, m_part_ptr, l_part_ptr, acc_part_ptr, out_stride_t, out_stride_h, num_tokens,
                   NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                   NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_PAD)
    split_valid = splits < NUM_SPLITS
    part = (splits * num_tokens + token) * NUM_HEADS + head
    m = tl.load(m_part_ptr + part, mask=split_valid, other=float("-inf"))
    l = tl.load(l_part_ptr + part, mask=split_valid, other=0.0)
    m_max = tl.max(m, 0)
    weight = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_max))
    d = tl.arange(0, HEAD_DIM_PAD)
    acc = tl.load(acc_part_ptr + part[:, None] * HEAD_DIM_PAD + d[None, :], mask=split_valid[:, None], other=0.0)
    total = tl.sum(weight * l, 0)
    out = tl.sum(weight[:, None] * acc, 0) / total
    tl.store(out_ptr + token * out_stride_t + head * out_stride_h + d, out.to(out_ptr.dtype.element_ty),
             mask=d < HEAD_DIM)


def choose_num_splits(num_programs: int, max_seq_len: int, device: torch.device) -> int:
    """Split-K factor for a launch of `num_programs` (tile, KV head) programs (module docstring)."""
    if device.type == "cuda":
        capacity = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        capacity = 8  # the interpreter: small, so tests reach the split path with small shapes
    if num_programs >= capacity:
        return 1
    return max(1, min(MAX_SPLITS, -(-capacity // num_programs), max_seq_len // MIN_SPLIT_LEN))


@dataclass
class TritonAttentionPlan:
    """The layer-independent launch description of one step (valid for that step)."""

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
        query_lens = [query_start_loc[i + 1] - query_start_loc[i] for i in range(len(seq_lens))]
        # Decode-only steps need just `group` rows per tile; prefill tiles take 64 rows.
        rows = triton.next_power_of_2(group) if max(query_lens) == 1 else max(64, triton.next_power_of_2(group))
        block_m = max(16, rows)
        block_q = block_m // group
        tile_req, tile_first = [], []
        for req, q_len in enumerate(query_lens):
            for first in range(0, q_len, block_q):
                tile_req.append(req)
                tile_first.append(first)
        max_seq = max(seq_lens)
        if num_splits is None:
            num_splits = choose_num_splits(len(tile_req) * num_kv_heads, max_seq, device)
        per_split = -(-max_seq // num_splits)
        split_len = -(-per_split // BLOCK_N) * BLOCK_N
        as_tensor = lambda values: torch.tensor(values, dtype=torch.int32, device=device)  # noqa: E731
        return cls(as_tensor(seq_lens), as_tensor(query_start_loc), as_tensor(tile_req), as_tensor(tile_first),
                   block_m, block_q, num_splits, split_len)


def paged_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    plan: TritonAttentionPlan, scale: float) -> torch.Tensor:
    """Same contract as `attention_ref.paged_attention_ref`, from a step's TritonAttentionPlan."""
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    group = num_heads // num_kv_heads
    head_dim_pad = max(16, triton.next_power_of_2(head_dim))
    out = torch.empty_like(query)
    splits = plan.num_splits
    if splits > 1:
        m_part = torch.empty(splits, num_tokens, num_heads, dtype=torch.float32, device=query.device)
        l_part = torch.empty_like(m_part)
        acc_part = torch.empty(splits, num_tokens, num_heads, head_dim_pad, dtype=torch.float32, device=query.device)
    else:
        m_part = l_part = acc_part = out  # unused by the kernel when NUM_SPLITS == 1
    grid = (plan.tile_req.numel(), num_kv_heads, splits)
    _paged_attention_kernel[grid](
        query, k_cache, v_cache, out, block_tables, plan.seq_lens, plan.query_start, plan.tile_req, plan.tile_first,
        m_part, l_part, acc_part, scale, query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0), num_tokens, plan.split_len,
        NUM_HEADS=num_heads, GROUP=group, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, BLOCK_SIZE=block_size,
        BLOCK_M=plan.block_m, BLOCK_Q=plan.block_q, BLOCK_N=BLOCK_N, NUM_SPLITS=splits,
        IEEE_DOT=query.dtype == torch.float32,
        # Triton's interpreter mis-computes bf16 dot products; it gets fp32 operands instead.
        UPCAST=query.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1")
    if splits > 1:
        _reduce_kernel[(num_tokens, num_heads)](
            out, m_part, l_part, acc_part, out.stride(0), out.stride(1), num_tokens, NUM_HEADS=num_heads,
            HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, NUM_SPLITS=splits, SPLITS_PAD=triton.next_power_of_2(splits))
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

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
        write_kv(key, value, k_cache, v_cache, slot_mapping)

    def attend(self, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: AttentionPlan,
               scale: float) -> torch.Tensor:
        return paged_attention(query, k_cache, v_cache, plan.block_tables, plan.kernel_plan, scale)
