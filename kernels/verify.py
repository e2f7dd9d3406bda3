"""Check the Triton kernels against the torch reference on random paged batches.

Used by the test suite (in Triton's interpreter on the CPU) and by the GPU check script
(compiled, on machines that may lack pytest), so both exercise the same cases.
"""
from __future__ import annotations

import torch

from quire.kernels.attention_ref import paged_attention_ref
from quire.kernels.triton_attention import TritonAttentionPlan, paged_attention

TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}

# (name, requests as (cached tokens, query tokens), heads, kv heads, head dim, block size, splits)
CASES = [
    ("boundaries-mixed-mha", [(15, 1), (16, 1), (0, 19), (21, 6), (30, 1)], 2, 2, 64, 16, None),
    ("gqa4-block8", [(7, 1), (8, 1), (0, 11), (13, 6)], 4, 1, 64, 8, None),
    ("gqa8-block64", [(63, 1), (64, 1), (0, 67), (69, 6)], 8, 1, 128, 64, None),
    ("head-dim-80-block32", [(5, 1), (0, 9), (40, 3)], 4, 2, 80, 32, None),
    ("head-dim-96-block16", [(17, 1), (0, 5)], 2, 1, 96, 16, None),
    ("long-prefill-tiles", [(3, 70), (0, 1)], 4, 2, 64, 16, None),
    ("split-k", [(1500, 1), (700, 1)], 8, 2, 64, 16, 4),
    ("split-k-empty-splits", [(40, 1), (0, 30), (9, 1)], 4, 1, 64, 8, 3),
    ("split-k-prefill-tiles", [(600, 20), (130, 1)], 4, 2, 64, 16, 4),
    ("block128-tile-inside-block", [(300, 1), (0, 20), (127, 3)], 4, 1, 64, 128, 2),
    ("block24-any-block-size", [(23, 1), (24, 1), (0, 30), (50, 5)], 4, 2, 64, 24, None),
    ("head-dim-256", [(70, 1), (0, 9)], 2, 1, 256, 64, None),
]


def random_paged_batch(shapes, num_heads, num_kv_heads, head_dim, block_size, dtype, device, seed=0):
    """Random K/V for requests `(cached, query)` on shuffled, non-contiguous physical blocks.
    Returns query, k_cache, v_cache, block_tables, seq_lens, query_start_loc."""
    torch.manual_seed(seed)
    total_blocks = sum(-(-(c + q) // block_size) for c, q in shapes) + 3
    free = torch.randperm(total_blocks).tolist()
    k_cache = torch.randn(total_blocks, block_size, num_kv_heads, head_dim, device=device).to(dtype)
    v_cache = torch.randn_like(k_cache)
    tables, seq_lens, starts = [], [], [0]
    for cached, q_len in shapes:
        tables.append([free.pop() for _ in range(-(-(cached + q_len) // block_size))])
        seq_lens.append(cached + q_len)
        starts.append(starts[-1] + q_len)
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], device=device)
    query = torch.randn(starts[-1], num_heads, head_dim, device=device).to(dtype)
    return query, k_cache, v_cache, block_tables, seq_lens, starts


def max_error_vs_reference(shapes, num_heads, num_kv_heads, head_dim, block_size, dtype=torch.float32,
                           num_splits=None, device=None) -> tuple[float, float, TritonAttentionPlan]:
    """Run the Triton kernel and the fp32 reference on one random batch.
    Returns (max abs error, the dtype's tolerance, the plan used)."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    query, k_cache, v_cache, tables, seq_lens, starts = random_paged_batch(
        shapes, num_heads, num_kv_heads, head_dim, block_size, dtype, device)
    scale = head_dim ** -0.5
    plan = TritonAttentionPlan.build(seq_lens, starts, num_heads // num_kv_heads, num_kv_heads, device, num_splits)
    got = paged_attention(query, k_cache, v_cache, tables, plan, scale)
    expected = paged_attention_ref(query.float(), k_cache.float(), v_cache.float(), tables, seq_lens, starts, scale)
    error = (got.float() - expected).abs().max().item()
    return error, TOLERANCE[dtype] * (1 + expected.abs().max().item()), plan
