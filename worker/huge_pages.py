"""Zeroed host tensors in transparent huge pages, where the OS offers them.

Why: the CPU attention kernel reads every request's K/V blocks in place, scattered over the
pool, once per layer per step; in 4 KiB pages that is a TLB miss every few rows. Backed by
2 MiB pages the same decodes run measurably faster (the benchmarks README has the figures).
Linux grants huge pages to anonymous memory advised `MADV_HUGEPAGE` when transparent huge
pages are set to `madvise` or `always`; elsewhere, or when they are `never`, the advice is
ignored or refused and the tensor is an ordinary zeroed one.
"""
from __future__ import annotations

import contextlib
import math
import mmap

import torch

# Below this a tensor spans no whole huge page: advice would be wasted.
HUGE_PAGE_BYTES = 2 << 20


def zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed, contiguous CPU tensor of `shape` and `dtype`, in anonymous memory advised into
    huge pages when it is at least one huge page and the platform has `MADV_HUGEPAGE`;
    otherwise `torch.zeros`. Every page is touched before it returns, so the memory is
    committed now, not by a page fault in the middle of a step. The tensor keeps its mapping
    alive; the mapping is released with the tensor's last reference."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None or nbytes < HUGE_PAGE_BYTES:
        return torch.zeros(shape, dtype=dtype)
    # Private (a shared anonymous mapping is shmem, under other huge-page rules), one huge page
    # longer than asked, so that the tensor can start on a huge page boundary: the kernel
    # backs only aligned 2 MiB ranges with huge pages.
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(OSError):  # refused where transparent huge pages are disabled: ordinary pages
        mapping.madvise(advice)
    # frombuffer holds a reference to the mapping for as long as the tensor (or a view) lives.
    whole = torch.frombuffer(mapping, dtype=torch.uint8)
    start = -whole.data_ptr() % HUGE_PAGE_BYTES
    tensor = whole[start:start + nbytes].view(dtype).view(shape)
    return tensor.zero_()  # the pages are zero already; writing them commits them now
