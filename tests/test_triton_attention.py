"""Triton kernels against the torch reference (in Triton's interpreter on the CPU,
compiled on a GPU): slot writes for every dtype, and ragged paged attention over a grid
of block sizes, head dims, GQA ratios, block boundaries, cached prefixes and split-K."""
import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is not installed (pip install 'quire[triton]')")

from quire.kernels.attention_ref import paged_attention_ref, write_kv_ref  # noqa: E402
from quire.kernels.triton_attention import TritonAttentionPlan, choose_num_splits, paged_attention, write_kv  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_write_kv_matches_reference(dtype):
    torch.manual_seed(0)
    num_blocks, block_size, kv_heads, head_dim = 12, 8, 2, 80
    # The engine's K/V are already in the cache dtype: the copy must be exact.
    key = torch.randn(17, kv_heads, head_dim, device=DEVICE).to(dtype)
    value = torch.randn(17, kv_heads, head_dim, device=DEVICE).to(dtype)
    slots = torch.randperm(num_blocks * block_size, device=DEVICE)[:17]
    caches = [torch.zeros(num_blocks, block_size, kv_heads, head_dim, dtype=dtype, device=DEVICE) for _ in range(4)]
    write_kv(key, value, caches[0], caches[1], slots)
    write_kv_ref(key, value, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])


def build_batch(shapes, num_heads, num_kv_heads, head_dim, block_size, dtype, seed=0):
    """Random paged K/V for requests given as (cached tokens, query tokens), on shuffled blocks."""
    torch.manual_seed(seed)
    total_blocks = sum(-(-(c + q) // block_size) for c, q in shapes) + 3
    free = torch.randperm(total_blocks).tolist()
    k_cache = torch.randn(total_blocks, block_size, num_kv_heads, head_dim, device=DEVICE).to(dtype)
    v_cache = torch.randn_like(k_cache)
    tables, seq_lens, starts = [], [], [0]
    for cached, q_len in shapes:
        tables.append([free.pop() for _ in range(-(-(cached + q_len) // block_size))])
        seq_lens.append(cached + q_len)
        starts.append(starts[-1] + q_len)
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], device=DEVICE)
    query = torch.randn(starts[-1], num_heads, head_dim, device=DEVICE).to(dtype)
    return query, k_cache, v_cache, block_tables, seq_lens, starts


def check(shapes, num_heads, num_kv_heads, head_dim, block_size, dtype=torch.float32, num_splits=None):
    query, k_cache, v_cache, tables, seq_lens, starts = build_batch(
        shapes, num_heads, num_kv_heads, head_dim, block_size, dtype)
    scale = head_dim ** -0.5
    plan = TritonAttentionPlan.build(seq_lens, starts, num_heads // num_kv_heads, num_kv_heads, DEVICE, num_splits)
    got = paged_attention(query, k_cache, v_cache, tables, plan, scale)
    expected = paged_attention_ref(query.float(), k_cache.float(), v_cache.float(), tables, seq_lens, starts, scale)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got.float(), expected, atol=tol, rtol=tol)
    return plan


@pytest.mark.parametrize("block_size", [8, 16, 32, 64])
@pytest.mark.parametrize("num_heads, num_kv_heads", [(2, 2), (4, 1), (8, 1)])
def test_mixed_batch_over_block_sizes_and_gqa(block_size, num_heads, num_kv_heads):
    shapes = [
        (block_size - 1, 1),           # decode ending exactly on a block boundary
        (block_size, 1),               # decode just past a boundary
        (0, block_size + 3),           # prefill chunk, no cached prefix
        (block_size + 5, 6),           # prefill chunk after a cached prefix
        (2 * block_size - 2, 1),
    ]
    check(shapes, num_heads, num_kv_heads, 64, block_size)


@pytest.mark.parametrize("head_dim", [64, 128, 80])
def test_head_dims(head_dim):
    check([(5, 1), (0, 9), (17, 3)], 4, 2, head_dim, 16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    check([(30, 1), (0, 20), (12, 4)], 8, 2, 64, 16, dtype=dtype)


def test_long_prefill_spans_several_query_tiles():
    plan = check([(3, 70), (0, 1)], 4, 2, 64, 16)
    assert plan.tile_req.numel() > 2


def test_split_k_path_and_its_rule():
    shapes = [(1500, 1), (700, 1)]
    plan = check(shapes, 8, 2, 64, 16, num_splits=4)
    assert plan.num_splits == 4
    check([(40, 1), (0, 30), (9, 1)], 4, 1, 64, 8, num_splits=3)  # short requests leave some splits empty
    # The rule: few programs and long contexts split; many programs or short contexts do not.
    assert choose_num_splits(2, 4096, torch.device("cpu")) > 1
    assert choose_num_splits(64, 4096, torch.device("cpu")) == 1
    assert choose_num_splits(2, 200, torch.device("cpu")) == 1
    default = TritonAttentionPlan.build([1501, 701], [0, 1, 2], 4, 2, torch.device("cpu"))
    assert default.num_splits > 1
