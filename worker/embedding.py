"""Vocabulary-parallel embedding and LM head.

The vocabulary `V` is padded up to a multiple of tp (`V_pad`); rank r holds rows
`[r*V_pad/tp, (r+1)*V_pad/tp)` of the table (padding rows are zero).
Embedding: each rank looks up the ids in its range, zeroes the others, and an
all-reduce sums the partial embeddings. LM head: each rank computes logits for its
vocabulary slice; rank 0 gathers them and drops the padding columns.
"""
from __future__ import annotations

import torch
from torch import nn

from quire.worker.linear import ProjectionWeight
from quire.worker.parallel import ParallelContext


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, ctx: ParallelContext, dtype: torch.dtype):
        super().__init__()
        self.ctx = ctx
        self.vocab_size = vocab_size
        padded = -(-vocab_size // ctx.world_size) * ctx.world_size
        self.rows_per_rank = padded // ctx.world_size
        self.vocab_start = ctx.rank * self.rows_per_rank
        self.weight = nn.Parameter(torch.zeros(self.rows_per_rank, hidden_size, dtype=dtype), requires_grad=False)

    def weight_loader(self, param: nn.Parameter, source, shard_id=None) -> None:
        end = min(self.vocab_start + self.rows_per_rank, self.vocab_size)
        if end > self.vocab_start:
            chunk = torch.as_tensor(source[self.vocab_start:end]).to(param.dtype)
            param.data[: end - self.vocab_start].copy_(chunk)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.ctx.world_size == 1:
            return nn.functional.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.rows_per_rank)
        embedded = nn.functional.embedding(local.masked_fill(outside, 0), self.weight)
        embedded.masked_fill_(outside.unsqueeze(-1), 0)
        return self.ctx.all_reduce(embedded)


class ParallelLMHead(VocabParallelEmbedding, ProjectionWeight):
    """Shares the embedding's sharding; `tie_to` reuses an embedding's weight (tied embeddings).
    `pack_weight()` packs the head's slice for MKL's GEMM; a tied head's packed copy comes on
    top of the embedding table, which the lookups still read."""

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        self.weight = embedding.weight

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """`[n, V]` float32 logits on rank 0; None elsewhere."""
        local = self.project(hidden)
        full = self.ctx.gather_to_first(local, dim=-1)
        return None if full is None else full[:, : self.vocab_size].float()
