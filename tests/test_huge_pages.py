"""`huge_pages.zeros`: whatever the shape and dtype, a zeroed contiguous tensor that behaves
as `torch.zeros`'s does (writes stick, views share, the memory outlives every name but the
tensor's), starting on a huge-page boundary once it spans one; and the CPU KV pool is built
from it."""
import gc
import mmap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quire.worker import huge_pages
from quire.worker.kv_pool import KVCacheSpec, KVPool

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.float8_e4m3fn, torch.uint8]


@settings(max_examples=60, deadline=None)
@given(shape=st.lists(st.integers(0, 40), min_size=0, max_size=4), dtype=st.sampled_from(DTYPES),
       huge_rows=st.integers(0, 3), extra=st.integers(0, 5000))
def test_zeros_matches_torch_zeros(shape, dtype, huge_rows, extra):
    if huge_rows:  # rows of a huge page's elements each, and some: one to three huge pages
        row = huge_pages.HUGE_PAGE_BYTES // torch.empty((), dtype=dtype).element_size()
        shape = [huge_rows, row + extra]
    t = huge_pages.zeros(tuple(shape), dtype)
    assert t.shape == tuple(shape) and t.dtype == dtype and t.is_contiguous() and t.device.type == "cpu"
    as_bytes = t.view(torch.uint8) if t.dim() else t.reshape(1).view(torch.uint8)
    assert not as_bytes.any()
    if t.numel() and t.numel() * t.element_size() >= huge_pages.HUGE_PAGE_BYTES and hasattr(mmap, "MADV_HUGEPAGE"):
        assert t.data_ptr() % huge_pages.HUGE_PAGE_BYTES == 0


def test_writes_stick_and_the_memory_outlives_the_builder():
    t = huge_pages.zeros((huge_pages.HUGE_PAGE_BYTES // 4 + 5,), torch.float32)
    head, tail = t[:7], t[-10:]
    del t
    gc.collect()  # only the views keep the mapping now: reading and writing it must still work
    tail.fill_(3.0)
    head[2] = -1.5
    assert tail.tolist() == [3.0] * 10
    assert head.tolist() == [0.0, 0.0, -1.5, 0.0, 0.0, 0.0, 0.0]
    whole = tail._base
    assert whole is not None and whole is head._base  # one mapping behind both
    # fp32 3.0 and -1.5 each have two nonzero bytes; every other byte of the mapping is still 0
    assert whole.view(torch.uint8).count_nonzero().item() == 10 * 2 + 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.int8])
def test_the_cpu_pool_is_zeroed_and_huge_page_aligned(dtype):
    spec = KVCacheSpec(num_layers=2, num_kv_heads=4, head_size=64, dtype=dtype)
    pool = KVPool(spec, num_blocks=600, block_size=16, device=torch.device("cpu"))
    tensors = [t for group in (pool.caches, pool.scales) for pair in group for t in pair]
    assert len(tensors) == (8 if spec.quantized else 4)
    for t in tensors:
        assert not t.view(torch.uint8).any() and t.is_contiguous()
        if t.numel() * t.element_size() >= huge_pages.HUGE_PAGE_BYTES and hasattr(mmap, "MADV_HUGEPAGE"):
            assert t.data_ptr() % huge_pages.HUGE_PAGE_BYTES == 0
