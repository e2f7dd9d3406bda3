"""One tensor-parallel rank: its device, model shard, KV pool shard and ModelRunner.

`Worker` speaks the `quire.v1.Worker` messages directly, so every transport (the
in-process executor, and the gRPC servicer) drives the same object with the same
protobufs. It never imports the controller.
"""
from __future__ import annotations

import logging
import os

import torch

from quire.kernels import kv_quant
from quire.kernels.backend import AttentionBackend, select_backend
from quire.protos import worker_pb2 as pb
from quire.protos.step import StepPlan
from quire.worker.cuda_graphs import (CAPTURE, DecodeGraphSpec, batch_size_ladder, decode_graph_mode,
                                      graph_memory_reserve, max_padding)
from quire.worker.kv_pool import KVCacheSpec, KVPool
from quire.worker.loader import load_model, parse_dtype
from quire.worker.memory_profile import dummy_request_lengths, dummy_step_plan, kv_cache_budget
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
        self.max_model_len = 0  # set by load_model
        self.attention: AttentionBackend | None = None

    def load_model(self, request: pb.LoadModelRequest) -> pb.LoadModelResponse:
        """Join the TP group, load this rank's weight shard, and choose the attention backend for
        a cache on this device, in the format `kv_cache_dtype` names ("" or "auto": the model's
        dtype; "int8", "fp8_e4m3": quantized, `kernels.kv_quant`). An unknown name raises
        ValueError naming the field, before anything is loaded. Mutates: model, context,
        kv_spec, attention."""
        kv_cache_dtype = request.kv_cache_dtype or "auto"
        if kv_cache_dtype not in kv_quant.KV_CACHE_DTYPES:
            raise ValueError(f"`kv_cache_dtype` must be one of {', '.join(kv_quant.KV_CACHE_DTYPES)} "
                             f"(got {kv_cache_dtype!r})")
        self.device = self.device or default_device(request.rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.ctx = ParallelContext.initialize(request.rank, request.world_size, request.dist_init_method, self.device)
        self.dtype = parse_dtype(request.dtype)
        self.seed = request.seed
        self.max_model_len = request.max_model_len  # the longest sequence, so the longest dummy request
        self.model = load_model(request.model_path, self.ctx, self.dtype, self.device, request.max_model_len)
        config = self.model.config
        self.kv_spec = self.model.kv_cache_spec(kv_cache_dtype)  # ProfileMemory and AllocateKVCache size by it
        # One choice per worker: its KV cache lives on self.device for good.
        self.attention = select_backend(self.device)
        if self.attention.name == "cpu":  # the C++ kernels are loaded: the layers' elementwise steps too
            self.model.use_cpu_kernels()
        self.model.pack_gemm_weights()
        weight_bytes = self.model.weight_bytes()
        logger.info("rank %d loaded %s (%.1f MiB of weights) on %s", self.ctx.rank, request.model_path,
                    weight_bytes / 2**20, self.device)
        return pb.LoadModelResponse(weight_bytes=weight_bytes, vocab_size=config.vocab_size)

    def profile_memory(self, request: pb.ProfileMemoryRequest) -> pb.ProfileMemoryResponse:
        """How many KV blocks fit: an explicit byte budget (`kv_cache_memory_bytes`), else the
        measured budget on CUDA (`memory_profile.kv_cache_budget` on the device's free memory
        after the dummy step), else the CPU default. Without an explicit budget the dummy step
        runs on every device, so a step the scheduler may plan that cannot run fails here, at
        startup, and not on the first full batch. Where decode steps will be captured as CUDA
        graphs (`cuda_graphs.decode_graph_mode`), the measured budget also leaves out an estimate
        of their memory pool (`cuda_graphs.graph_memory_reserve`) and the padding rows' scratch
        blocks."""
        per_block = self.kv_spec.bytes_per_block(request.block_size)
        if request.kv_cache_memory_bytes > 0:
            return pb.ProfileMemoryResponse(num_blocks=request.kv_cache_memory_bytes // per_block,
                                            bytes_per_block=per_block)
        if self.device.type != "cuda":
            _, sampled_rows, _ = self.dummy_step(request.block_size, request.max_num_batched_tokens,
                                                 request.max_num_seqs)
            return pb.ProfileMemoryResponse(num_blocks=DEFAULT_CPU_KV_CACHE_BYTES // per_block,
                                            bytes_per_block=per_block, kv_cache_bytes=DEFAULT_CPU_KV_CACHE_BYTES,
                                            dummy_sampled_rows=sampled_rows)
        # Cached blocks left by loading must not count as the step's activations.
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        _, sampled_rows, allocated_after = self.dummy_step(request.block_size, request.max_num_batched_tokens,
                                                           request.max_num_seqs)
        peak = torch.cuda.max_memory_allocated(self.device)
        # Give the step's cached activations back, so that free memory counts only what stays in use.
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        budget = kv_cache_budget(total, free, peak, allocated_after, request.gpu_memory_utilization)
        # Captured decode graphs keep a memory pool of their own for good: an estimate of it is
        # kept out of the KV budget (the measured size is logged after capture), and so are the
        # KV pool's scratch blocks for padding rows.
        graphs = 0
        if request.max_num_seqs > 0 and self._graph_mode(request.enforce_eager) == CAPTURE:
            graphs = (graph_memory_reserve(peak - allocated_after, request.max_num_seqs,
                                           request.max_num_batched_tokens)
                      + max_padding(batch_size_ladder(request.max_num_seqs)) * per_block)
            budget = max(0, budget - graphs)
        logger.info("rank %d: %.0f of %.0f MiB free after profiling, activation peak %.0f MiB, CUDA graphs "
                    "reserve %.0f MiB, KV budget %.0f MiB (utilization %.2f)", self.ctx.rank, free / 2**20,
                    total / 2**20, (peak - allocated_after) / 2**20, graphs / 2**20, budget / 2**20,
                    request.gpu_memory_utilization)
        return pb.ProfileMemoryResponse(num_blocks=budget // per_block, bytes_per_block=per_block,
                                        total_memory_bytes=total, peak_activation_bytes=peak - allocated_after,
                                        free_memory_bytes=free, used_memory_bytes=total - free,
                                        kv_cache_bytes=budget, dummy_sampled_rows=sampled_rows)

    def dummy_step(self, block_size: int, max_num_batched_tokens: int,
                   max_num_seqs: int) -> tuple[list[int], int, int]:
        """Run the heaviest step the scheduler may plan (`memory_profile.dummy_request_lengths`:
        the whole token budget in requests of at most max_model_len tokens, sampling up to
        max_num_seqs rows with every sampler feature on) in a scratch KV pool of its own.

        Returns the requests' lengths, the rows sampled (on rank 0; 0 on other ranks) and the
        bytes the CUDA allocator holds right after the step, scratch pool still allocated (0
        off CUDA). Raises RuntimeError when any dummy request fails. Needs a loaded model;
        leaves no state behind (the serving runner is untouched)."""
        lengths = dummy_request_lengths(max_num_batched_tokens, self.max_model_len, max_num_seqs)
        plan, num_blocks = dummy_step_plan(lengths, block_size)
        pool = KVPool(self.kv_spec, num_blocks, block_size, self.device)
        runner = ModelRunner(self.model, self.ctx, self.device, pool, self.attention, Sampler(0))
        result = runner.execute(plan)
        allocated_after = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0
        del runner, pool
        if result.errors:
            raise RuntimeError(f"the profiling step of {len(lengths)} requests ({sum(lengths)} tokens) failed: "
                               f"{next(iter(result.errors.values()))}")
        return lengths, len(result.sampled_handles), allocated_after

    def allocate_kv_cache(self, request: pb.AllocateKVCacheRequest) -> pb.AllocateKVCacheResponse:
        """Allocate this rank's KV pool and the runner that uses it. Drops any request state."""
        per_block = self.kv_spec.bytes_per_block(request.block_size)
        num_cpu_blocks = request.swap_space_bytes // per_block
        mode = self._graph_mode(request.enforce_eager) if request.max_num_seqs > 0 else None
        graphs = None
        if mode is not None:
            # Scratch blocks past the controller's, one per padding row a batch may get.
            scratch = list(range(request.num_blocks,
                                 request.num_blocks + max_padding(batch_size_ladder(request.max_num_seqs))))
            graphs = DecodeGraphSpec(mode, request.max_num_seqs, self.max_model_len, scratch)
        pool = KVPool(self.kv_spec, request.num_blocks + (len(graphs.scratch_blocks) if graphs else 0),
                      request.block_size, self.device, num_cpu_blocks=num_cpu_blocks)
        self.runner = ModelRunner(self.model, self.ctx, self.device, pool, self.attention, Sampler(self.seed),
                                  decode_graphs=graphs)
        # Every kernel variant serving will launch is compiled now, not on a request's first steps.
        warmed = self.attention.warm_up(
            num_heads=self.model.config.num_attention_heads // self.ctx.world_size,
            num_kv_heads=self.kv_spec.num_kv_heads, head_dim=self.kv_spec.head_size, block_size=request.block_size,
            dtype=self.dtype, device=self.device, kv_cache_dtype=self.kv_spec.dtype)
        logger.info("rank %d: KV pool of %d blocks x %d tokens in %s (+%d CPU blocks), %s attention "
                    "(%d kernel variants warmed up in %.1fs)", self.ctx.rank, request.num_blocks, request.block_size,
                    str(self.kv_spec.dtype).removeprefix("torch."), num_cpu_blocks, self.attention.name,
                    warmed.variants, warmed.seconds)
        if mode == CAPTURE:  # after the warm-up: no kernel compiles inside a capture
            self.runner.graphs.capture()
        return pb.AllocateKVCacheResponse(num_cpu_blocks=num_cpu_blocks)

    def _graph_mode(self, enforce_eager: bool) -> str | None:
        """How this rank runs decode steps (`cuda_graphs.decode_graph_mode`)."""
        group = self.ctx.group if self.ctx.world_size > 1 else None
        return decode_graph_mode(self.device, enforce_eager, self.attention,
                                 torch.distributed.get_backend(group) if group is not None else None)

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
