"""The torch paged-attention reference against dense attention computed from scratch."""
import pytest
import torch

from quire.kernels.attention_ref import paged_attention_ref, write_kv_ref


def dense_attention(q, k, v, scale):
    """q: [q_len, H, D] at the last q_len positions of k/v: [ctx, KV, D]; causal."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
    ctx, q_len = k.shape[0], q.shape[0]
    allowed = torch.arange(ctx)[None, :] <= torch.arange(ctx - q_len, ctx)[:, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.double()).to(q.dtype)


@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("block_size", [4, 16])
def test_ragged_batch_matches_dense(num_heads, num_kv_heads, block_size):
    torch.manual_seed(0)
    head_dim, num_blocks = 16, 256
    # (computed context before this step, query length): decodes on and just past block
    # boundaries, prefill chunks with and without a cached prefix, and enough decodes
    # of spread lengths to exercise the length-grouped batching.
    shapes = [(block_size - 1, 1), (block_size, 1), (2 * block_size, 1), (0, 7), (0, block_size),
              (block_size + 3, 5), (3, 2 * block_size + 1)] + [(5 + 3 * i, 1) for i in range(20)]
    free_blocks = torch.randperm(num_blocks).tolist()  # shuffled, non-contiguous physical blocks
    k_cache = torch.zeros(num_blocks, block_size, num_kv_heads, head_dim)
    v_cache = torch.zeros_like(k_cache)
    tables, full_k, full_v, queries, seq_lens, starts = [], [], [], [], [], [0]
    for cached, q_len in shapes:
        ctx = cached + q_len
        table = [free_blocks.pop() for _ in range(-(-ctx // block_size))]
        tables.append(table)
        k, v = torch.randn(ctx, num_kv_heads, head_dim), torch.randn(ctx, num_kv_heads, head_dim)
        full_k.append(k)
        full_v.append(v)
        slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(ctx)])
        write_kv_ref(k, v, k_cache, v_cache, slots)
        queries.append(torch.randn(q_len, num_heads, head_dim))
        seq_lens.append(ctx)
        starts.append(starts[-1] + q_len)
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    scale = head_dim ** -0.5
    out = paged_attention_ref(torch.cat(queries), k_cache, v_cache, block_tables, seq_lens, starts, scale)
    for i, q in enumerate(queries):
        expected = dense_attention(q, full_k[i], full_v[i], scale)
        torch.testing.assert_close(out[starts[i]:starts[i + 1]], expected, atol=1e-5, rtol=1e-5,
                                   msg=f"request {i} {shapes[i]}")


def test_half_precision_cache_accumulates_in_fp32():
    torch.manual_seed(1)
    k_cache = torch.randn(8, 4, 2, 8).to(torch.bfloat16)
    v_cache = torch.randn(8, 4, 2, 8).to(torch.bfloat16)
    q = torch.randn(1, 4, 8).to(torch.bfloat16)
    table = torch.tensor([[3, 1, 6]])
    out = paged_attention_ref(q, k_cache, v_cache, table, [10], [0, 1], 8 ** -0.5)
    k = k_cache[table[0]].reshape(-1, 2, 8)[:10].float()
    v = v_cache[table[0]].reshape(-1, 2, 8)[:10].float()
    expected = dense_attention(q.float(), k, v, 8 ** -0.5)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=1e-2, rtol=1e-2)
