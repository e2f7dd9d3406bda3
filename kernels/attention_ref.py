"""Pure-torch paged attention over a ragged batch: the CPU backend and the reference
the Triton kernels are tested against.

Layout (one layer, one rank): `k_cache`, `v_cache` are `[num_blocks, block_size,
num_kv_heads, head_dim]`. Token `t` of a request lives in physical block
`block_table[t // block_size]` at offset `t % block_size`; its flat slot is
`block * block_size + offset`.

A batch is ragged: request `i` owns query rows `query_start_loc[i]:query_start_loc[i+1]`
(a prefill chunk, or one decode token) and has `seq_lens[i]` tokens of context once this
step's K/V are written, so its queries sit at absolute positions
`seq_lens[i] - query_len_i ... seq_lens[i] - 1` and attend causally to every cached
token up to their own position.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from quire.kernels import kv_quant
from quire.kernels.backend import AttentionBackend, AttentionPlan


def require_scales(k_cache: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> None:
    """ValueError unless a quantized cache's `k_scale`/`v_scale` are given, shaped `k_cache.shape[:3]`."""
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if scale is None or scale.shape != k_cache.shape[:3]:
            got = None if scale is None else tuple(scale.shape)
            raise ValueError(f"a {k_cache.dtype} KV cache needs `k_scale` and `v_scale` of shape "
                             f"{tuple(k_cache.shape[:3])} (`{name}` is {got})")


def write_kv_ref(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                 v_scale: torch.Tensor | None = None) -> None:
    """Write `key`/`value` (`[num_tokens, num_kv_heads, head_dim]`) into their slots, cast to the
    cache dtype, or for a quantized cache as `kv_quant.quantize`'s codes with their scales in the
    same slots of `k_scale`/`v_scale` (required then).

    Mutates the caches (and scales) in place; slots must be distinct.
    """
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    if not kv_quant.is_quantized(k_cache.dtype):
        k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key.to(k_cache.dtype))
        v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value.to(v_cache.dtype))
        return
    require_scales(k_cache, k_scale, v_scale)
    for rows, cache, scales in ((key, k_cache, k_scale), (value, v_cache, v_scale)):
        codes, row_scales = kv_quant.quantize(rows, cache.dtype)
        # Byte copies: index_copy_ has no float8 kernel on the CPU.
        cache.view(torch.uint8).view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, codes.view(torch.uint8))
        scales.view(-1, num_kv_heads).index_copy_(0, slot_mapping, row_scales.to(scales.dtype))


@dataclass
class _Group:
    """Requests attended together: their query rows, the flattened block ids of their
    contexts (padded to the longest), and the boolean mask `[n, q_len, ctx]` of what
    each query row may see."""

    rows: torch.Tensor
    flat_tables: torch.Tensor
    num_reqs: int
    query_len: int
    ctx_len: int
    mask: torch.Tensor


