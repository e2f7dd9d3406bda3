"""Engine configuration: what to serve, how much KV cache, how to schedule, how to parallelise."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from quire.protos.kv_format import KV_CACHE_DTYPES


@dataclass
class ModelConfig:
    model: str | None = None        # checkpoint directory (`LLM` and `quire serve` default to the built-in model)
    tokenizer: str | None = None    # defaults to the model directory
    skip_tokenizer_init: bool = False  # no tokenizer: token-id prompts only, no text out
    dtype: str = "auto"             # auto | float32 | float16 | bfloat16
    max_model_len: int | None = None  # defaults to the checkpoint's context length
    seed: int = 0
    # Run every step eagerly: no CUDA graphs for decode steps (on CUDA they are the default).
    enforce_eager: bool = False


@dataclass
class CacheConfig:
    block_size: int = 16
    num_kv_blocks: int | None = None   # override the measured capacity
    kv_cache_memory: int | None = None  # bytes of KV cache per rank; None: measured on a GPU, 512 MiB on the CPU
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    preemption_mode: str = "recompute"  # recompute | swap
    swap_space: int = 1 << 30           # bytes of CPU swap pool per rank (allocated in swap mode only)
    # KV cache format: auto (the model's dtype) | int8 | fp8_e4m3 (one-byte codes with a float16
    # scale per token and KV head: about half bf16's bytes per token).
    kv_cache_dtype: str = "auto"
    # Bytes of host memory per rank for the prefix cache's host tier (0: none). The workers
    # allocate it with the swap space as one host pool.
    kv_host_memory: int = 0
    # Secret key of the prefix cache's block hashes, hex (None: a fresh one per engine). The
    # replicas of one deployment share it, so a router can compute their hashes; never sent to clients.
    hash_seed: str | None = None
    # Publish the prefix cache's changes (KV events) for a router to mirror.
    kv_events: bool = False


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256             # cap on running requests
    max_num_batched_tokens: int = 2048  # token budget of one step
    # Plan step N+1 while step N runs, naming N's sampled tokens by placeholder (None: where the
    # workers run apart from the controller, whose round trip this then hides).
    async_scheduling: bool | None = None
    # Share of KV blocks that admitting a new request must leave free while others run (for
    # their next tokens: admitting into the last blocks would only preempt a few steps later).
    admission_watermark: float = 0.01


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1
    # auto: inproc for one rank, ray for more | inproc | ray | workers (gRPC workers at
    # worker_addresses, or launched on this host when none are given)
    executor: str = "auto"
    worker_addresses: list[str] | None = None
    dist_init_method: str | None = None  # torch.distributed URL for workers started by hand
    ray_address: str | None = None       # join this Ray cluster (else $RAY_ADDRESS, else start one)
    # After a worker dies: bring fresh workers up and replay every request from its tokens,
    # at most this many times in the engine's life (0: fail the requests instead).
    max_worker_restarts: int = 2
    # CPU workers that quire starts on this host get disjoint cores, one core left to the
    # controller (not more ranks than cores minus one: else the OS places every thread).
    bind_cpu_cores: bool = True

    @property
    def resolved_executor(self) -> str:
        if self.executor != "auto":
            return self.executor
        return "inproc" if self.tensor_parallel_size == 1 and not self.worker_addresses else "ray"


@dataclass
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    @classmethod
    def from_kwargs(cls, **kwargs) -> EngineConfig:
        """Build from flat keyword arguments (`block_size=32`, ...); unknown names raise TypeError."""
        sections = {}
        for section in fields(cls):
            section_cls = section.default_factory
            names = {f.name for f in fields(section_cls)}
            sections[section.name] = section_cls(**{k: kwargs.pop(k) for k in list(kwargs) if k in names})
        if kwargs:
            raise TypeError(f"unknown engine arguments: {sorted(kwargs)}")
        config = cls(**sections)
        config.validate()
        return config

    def validate(self) -> None:
        def positive(section, name):
            value = getattr(section, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"`{name}` must be a positive integer (got {value!r})")

        positive(self.cache, "block_size")
        positive(self.cache, "num_kv_blocks")
        positive(self.scheduler, "max_num_seqs")
        positive(self.scheduler, "max_num_batched_tokens")
        positive(self.parallel, "tensor_parallel_size")
        positive(self.model, "max_model_len")
        positive(self.cache, "kv_cache_memory")
        watermark = self.scheduler.admission_watermark
        if isinstance(watermark, bool) or not isinstance(watermark, (int, float)) or not 0 <= watermark < 1:
            raise ValueError(f"`admission_watermark` must be a share of the KV blocks in [0, 1) (got {watermark!r})")
        if not 0 < self.cache.gpu_memory_utilization <= 1:
            raise ValueError(f"`gpu_memory_utilization` must be in (0, 1] (got {self.cache.gpu_memory_utilization})")
        if not isinstance(self.parallel.max_worker_restarts, int) or self.parallel.max_worker_restarts < 0:
            raise ValueError(f"`max_worker_restarts` must be an integer >= 0 (got {self.parallel.max_worker_restarts!r})")
        if self.cache.preemption_mode not in ("recompute", "swap"):
            raise ValueError(f"`preemption_mode` must be recompute or swap (got {self.cache.preemption_mode!r})")
        for name in ("swap_space", "kv_host_memory"):
            value = getattr(self.cache, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"`{name}` must be a non-negative number of bytes (got {value!r})")
        if self.cache.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"`kv_cache_dtype` must be one of {', '.join(KV_CACHE_DTYPES)} "
                             f"(got {self.cache.kv_cache_dtype!r})")
        seed = self.cache.hash_seed
        if seed is not None:
            try:
                seed_bytes = bytes.fromhex(seed) if isinstance(seed, str) else None
            except ValueError:
                seed_bytes = None
            if seed_bytes is None or not 16 <= len(seed_bytes) <= 64:
                raise ValueError("`hash_seed` must be 16 to 64 bytes written in hex")
        if self.model.skip_tokenizer_init and self.model.tokenizer is not None:
            raise ValueError("`tokenizer`: give a tokenizer (--tokenizer) or none (--skip-tokenizer-init), not both")
        if self.model.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ValueError(f"`dtype` must be auto, float32, float16 or bfloat16 (got {self.model.dtype!r})")
        parallel = self.parallel
        if parallel.executor not in ("auto", "inproc", "ray", "workers"):
            raise ValueError(f"`executor` must be auto, inproc, ray or workers (got {parallel.executor!r})")
        if parallel.resolved_executor == "inproc" and parallel.tensor_parallel_size != 1:
            raise ValueError("`executor` inproc runs one rank; use ray or workers for tensor_parallel_size > 1")
        if parallel.worker_addresses and len(parallel.worker_addresses) != parallel.tensor_parallel_size:
            raise ValueError(f"`worker_addresses` lists {len(parallel.worker_addresses)} workers for "
                             f"tensor_parallel_size={parallel.tensor_parallel_size}")
