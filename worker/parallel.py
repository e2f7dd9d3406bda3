"""The tensor-parallel group of one worker: rank, size and the collectives the layers need.

One instance per worker, passed explicitly to every parallel layer; there is no global
process-group state in quire. With `world_size == 1` every collective is the identity,
so a single-rank worker never initializes torch.distributed.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelContext:
    rank: int = 0
    world_size: int = 1
    group: object | None = None  # a torch.distributed ProcessGroup when world_size > 1

    @classmethod
    def initialize(cls, rank: int, world_size: int, init_method: str, device: torch.device) -> ParallelContext:
        """Join the tensor-parallel group (NCCL on CUDA, gloo on CPU); identity for one rank.

        The group is ready on return: NCCL's communicator and buffers are created now (bound
        to `device`, and warmed by one tiny all-reduce), not lazily at the first collective,
        so memory profiling, which runs next, sees them as used memory. Collective on all ranks."""
        if world_size == 1:
            return cls()
        cuda = device.type == "cuda"
        if not dist.is_initialized():
            # Bounded, so a rank whose peer died fails instead of waiting forever. device_id makes
            # NCCL set its communicator up eagerly, on this rank's device.
            dist.init_process_group("nccl" if cuda else "gloo", init_method=init_method, rank=rank,
                                    world_size=world_size, timeout=timedelta(seconds=120),
                                    **({"device_id": _indexed(device)} if cuda else {}))
        context = cls(rank=rank, world_size=world_size, group=dist.group.WORLD)
        context.all_reduce(torch.zeros(1, device=device))
        if cuda:
            torch.cuda.synchronize(device)
        return context

    def shard_range(self, size: int) -> tuple[int, int]:
        """This rank's `[start, end)` of a dimension of `size` split evenly (size % world_size == 0)."""
        if size % self.world_size:
            raise ValueError(f"dimension {size} is not divisible by tensor-parallel size {self.world_size}")
        per_rank = size // self.world_size
        return self.rank * per_rank, (self.rank + 1) * per_rank

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place; returns `tensor`."""
        if self.world_size > 1:
            dist.all_reduce(tensor, group=self.group)
        return tensor

    def gather_to_first(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor | None:
        """Concatenate every rank's `tensor` along `dim` on rank 0; other ranks get None."""
        if self.world_size == 1:
            return tensor
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)] if self.rank == 0 else None
        dist.gather(tensor, parts, dst=0, group=self.group)
        return torch.cat(parts, dim=dim) if self.rank == 0 else None

    def broadcast_from_first(self, tensor: torch.Tensor) -> torch.Tensor:
        """Overwrite `tensor` on every rank with rank 0's, in place; returns `tensor`."""
        if self.world_size > 1:
            dist.broadcast(tensor, src=0, group=self.group)
        return tensor


def _indexed(device: torch.device) -> torch.device:
    """`device` with its index: a bare "cuda" means the current device (NCCL needs the index)."""
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())
