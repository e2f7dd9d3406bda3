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

import torch
import torch.nn.functional as F


def write_kv_ref(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """Write `key`/`value` (`[num_tokens, num_kv_heads, head_dim]`) into their slots.

    Mutates `k_cache` and `v_cache` in place; slots must be distinct.
    """
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value.to(v_cache.dtype))


def _gather_context(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """`[seq_len, num_kv_heads, head_dim]`: one request's context, in token order."""
    block_size = cache.shape[1]
    num_blocks = -(-seq_len // block_size)
    blocks = cache.index_select(0, block_table[:num_blocks])
    return blocks.reshape(-1, cache.shape[2], cache.shape[3])[:seq_len]


def _decode_attention(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, reqs, scale,
                      compute_dtype, out) -> None:
    """Attention for requests `reqs`, each with one query row; writes their rows of `out`."""
    device = query.device
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    group = num_heads // num_kv_heads
    rows = torch.tensor([query_start_loc[i] for i in reqs], device=device)
    lens = torch.tensor([seq_lens[i] for i in reqs], device=device)
    max_blocks = -(-max(seq_lens[i] for i in reqs) // block_size)
    tables = block_tables.index_select(0, torch.tensor(reqs, device=device))[:, :max_blocks]
    n, max_len = len(reqs), max_blocks * block_size
    flat_tables = tables.reshape(-1)
    # index_select + one transposing copy into SDPA's contiguous [n, kv_heads, len, dim]
    # layout is several times faster on the CPU than fancy indexing + strided SDPA.
    k = k_cache.index_select(0, flat_tables).view(n, max_len, num_kv_heads, head_dim)
    v = v_cache.index_select(0, flat_tables).view(n, max_len, num_kv_heads, head_dim)
    k = k.transpose(1, 2).to(compute_dtype).contiguous()
    v = v.transpose(1, 2).to(compute_dtype).contiguous()
    mask = torch.arange(max_len, device=device)[None, :] < lens[:, None]
    # Query heads sharing a KV head ride in the query-length dimension, so K/V are
    # never copied per query head (head h uses KV head h // group, as HF's repeat_kv).
    q = query.index_select(0, rows).view(n, num_kv_heads, group, head_dim).to(compute_dtype)
    attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :], scale=scale)
    out.index_copy_(0, rows, attn.reshape(n, num_heads, head_dim).to(out.dtype))


def paged_attention_ref(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_tables: torch.Tensor, seq_lens: list[int], query_start_loc: list[int],
                        scale: float) -> torch.Tensor:
    """Attention of every query row over its request's paged context.

    query: `[num_tokens, num_heads, head_dim]`; block_tables: `[num_reqs, max_blocks]`
    (padding entries are never read past `seq_lens`); seq_lens / query_start_loc: host
    lists. `num_heads` must be a multiple of `num_kv_heads` (GQA/MQA). Returns
    `[num_tokens, num_heads, head_dim]` in the query's dtype; scores accumulate in fp32
    when the cache is half precision.
    """
    _, num_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(query)
    num_reqs = len(seq_lens)
    query_lens = [query_start_loc[i + 1] - query_start_loc[i] for i in range(num_reqs)]
    decode_reqs = [i for i in range(num_reqs) if query_lens[i] == 1]
    compute_dtype = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) and query.device.type == "cpu" else query.dtype

    # Single-token queries attend to everything they have: contexts are padded to the
    # longest in a group and masked, so a group of decodes runs as one batched SDPA.
    # Grouping by length (a few groups of similar contexts) bounds the padding.
    decode_reqs.sort(key=lambda i: seq_lens[i])
    num_groups = min(4, -(-len(decode_reqs) // 16))
    for part in range(num_groups):
        group_reqs = decode_reqs[part * len(decode_reqs) // num_groups:(part + 1) * len(decode_reqs) // num_groups]
        _decode_attention(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, group_reqs, scale,
                          compute_dtype, out)

    for i in range(num_reqs):
        q_len = query_lens[i]
        if q_len <= 1:
            continue
        start, seq_len = query_start_loc[i], seq_lens[i]
        k = _gather_context(k_cache, block_tables[i], seq_len).transpose(0, 1).to(compute_dtype)
        v = _gather_context(v_cache, block_tables[i], seq_len).transpose(0, 1).to(compute_dtype)
        # [kv_heads, group * q_len, dim]: the group's query heads stacked along the rows.
        q = query[start:start + q_len].view(q_len, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
        q = q.reshape(num_kv_heads, group * q_len, head_dim).to(compute_dtype)
        q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)
        mask = torch.arange(seq_len, device=query.device)[None, :] <= q_pos[:, None]
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.repeat(group, 1), scale=scale)
        attn = attn.view(num_kv_heads, group, q_len, head_dim).permute(2, 0, 1, 3)
        out[start:start + q_len] = attn.reshape(q_len, num_heads, head_dim).to(out.dtype)
    return out
