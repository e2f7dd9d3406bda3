"""This rank's shard of the paged KV cache, its CPU swap pool, and the geometry that sizes them."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVCacheSpec:
    """What one rank's KV cache looks like, as the model states it (`kv_cache_spec()`): one K and
    one V per layer for `num_kv_heads` (this rank's share) heads of `head_size` values in `dtype`."""

    num_layers: int
    num_kv_heads: int
    head_size: int
    dtype: torch.dtype

    def bytes_per_block(self, block_size: int) -> int:
        """K and V bytes of one block of `block_size` tokens across all layers on this rank."""
        return 2 * self.num_layers * block_size * self.num_kv_heads * self.head_size * torch.finfo(self.dtype).bits // 8


def index_tensor(ids: list[int], device: torch.device) -> torch.Tensor:
    """Block ids as a `long` index on `device`; built once per swap or copy operation and
    shared by every layer. On CUDA it goes up from pinned memory without blocking the host."""
    index = torch.tensor(ids, dtype=torch.long, pin_memory=device.type == "cuda")
    return index.to(device, non_blocking=True)


def _runs(ids: list[int]) -> list[tuple[int, int, int]]:
    """`(position in ids, first id, length)` of each run of consecutive ids: one copy each
    between the device and the CPU pool, whose blocks are contiguous slices."""
    runs: list[tuple[int, int, int]] = []
    for position, block in enumerate(ids):
        if runs and runs[-1][1] + runs[-1][2] == block:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((position, block, 1))
    return runs


class KVPool:
    """One K and one V tensor per layer, each `[num_blocks, block_size, kv_heads, head_dim]`,
    where `kv_heads` is this rank's share of the KV heads (the `spec`'s geometry). Block ids
    are the controller's: block `b` of every layer belongs to the same request.
    `num_cpu_blocks` blocks of the same shape in host memory (pinned on CUDA) hold
    swapped-out requests.

    Ordering contract of `move_blocks` on CUDA: every copy is enqueued, without blocking
    the host, on the device's current stream (the one the forward pass runs on), in the
    order swap-out, swap-in, copies. Hence work enqueued after it (the step's forward, a
    later swap) sees its results and may overwrite the device blocks it read, and a swap-in
    reads CPU blocks only after the swap-out that wrote them. The host itself must not read
    or write `cpu_caches` until `synchronize()`; `swap_done`, an event recorded after each
    swap, is what a swap-in waits on (and what work on another stream must wait on) before
    reading the CPU pool. On the CPU every copy is done when `move_blocks` returns and
    there is no event.
    """

    def __init__(self, spec: KVCacheSpec, num_blocks: int, block_size: int, device: torch.device,
                 num_cpu_blocks: int = 0):
        shape = (num_blocks, block_size, spec.num_kv_heads, spec.head_size)
        dtype = spec.dtype
        self.spec = spec
        self.device = device
        self.num_blocks, self.block_size, self.num_cpu_blocks = num_blocks, block_size, num_cpu_blocks
        self.caches = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(spec.num_layers)
        ]
        # Pinned (page-locked) on CUDA so that transfers are DMA, asynchronous; pinning needs CUDA.
        pin = device.type == "cuda"
        cpu_shape = (num_cpu_blocks, *shape[1:])
        self.cpu_caches = [
            (torch.zeros(cpu_shape, dtype=dtype, pin_memory=pin), torch.zeros(cpu_shape, dtype=dtype, pin_memory=pin))
            for _ in range(spec.num_layers if num_cpu_blocks else 0)
        ]
        self.swap_done = None  # torch.cuda.Event of the last swap on CUDA; None on the CPU or before any swap

    def _record_swap(self) -> None:
        if self.device.type == "cuda":
            self.swap_done = torch.cuda.Event()
            self.swap_done.record(torch.cuda.current_stream(self.device))

    def synchronize(self) -> None:
        """Block the host until the swaps enqueued so far are done: then `cpu_caches` may be read."""
        if self.swap_done is not None:
            self.swap_done.synchronize()

    def _swap_out(self, pairs: list[tuple[int, int]]) -> None:
        """Device blocks → CPU blocks: each layer gathered on the device (one index for all
        layers), then copied into the pinned CPU pool, one asynchronous copy per run of
        consecutive CPU blocks (a host-side scatter would have to wait for the copy)."""
        src = index_tensor([s for s, _ in pairs], self.device)
        dst = [d for _, d in pairs]
        on_cpu = self.device.type == "cpu"
        dst_index, runs = (index_tensor(dst, self.device), None) if on_cpu else (None, _runs(dst))
        for device_pair, host_pair in zip(self.caches, self.cpu_caches):
            for cache, host in zip(device_pair, host_pair):
                gathered = cache.index_select(0, src)
                if on_cpu:
                    host.index_copy_(0, dst_index, gathered)
                    continue
                for position, block, length in runs:
                    host[block:block + length].copy_(gathered[position:position + length], non_blocking=True)
        self._record_swap()

    def _swap_in(self, pairs: list[tuple[int, int]]) -> None:
        """CPU blocks → device blocks: one asynchronous copy per run of consecutive CPU blocks
        into a device staging tensor, then one scatter per layer (one index for all layers)."""
        if self.swap_done is not None:  # the CPU blocks may have been written by a swap-out still in flight
            torch.cuda.current_stream(self.device).wait_event(self.swap_done)
        src = [s for s, _ in pairs]
        dst = index_tensor([d for _, d in pairs], self.device)
        on_cpu = self.device.type == "cpu"
        src_index, runs = (index_tensor(src, self.device), None) if on_cpu else (None, _runs(src))
        for device_pair, host_pair in zip(self.caches, self.cpu_caches):
            for cache, host in zip(device_pair, host_pair):
                if on_cpu:
                    cache.index_copy_(0, dst, host.index_select(0, src_index))
                    continue
                staged = torch.empty((len(pairs), *cache.shape[1:]), dtype=cache.dtype, device=cache.device)
                for position, block, length in runs:
                    staged[position:position + length].copy_(host[block:block + length], non_blocking=True)
                cache.index_copy_(0, dst, staged)
        self._record_swap()

    def _copy(self, pairs: list[tuple[int, int]]) -> None:
        """Device block → device block (copy-on-write), every layer; one pair of indices for all."""
        src = index_tensor([s for s, _ in pairs], self.device)
        dst = index_tensor([d for _, d in pairs], self.device)
        for k_cache, v_cache in self.caches:
            k_cache.index_copy_(0, dst, k_cache.index_select(0, src))
            v_cache.index_copy_(0, dst, v_cache.index_select(0, src))

    def move_blocks(self, swap_out: list[tuple[int, int]], swap_in: list[tuple[int, int]],
                    copies: list[tuple[int, int]]) -> None:
        """Device → CPU, then CPU → device, then device → device, every layer: in this order,
        because a block swapped out (or in) may be reused by a later move of the same step.
        Pairs are `(source block, destination block)`. See the class for the ordering on CUDA."""
        if (swap_out or swap_in) and not self.cpu_caches:
            raise ValueError("the plan swaps blocks but this rank has no CPU swap pool (swap_space_bytes = 0)")
        if swap_out:
            self._swap_out(swap_out)
        if swap_in:
            self._swap_in(swap_in)
        if copies:
            self._copy(copies)
