"""Executors carry StepPlans to the workers and bring back rank 0's StepResult.

Every transport sends the same `quire.v1.Worker` protobuf messages to every rank; only
the way they travel differs: `InprocExecutor` (one rank in this process; it still
serialises and parses every message) and `GrpcExecutor` (worker processes at given
addresses, started by hand, by `LocalWorkerLauncher`, or as Ray actors).
"""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass

from quire.protos import worker_pb2 as pb
from quire.protos.step import StepPlan, StepResult

logger = logging.getLogger(__name__)


class WorkerFailure(RuntimeError):
    """A worker died, hung or failed a call; the message names the rank."""


@dataclass
class WorkerSetup:
    """What an executor needs to bring workers up."""

    model_path: str
    dtype: str
    seed: int
    max_model_len: int
    block_size: int
    max_num_batched_tokens: int
    kv_cache_memory: int
    gpu_memory_utilization: float
    num_kv_blocks: int | None
    dist_init_method: str = ""
    # Bytes of host memory per rank for KV blocks off the device: swap preemption's pool and the
    # prefix cache's host tier, one pool.
    swap_space: int = 0
    kv_cache_dtype: str = "auto"  # the KV cache's format: auto (the model's dtype) | int8 | fp8_e4m3
    # The cap on running requests: the profiling step samples this many rows (as the token
    # budget allows), so the KV budget leaves room for a full batch's sampler temporaries.
    # 0 means unknown and profiles one row; the engine always sets it.
    max_num_seqs: int = 0
    # No CUDA graphs for decode steps (they are captured up to max_num_seqs on CUDA otherwise).
    enforce_eager: bool = False


class Executor(ABC):
    world_size: int = 1
    runs_apart: bool = False  # the workers compute while the controller runs (other processes)

    def __init__(self):
        self._results: deque[StepResult | WorkerFailure] = deque()  # of steps submitted, not collected

    @abstractmethod
    def _call_all(self, method: str, requests: list) -> list:
        """Send `requests[r]` to rank r (all ranks at once); return every rank's response,
        or raise WorkerFailure as soon as any rank fails."""

    def _call(self, method: str, request):
        return self._call_all(method, [request] * self.world_size)[0]

    def start(self, setup: WorkerSetup) -> tuple[int, int]:
        """Load the model on every rank, size and allocate the KV pool. Returns the device and
        CPU (host pool) block counts: the minimum over ranks of what each holds."""
        self._call_all("LoadModel", [pb.LoadModelRequest(
            model_path=setup.model_path, dtype=setup.dtype, rank=rank, world_size=self.world_size, seed=setup.seed,
            max_model_len=setup.max_model_len, dist_init_method=setup.dist_init_method,
            kv_cache_dtype=setup.kv_cache_dtype)
            for rank in range(self.world_size)])
        num_blocks = setup.num_kv_blocks
        if num_blocks is None:
            profiles = self._call_all("ProfileMemory", [pb.ProfileMemoryRequest(
                block_size=setup.block_size, max_num_batched_tokens=setup.max_num_batched_tokens,
                max_num_seqs=setup.max_num_seqs, gpu_memory_utilization=setup.gpu_memory_utilization,
                kv_cache_memory_bytes=setup.kv_cache_memory, enforce_eager=setup.enforce_eager)] * self.world_size)
            num_blocks = int(min(p.num_blocks for p in profiles))
            logger.info("KV blocks each rank can hold: %s", [int(p.num_blocks) for p in profiles])
        if num_blocks < 1:
            raise RuntimeError("no memory is left for the KV cache; lower max_num_batched_tokens or use a smaller model")
        allocated = self._call_all("AllocateKVCache", [pb.AllocateKVCacheRequest(
            num_blocks=num_blocks, block_size=setup.block_size, swap_space_bytes=setup.swap_space,
            max_num_seqs=setup.max_num_seqs, enforce_eager=setup.enforce_eager)] * self.world_size)
        return num_blocks, int(min(a.num_cpu_blocks for a in allocated))

    def submit(self, plan: StepPlan) -> None:
        """Launch a step. Steps run in the order submitted, each after the one before; up to
        two may be in flight. Never raises WorkerFailure: `collect` does. This default runs the
        step right here and keeps its result; executors whose workers `runs_apart` return
        at once, and the step runs while the controller goes on."""
        try:
            self._results.append(self.execute(plan))
        except WorkerFailure as failure:
            self._results.append(failure)

    def collect(self) -> StepResult:
        """Rank 0's result of the oldest step in flight (waiting for it); raises WorkerFailure."""
        result = self._results.popleft()
        if isinstance(result, WorkerFailure):
            raise result
        return result

    def execute(self, plan: StepPlan) -> StepResult:
        """Run one step, with no other in flight, and return rank 0's result."""
        return StepResult.from_pb(self._call("ExecuteStep", plan.to_pb()))

    def check_health(self) -> None:
        """Raise WorkerFailure naming the rank when a worker is dead or unresponsive."""
        self._call("Health", pb.HealthRequest())

    def shutdown(self) -> None:
        self._call("Shutdown", pb.ShutdownRequest())
