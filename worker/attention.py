"""Paged attention as a layer, and the explicit per-step metadata it reads.

`AttentionMetadata` is built once per step by the ModelRunner and passed down the
model; layers never keep step state. Each `Attention` layer writes the step's K/V into
its slots of this rank's KV pool, then attends over the paged context, both through the
worker's one `AttentionBackend` that the metadata carries.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from quire.kernels.backend import AttentionBackend, AttentionPlan


@dataclass
class AttentionMetadata:
    """Flat description of one step's ragged batch; valid for that step only.

    slot_mapping: `[num_tokens]` flat KV slot of each token. block_tables:
    `[num_reqs, max_blocks]` physical block ids (padded with 0). seq_lens[i]: tokens
    of context of request i after this step; query_start_loc: prefix sums of query
    lengths (`num_reqs + 1` entries). `backend` is the worker's attention backend (chosen
    once, at setup); `plan` is its layer-independent plan for the step, built once by the
    runner and shared by every layer. `kv_caches` (and, for a quantized cache, `kv_scales`)
    are the KV pool's tensors, by layer.
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: list[int]
    query_start_loc: list[int]
    backend: AttentionBackend
    # K/V tensors per layer, set by the runner for the step: [num_blocks, block_size, kv_heads, head_dim].
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    plan: AttentionPlan | None = None
    # (k_scale, v_scale) per layer for a quantized cache ([num_blocks, block_size, kv_heads], the
    # KV pool's `scales`); empty or None for an unquantized one.
    kv_scales: list[tuple[torch.Tensor, torch.Tensor]] | None = None


class Attention(nn.Module):
    """Scaled dot-product attention of this rank's heads over the paged KV cache."""

    def __init__(self, layer_index: int, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.layer_index = layer_index
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q: `[T, H*D]`, k/v: `[T, KV*D]` → `[T, H*D]`. Mutates this layer's KV cache."""
        num_tokens = q.shape[0]
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        k_cache, v_cache = meta.kv_caches[self.layer_index]
        # A quantized cache's codes are written and read with their scales; an unquantized one has none.
        k_scale, v_scale = meta.kv_scales[self.layer_index] if meta.kv_scales else (None, None)
        meta.backend.write_kv(k, v, k_cache, v_cache, meta.slot_mapping, k_scale=k_scale, v_scale=v_scale)
        out = meta.backend.attend(q, k_cache, v_cache, meta.plan, self.scale, k_scale=k_scale, v_scale=v_scale)
        return out.reshape(num_tokens, self.num_heads * self.head_dim)
