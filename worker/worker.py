"""One tensor-parallel rank: its device, model shard, KV pool shard and ModelRunner.

`Worker` speaks the `quire.v1.Worker` messages directly, so every transport (the
in-process executor, and the gRPC servicer) drives the same object with the same
protobufs. It never imports the controller.
"""
from __future__ import annotations

import logging
import os

import torch

from quire.kernels.backend import AttentionBackend, select_backend
from quire.protos import worker_pb2 as pb
from quire.protos.step import NewRequestData, SamplingSpec, StepPlan
from quire.worker.kv_pool import KVCacheSpec, KVPool
from quire.worker.loader import load_model, parse_dtype
from quire.worker.model_runner import ModelRunner
from quire.worker.parallel import ParallelContext
from quire.worker.sampler import Sampler

logger = logging.getLogger(__name__)

# The KV budget of a CPU worker when the controller gives none (a CPU has no device memory to measure).
DEFAULT_CPU_KV_CACHE_BYTES = 512 << 20


def default_device(rank: int) -> torch.device:
    """`QUIRE_DEVICE` if set, else this rank's CUDA device when there is one, else the CPU."""
    if os.environ.get("QUIRE_DEVICE"):
        return torch.device(os.environ["QUIRE_DEVICE"])
    if torch.cuda.is_available():
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device("cpu")


class Worker:
    def __init__(self, device: torch.device | None = None):
        self.device = device
        self.model = None
        self.runner: ModelRunner | None = None
        self.ctx = ParallelContext()
        # Set by load_model: what this rank's KV cache looks like, and the attention backend for it.
        self.kv_spec: KVCacheSpec | None = None
        self.attention: AttentionBackend | None = None

    def load_model(self, request: pb.LoadModelRequest) -> pb.LoadModelResponse:
        """Join the TP group, load this rank's weight shard, and choose the attention backend for
        a cache on this device. Mutates: model, context, kv_spec, attention."""
        self.device = self.device or default_device(request.rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.ctx = ParallelContext.initialize(request.rank, request.world_size, request.dist_init_method, self.device)
        self.dtype = parse_dtype(request.dtype)
        self.seed = request.seed
        self.model = load_model(request.model_path, self.ctx, self.dtype, self.device, request.max_model_len)
        config = self.model.config
        self.kv_spec = self.model.kv_cache_spec()
        # One choice per worker: its KV cache lives on self.device for good.
        self.attention = select_backend(self.device)
        weight_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in self.model.parameters()}.values())
        logger.info("rank %d loaded %s (%.1f MiB of weights) on %s", self.ctx.rank, request.model_path,
                    weight_bytes / 2**20, self.device)
        return pb.LoadModelResponse(weight_bytes=weight_bytes, vocab_size=config.vocab_size)

    def profile_memory(self, request: pb.ProfileMemoryRequest) -> pb.ProfileMemoryResponse:
        """How many KV blocks fit: an explicit byte budget, or on CUDA the share of device
        memory left after the weights and the activation peak of a full-budget step."""
        per_block = self.kv_spec.bytes_per_block(request.block_size)
        budget = request.kv_cache_memory_bytes or (DEFAULT_CPU_KV_CACHE_BYTES if self.device.type != "cuda" else 0)
        if budget > 0:
            return pb.ProfileMemoryResponse(num_blocks=budget // per_block, bytes_per_block=per_block)
        total = torch.cuda.get_device_properties(self.device).total_memory
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        self._dummy_step(request.block_size, request.max_num_batched_tokens)
        peak = torch.cuda.max_memory_allocated(self.device)
        free_for_kv = int(total * request.gpu_memory_utilization) - peak
        torch.cuda.empty_cache()
        return pb.ProfileMemoryResponse(num_blocks=max(0, free_for_kv // per_block), bytes_per_block=per_block,
                                        total_memory_bytes=total, peak_activation_bytes=peak)

    def _dummy_step(self, block_size: int, num_tokens: int) -> None:
        num_blocks = -(-num_tokens // block_size)
        pool = KVPool(self.kv_spec, num_blocks, block_size, self.device)
        runner = ModelRunner(self.model, self.ctx, self.device, pool, self.attention, Sampler(0))
        plan = StepPlan(step_id=0, new_requests=[NewRequestData(1, "__profile", [0] * num_tokens,
                                                                SamplingSpec(temperature=0),
                                                                list(range(num_blocks)), 0)],
                        num_scheduled_tokens={1: num_tokens})
        runner.execute(plan)
        del runner, pool

    def allocate_kv_cache(self, request: pb.AllocateKVCacheRequest) -> pb.AllocateKVCacheResponse:
        """Allocate this rank's KV pool and the runner that uses it. Drops any request state."""
        per_block = self.kv_spec.bytes_per_block(request.block_size)
        num_cpu_blocks = request.swap_space_bytes // per_block
        pool = KVPool(self.kv_spec, request.num_blocks, request.block_size, self.device, num_cpu_blocks=num_cpu_blocks)
        self.runner = ModelRunner(self.model, self.ctx, self.device, pool, self.attention, Sampler(self.seed))
        logger.info("rank %d: KV pool of %d blocks x %d tokens (+%d CPU swap blocks), %s attention", self.ctx.rank,
                    request.num_blocks, request.block_size, num_cpu_blocks, self.attention.name)
        return pb.AllocateKVCacheResponse(num_cpu_blocks=num_cpu_blocks)

    def execute_step(self, plan: pb.StepPlan) -> pb.StepResult:
        if self.runner is None:
            raise RuntimeError("ExecuteStep before AllocateKVCache")
        return self.runner.execute(StepPlan.from_pb(plan)).to_pb()

    def health(self, request: pb.HealthRequest | None = None) -> pb.HealthResponse:
        return pb.HealthResponse(ready=self.runner is not None, rank=self.ctx.rank)

    def shutdown(self, request: pb.ShutdownRequest | None = None) -> pb.ShutdownResponse:
        self.runner = self.model = None
        if self.ctx.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        return pb.ShutdownResponse()