class RefAttentionPlan:
    """The layer-independent part of a step's attention: built once per step, reused by
    every layer (valid while the step's block tables and lengths are unchanged).

    Single-token decodes are sorted by context length and split into at most four groups,
    each padded to its longest context and masked, so a group runs as one batched SDPA
    with little padding. Each prefill chunk is a group of its own.
    """

    def __init__(self, block_tables: torch.Tensor, seq_lens: list[int], query_start_loc: list[int], block_size: int):
        device = block_tables.device
        num_reqs = len(seq_lens)
        query_lens = [query_start_loc[i + 1] - query_start_loc[i] for i in range(num_reqs)]
        decodes = sorted((i for i in range(num_reqs) if query_lens[i] == 1), key=lambda i: seq_lens[i])
        parts = min(4, -(-len(decodes) // 16))
        groups = [decodes[p * len(decodes) // parts:(p + 1) * len(decodes) // parts] for p in range(parts)]
        groups += [[i] for i in range(num_reqs) if query_lens[i] > 1]
        self.groups = []
        for reqs in groups:
            q_len = query_lens[reqs[0]]
            num_blocks = -(-max(seq_lens[i] for i in reqs) // block_size)
            ctx_len = num_blocks * block_size
            index = torch.tensor(reqs, device=device)
            tables = block_tables.index_select(0, index)[:, :num_blocks]
            lens = torch.tensor([seq_lens[i] for i in reqs], device=device)
            # query row r of request i sits at position seq_len_i - q_len + r
            q_pos = lens[:, None] - q_len + torch.arange(q_len, device=device)[None, :]
            mask = torch.arange(ctx_len, device=device)[None, None, :] <= q_pos[:, :, None]
            rows = torch.cat([torch.arange(query_start_loc[i], query_start_loc[i] + q_len) for i in reqs]).to(device)
            self.groups.append(_Group(rows, tables.reshape(-1), len(reqs), q_len, ctx_len, mask))


def paged_attention_ref(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_tables: torch.Tensor, seq_lens: list[int], query_start_loc: list[int],
                        scale: float, plan: RefAttentionPlan | None = None, k_scale: torch.Tensor | None = None,
                        v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of every query row over its request's paged context.

    query: `[num_tokens, num_heads, head_dim]`; block_tables: `[num_reqs, max_blocks]`
    (padding entries are never read past `seq_lens`); seq_lens / query_start_loc: host
    lists; `plan` is the step's RefAttentionPlan (built here when not given).
    `num_heads` must be a multiple of `num_kv_heads` (GQA/MQA). Returns
    `[num_tokens, num_heads, head_dim]` in the query's dtype; half-precision inputs are
    computed in fp32 on the CPU. A quantized cache (with its required `k_scale`/`v_scale`)
    is dequantized as gathered (`codes * scale` in fp32), then attended as values.
    """
    _, num_heads, head_dim = query.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    plan = plan or RefAttentionPlan(block_tables, seq_lens, query_start_loc, block_size)
    quantized = kv_quant.is_quantized(k_cache.dtype)
    if quantized:
        require_scales(k_cache, k_scale, v_scale)
    cpu_half = query.dtype in (torch.float16, torch.bfloat16) and query.device.type == "cpu"
    compute_dtype = torch.float32 if cpu_half else query.dtype
    out = torch.empty_like(query)
    for g in plan.groups:
        n, q_len, ctx = g.num_reqs, g.query_len, g.ctx_len
        # index_select plus one transposing copy into SDPA's contiguous
        # [n, kv_heads, ctx, dim] layout is several times faster on the CPU than fancy
        # indexing followed by a strided SDPA.
        if quantized:  # gathered as bytes (no float8 index_select on the CPU), then dequantized
            k, v = (kv_quant.dequantize(c.view(torch.uint8).index_select(0, g.flat_tables).view(c.dtype),
                                        s.index_select(0, g.flat_tables)) for c, s in ((k_cache, k_scale),
                                                                                        (v_cache, v_scale)))
            k, v = k.view(n, ctx, num_kv_heads, head_dim), v.view(n, ctx, num_kv_heads, head_dim)
        else:
            k = k_cache.index_select(0, g.flat_tables).view(n, ctx, num_kv_heads, head_dim)
            v = v_cache.index_select(0, g.flat_tables).view(n, ctx, num_kv_heads, head_dim)
        k = k.transpose(1, 2).to(compute_dtype).contiguous()
        v = v.transpose(1, 2).to(compute_dtype).contiguous()
        # The query heads sharing a KV head are stacked along the query dimension
        # ([n, kv_heads, group * q_len, dim]), so K/V are never copied per query head;
        # head h uses KV head h // group, as HF's repeat_kv.
        q = query.index_select(0, g.rows).view(n, q_len, num_kv_heads, group, head_dim)
        q = q.permute(0, 2, 3, 1, 4).reshape(n, num_kv_heads, group * q_len, head_dim).to(compute_dtype)
        mask = g.mask.repeat(1, group, 1)[:, None] if group > 1 else g.mask[:, None]
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        attn = attn.view(n, num_kv_heads, group, q_len, head_dim).permute(0, 3, 1, 2, 4)
        out.index_copy_(0, g.rows, attn.reshape(n * q_len, num_heads, head_dim).to(out.dtype))
    return out


class TorchAttentionBackend(AttentionBackend):
    """The `AttentionBackend` of the functions above: runs anywhere torch does (the CPU backend)."""

    name = "torch"

    def plan(self, block_tables: torch.Tensor, seq_lens: list[int], query_start_loc: list[int], *,
             block_size: int, num_heads: int, num_kv_heads: int) -> AttentionPlan:
        return AttentionPlan(block_tables, seq_lens, query_start_loc,
                             RefAttentionPlan(block_tables, seq_lens, query_start_loc, block_size))

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                 v_scale: torch.Tensor | None = None) -> None:
        write_kv_ref(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)

    def attend(self, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: AttentionPlan,
               scale: float, k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
        return paged_attention_ref(query, k_cache, v_cache, plan.block_tables, plan.seq_lens, plan.query_start_loc,
                                   scale, plan.kernel_plan, k_scale, v_scale)
