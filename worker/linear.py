"""Tensor-parallel linear layers (Megatron-style). Each states its sharding math.

Notation: a full layer computes `y = x W^T + b` with `W: [out, in]`, tp ranks.
Every layer owns a `weight_loader(param, source, shard_id=None)` that copies only this
rank's slice out of `source`, an object indexable like a tensor (a safetensors slice
or a tensor), so a rank never materialises the full weight.
"""
from __future__ import annotations

import torch
from torch import nn

from quire.kernels.packed_gemm import PackedWeight, packing_available
from quire.worker.parallel import ParallelContext


class ProjectionWeight(nn.Module):
    """The weight's home and its GEMM: `project(x)` is `x @ W^T` through `F.linear` until
    `pack_weight()`, and through MKL's packed panels (`kernels.packed_gemm`) after it."""

    packed: PackedWeight | None = None

    def project(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.packed is not None:
            return self.packed.linear(x, bias)
        return nn.functional.linear(x, self.weight, bias)

    @property
    def weight_shape(self) -> tuple[int, int]:
        """`(out, in)` of this rank's weight, packed or not."""
        if self.packed is not None:
            return self.packed.out_features, self.packed.in_features
        return tuple(self.weight.shape)

    def pack_weight(self) -> bool:
        """Repack the loaded weight for MKL's GEMM and free the original (the packed panels take
        its bytes); a no-op returning False where the weight cannot be packed (not fp32 on
        the CPU). Call after loading: the layer has no `weight` parameter (and no
        `weight_loader` target) afterwards."""
        if self.packed is not None or not packing_available(self.weight):
            return False
        self.packed = PackedWeight(self.weight.data)
        self.weight = None
        return True


def _load_rows(param: torch.Tensor, source, start: int, length: int, dst_offset: int = 0) -> None:
    """Copy rows `[start, start+length)` of `source` into rows `[dst_offset, ...)` of `param`."""
    chunk = source[start:start + length]
    param.data[dst_offset:dst_offset + length].copy_(torch.as_tensor(chunk).to(param.dtype))


class ColumnParallelLinear(ProjectionWeight):
    """Splits `W` by output rows: rank r holds `W[r*out/tp:(r+1)*out/tp, :]` (and that slice
    of `b`) and produces its slice of `y`; no communication. Input is replicated."""

    def __init__(self, in_features: int, out_features: int, bias: bool, ctx: ParallelContext, dtype: torch.dtype):
        super().__init__()
        self.ctx = ctx
        self.out_per_rank = out_features // ctx.world_size
        ctx.shard_range(out_features)  # validates divisibility
        self.weight = nn.Parameter(torch.empty(self.out_per_rank, in_features, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(self.out_per_rank, dtype=dtype), requires_grad=False) if bias else None

    def weight_loader(self, param: nn.Parameter, source, shard_id=None) -> None:
        _load_rows(param, source, self.ctx.rank * self.out_per_rank, self.out_per_rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(x, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs fused into one matmul (gate and up projections).
    Rank r holds, for each part i, rows `[r*o_i/tp, (r+1)*o_i/tp)` of `W_i`, stacked in part
    order; `shard_id` is the index of the part a checkpoint tensor belongs to."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool, ctx: ParallelContext, dtype: torch.dtype):
        for size in output_sizes:
            ctx.shard_range(size)
        self.part_sizes = [size // ctx.world_size for size in output_sizes]
        super().__init__(in_features, sum(output_sizes), bias, ctx, dtype)

    def weight_loader(self, param: nn.Parameter, source, shard_id: int = 0) -> None:
        size = self.part_sizes[shard_id]
        _load_rows(param, source, self.ctx.rank * size, size, dst_offset=sum(self.part_sizes[:shard_id]))


class QKVParallelLinear(ColumnParallelLinear):
    """Fused Q, K, V projections. Query heads split evenly: rank r holds heads
    `[r*H/tp, (r+1)*H/tp)`. KV heads split the same way when `tp <= KV`; when `tp > KV`
    each KV head is replicated on `tp/KV` consecutive ranks (rank r holds KV head
    `r * KV // tp`), so every rank's query heads find their KV head locally."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool,
                 ctx: ParallelContext, dtype: torch.dtype):
        tp = ctx.world_size
        if num_heads % tp:
            raise ValueError(f"num_attention_heads={num_heads} is not divisible by tensor-parallel size {tp}")
        if (tp % num_kv_heads) if tp > num_kv_heads else (num_kv_heads % tp):
            raise ValueError(f"num_key_value_heads={num_kv_heads} and tensor-parallel size {tp} do not divide")
        self.head_dim = head_dim
        self.num_heads = num_heads // tp
        self.num_kv_heads = max(1, num_kv_heads // tp)
        self.kv_head_start = (ctx.rank * num_kv_heads // tp) if tp > num_kv_heads else ctx.rank * self.num_kv_heads
        per_rank = (self.num_heads + 2 * self.num_kv_heads) * head_dim
        super().__init__(hidden_size, per_rank * tp, bias, ctx, dtype)

    def weight_loader(self, param: nn.Parameter, source, shard_id: str = "q") -> None:
        d = self.head_dim
        q_size, kv_size = self.num_heads * d, self.num_kv_heads * d
        if shard_id == "q":
            _load_rows(param, source, self.ctx.rank * q_size, q_size)
        else:
            offset = q_size if shard_id == "k" else q_size + kv_size
            _load_rows(param, source, self.kv_head_start * d, kv_size, dst_offset=offset)


class RowParallelLinear(ProjectionWeight):
    """Splits `W` by input columns: rank r holds `W[:, r*in/tp:(r+1)*in/tp]` and consumes its
    slice of `x` (the output of a column-parallel layer), computes a partial `y`, and
    the partials are summed by all-reduce. The bias is added once, after the sum."""

    def __init__(self, in_features: int, out_features: int, bias: bool, ctx: ParallelContext, dtype: torch.dtype):
        super().__init__()
        self.ctx = ctx
        self.in_per_rank = in_features // ctx.world_size
        ctx.shard_range(in_features)
        self.weight = nn.Parameter(torch.empty(out_features, self.in_per_rank, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None

    def weight_loader(self, param: nn.Parameter, source, shard_id=None) -> None:
        if param.dim() == 1:  # bias: replicated
            param.data.copy_(torch.as_tensor(source[:]).to(param.dtype))
            return
        start = self.ctx.rank * self.in_per_rank
        chunk = source[:, start:start + self.in_per_rank]
        param.data.copy_(torch.as_tensor(chunk).to(param.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ctx.all_reduce(self.project(x))
        return y if self.bias is None else y + self.bias
