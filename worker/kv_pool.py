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


class KVPool:
    """One K and one V tensor per layer, each `[num_blocks, block_size, kv_heads, head_dim]`,
    where `kv_heads` is this rank's share of the KV heads (the `spec`'s geometry). Block ids
    are the controller's: block `b` of every layer belongs to the same request.
    `num_cpu_blocks` blocks of the same shape in host memory (pinned on CUDA) hold
    swapped-out requests."""

    def __init__(self, spec: KVCacheSpec, num_blocks: int, block_size: int, device: torch.device,
                 num_cpu_blocks: int = 0):
        shape = (num_blocks, block_size, spec.num_kv_heads, spec.head_size)
        dtype = spec.dtype
        self.spec = spec
        self.num_blocks, self.block_size, self.num_cpu_blocks = num_blocks, block_size, num_cpu_blocks
        self.caches = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(spec.num_layers)
        ]
        pin = device.type == "cuda"
        cpu_shape = (num_cpu_blocks, *shape[1:])
        self.cpu_caches = [
            (torch.zeros(cpu_shape, dtype=dtype, pin_memory=pin), torch.zeros(cpu_shape, dtype=dtype, pin_memory=pin))
            for _ in range(spec.num_layers if num_cpu_blocks else 0)
        ]

    @staticmethod
    def _move(sources: list, destinations: list, pairs: list[tuple[int, int]]) -> None:
        if not pairs:
            return
        src = torch.tensor([s for s, _ in pairs], dtype=torch.long)
        dst = torch.tensor([d for _, d in pairs], dtype=torch.long)
        for (src_k, src_v), (dst_k, dst_v) in zip(sources, destinations):
            index = src.to(src_k.device)
            dst_index = dst.to(dst_k.device)
            dst_k.index_copy_(0, dst_index, src_k.index_select(0, index).to(dst_k.device))
            dst_v.index_copy_(0, dst_index, src_v.index_select(0, index).to(dst_v.device))

    def move_blocks(self, swap_out: list[tuple[int, int]], swap_in: list[tuple[int, int]],
                    copies: list[tuple[int, int]]) -> None:
        """Device → CPU, then CPU → device, then device → device, every layer: in this order,
        because a block swapped out (or in) may be reused by a later move of the same step."""
        if (swap_out or swap_in) and not self.cpu_caches:
            raise ValueError("the plan swaps blocks but this rank has no CPU swap pool (swap_space_bytes = 0)")
        self._move(self.caches, self.cpu_caches, swap_out)
        self._move(self.cpu_caches, self.caches, swap_in)
        self._move(self.caches, self.caches, copies)
