"""Triton kernels against the torch reference (in Triton's interpreter on the CPU,
compiled on a GPU): slot writes for every dtype, and ragged paged attention over a grid
of block sizes, head dims, GQA ratios, block boundaries, cached prefixes and split-K."""
import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is not installed (pip install 'quire[triton]')")

from quire.kernels.attention_ref import write_kv_ref  # noqa: E402
from quire.kernels.triton_attention import TritonAttentionPlan, choose_num_splits, write_kv  # noqa: E402
from quire.kernels.verify import CASES, max_error_vs_reference  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check(*args, **kwargs):
    error, tolerance, plan = max_error_vs_reference(*args, device=DEVICE, **kwargs)
    assert error <= tolerance, f"max error {error:.3g} over tolerance {tolerance:.3g}"
    return plan


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


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_named_cases(case):
    _, shapes, heads, kv_heads, head_dim, block_size, splits = case
    plan = check(shapes, heads, kv_heads, head_dim, block_size, num_splits=splits)
    if splits:
        assert plan.num_splits == splits


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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    check([(30, 1), (0, 20), (12, 4)], 8, 2, 64, 16, dtype=dtype)
    check([(900, 1)], 8, 1, 128, 16, dtype=dtype, num_splits=3)


def test_long_prefill_spans_several_query_tiles():
    plan = check([(3, 70), (0, 1)], 4, 2, 64, 16)
    assert plan.tile_req.numel() > 2


def test_split_k_rule():
    # Few programs and long contexts split; many programs or short contexts do not.
    assert choose_num_splits(2, 4096, torch.device("cpu")) > 1
    assert choose_num_splits(64, 4096, torch.device("cpu")) == 1
    assert choose_num_splits(2, 200, torch.device("cpu")) == 1
    default = TritonAttentionPlan.build([1501, 701], [0, 1, 2], 4, 2, torch.device("cpu"))
    assert default.num_splits > 1
    check([(1500, 1), (700, 1)], 8, 2, 64, 16)  # the rule's own choice is exact too
