"""This rank's shard of the paged KV cache."""
from __future__ import annotations

import torch


class KVPool:
    """One K and one V tensor per layer, each `[num_blocks, block_size, kv_heads, head_dim]`,
    where `kv_heads` is this rank's share of the KV heads. Block ids are the controller's:
    block `b` of every layer belongs to the same request."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.caches = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(num_layers)
        ]

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """K and V bytes of one block across all layers on this rank."""
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8
