"""`quire plan`: will a model fit, and how many requests at once, before anyone rents GPUs.

From a checkpoint directory, a config.json, or a built-in preset (config values only;
no weights are read), per GPU: this rank's weight bytes (counted exactly as the
tensor-parallel layers shard them: vocabulary padded to a multiple of tp, KV heads
replicated when tp exceeds their number), an activation reserve for a full-budget step,
KV bytes per token and per block, the blocks and tokens that fit, the requests that run
at once at given prompt/output lengths, and the bandwidth-bound ceiling of decode: a
step must read this rank's weights and the running requests' KV from memory at least
once, so steps/s <= bandwidth / (weight bytes + KV bytes read).

With `data_parallel_size` N (`quire serve -dp N`: N whole replicas, each with its own
tensor_parallel_size ranks and its own KV cache, behind one router) every figure above is
one replica's, and the plan adds the deployment's totals: N x tensor_parallel_size GPUs,
N x the KV tokens, N x the requests that fit and run at once, and N x the decode ceiling
in output tokens/s (replicas share no memory and no bandwidth; the router's cache-aware
placement decides how well their prefix caches are used, which no plan can know).

`kv_cache_dtype` is what `quire serve --kv-cache-dtype` accepts: auto (the weights' dtype),
int8 or fp8_e4m3 (one byte per value plus a 2-byte float16 scale per token and KV head, as
the workers store them: the bytes come from `quire.protos.kv_format`, the workers' own
arithmetic). `kv_host_memory`
(`--kv-host-memory`) is the host memory per rank of the prefix cache's host tier: the plan
reports the tokens it holds, in blocks of the same bytes as the device's.

On a GPU the worker sizes the KV cache the same way from what it measures
(`gpu_memory_utilization` x device memory - weights - the peak of a dummy full-budget
step); without `--gpu-memory` the plan is for the CPU, where the KV budget is
`--kv-cache-memory` exactly as the worker takes it.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from quire.protos import kv_format
from quire.protos.kv_format import KV_CACHE_DTYPES

DTYPE_BYTES = {"float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "half": 2, "bfloat16": 2, "bf16": 2}

# Config values of well-known checkpoints, so a plan needs no files.
PRESETS = {
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                       tie_word_embeddings=False, torch_dtype="bfloat16"),
    "llama-3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                        tie_word_embeddings=False, torch_dtype="bfloat16"),
}


@dataclass
class ModelShape:
    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    qkv_bias: bool
    max_position_embeddings: int
    dtype: str

    @classmethod
    def load(cls, source: str) -> ModelShape:
        """A preset name, a checkpoint directory, or a config.json path."""
        if source.lower() in PRESETS:
            return cls.from_config(source.lower(), PRESETS[source.lower()])
        path = Path(source)
        config_path = path / "config.json" if path.is_dir() else path
        if not config_path.is_file():
            raise ValueError(f"`model` {source!r} is neither a preset ({', '.join(PRESETS)}), a checkpoint "
                             "directory nor a config.json")
        return cls.from_config(path.name if path.is_dir() else path.parent.name, json.loads(config_path.read_text()))

    @classmethod
    def from_config(cls, name: str, config: dict) -> ModelShape:
        heads = config["num_attention_heads"]
        return cls(
            name=name, hidden_size=config["hidden_size"], intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"], num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads, vocab_size=config["vocab_size"],
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=config.get("model_type") == "qwen2" or bool(config.get("attention_bias", False)),
            max_position_embeddings=config.get("max_position_embeddings", 2048),
            dtype=str(config.get("torch_dtype") or config.get("dtype") or "float32"))

    def kv_heads_per_rank(self, tp: int) -> int:
        return max(1, self.num_kv_heads // tp)

    def weight_params_per_rank(self, tp: int) -> int:
        """Parameters one rank holds, as the tensor-parallel layers shard them."""
        h, d = self.hidden_size, self.head_dim
        heads, kv = self.num_heads // tp, self.kv_heads_per_rank(tp)
        qkv = h * (heads + 2 * kv) * d + ((heads + 2 * kv) * d if self.qkv_bias else 0)
        layer = qkv + heads * d * h + 3 * h * (self.intermediate_size // tp) + 2 * h
        vocab_rows = -(-self.vocab_size // tp)  # padded to a multiple of tp, split evenly
        embeddings = vocab_rows * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + embeddings + h

    def kv_bytes_per_token(self, tp: int, dtype: str, kv_cache_dtype: str = "auto") -> int:
        """K and V of one token over all layers, on one rank, scales of a quantized cache included."""
        per_head = kv_format.bytes_per_token_head(self.head_dim, DTYPE_BYTES[dtype], kv_cache_dtype)
        return 2 * self.num_layers * self.kv_heads_per_rank(tp) * per_head

    def activation_bytes(self, tp: int, dtype_bytes: int, max_num_batched_tokens: int, max_num_seqs: int) -> int:
        """Estimated peak of a full-budget step beyond the weights: a few hidden-state copies,
        this rank's q/k/v and MLP intermediates for every token, and fp32 logits for the
        sampled rows (gathered to the whole vocabulary on rank 0)."""
        t, h = max_num_batched_tokens, self.hidden_size
        per_token = 4 * h + (self.num_heads // tp + 2 * self.kv_heads_per_rank(tp)) * self.head_dim \
            + 3 * (self.intermediate_size // tp)
        return t * per_token * dtype_bytes + 2 * min(max_num_seqs, t) * self.vocab_size * 4


@dataclass
class Plan:
    model: str
    tensor_parallel_size: int
    dtype: str
    kv_cache_dtype: str
    block_size: int
    max_model_len: int
    weight_bytes_per_gpu: int
    activation_reserve_bytes: int
    kv_budget_bytes: int
    kv_bytes_per_token: int
    kv_bytes_per_block: int
    num_blocks: int
    tokens: int
    prompt_len: int
    output_len: int
    requests_fit_in_kv: int  # at prompt_len + output_len, by KV memory alone
    concurrent_requests: int  # also capped by max_num_seqs
    concurrency_limited_by: str
    memory_bytes_per_gpu: int | None
    hbm_bandwidth_bytes_per_s: float | None
    decode_steps_per_s_ceiling: float | None
    decode_tokens_per_s_ceiling: float | None
    single_request_tokens_per_s_ceiling: float | None
    allreduce_bytes_per_step_per_gpu: int
    # The prefix cache's host tier (`--kv-host-memory`) per rank, and the tokens it holds.
    kv_host_memory_bytes: int
    host_tier_tokens: int
    # Data parallelism: the fields above are one replica's (per GPU or per replica), these
    # the whole deployment's: data_parallel_size x the per-replica figure.
    data_parallel_size: int
    gpus_needed: int  # data_parallel_size x tensor_parallel_size (ranks, on the CPU)
    total_tokens: int
    total_requests_fit_in_kv: int
    total_concurrent_requests: int
    total_decode_tokens_per_s_ceiling: float | None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def make_plan(shape: ModelShape, tensor_parallel_size: int = 1, dtype: str = "auto", kv_cache_dtype: str = "auto",
              block_size: int = 16, max_model_len: int | None = None, gpu_memory: int | None = None,
              gpu_memory_utilization: float = 0.9, kv_cache_memory: int = 512 << 20,
              max_num_batched_tokens: int = 2048, max_num_seqs: int = 256, prompt_len: int = 1024,
              output_len: int = 256, hbm_bandwidth: float | None = None, data_parallel_size: int = 1,
              kv_host_memory: int = 0) -> Plan:
    """The plan for one configuration; raises ValueError naming the field that cannot work."""
    tp, dp = tensor_parallel_size, data_parallel_size
    if isinstance(dp, bool) or not isinstance(dp, int) or dp < 1:
        raise ValueError(f"`--data-parallel-size` (data_parallel_size) {dp!r} must be a whole number of replicas, "
                         "at least 1")
    if tp < 1 or shape.num_heads % tp:
        raise ValueError(f"`tensor_parallel_size` {tp} must divide num_attention_heads={shape.num_heads}")
    if shape.num_kv_heads % tp and tp % shape.num_kv_heads:
        raise ValueError(f"`tensor_parallel_size` {tp} and num_key_value_heads={shape.num_kv_heads} do not divide")
    if isinstance(kv_host_memory, bool) or not isinstance(kv_host_memory, int) or kv_host_memory < 0:
        raise ValueError(f"`kv_host_memory` must be a non-negative number of bytes (got {kv_host_memory!r})")
    dtype = shape.dtype if dtype == "auto" else dtype
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"`dtype` {dtype!r} is not one of {sorted(DTYPE_BYTES)}")
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"`kv_cache_dtype` {kv_cache_dtype!r} is not one of {', '.join(KV_CACHE_DTYPES)}")
    dtype_bytes = DTYPE_BYTES[dtype]
    max_model_len = max_model_len or shape.max_position_embeddings
    weights = shape.weight_params_per_rank(tp) * dtype_bytes
    per_token = shape.kv_bytes_per_token(tp, dtype, kv_cache_dtype)
    per_block = per_token * block_size
    kv_cache_dtype = dtype if kv_cache_dtype == "auto" else kv_cache_dtype  # reported as what the cache holds
    if gpu_memory is None:  # the CPU: the KV budget is given, activations come out of other memory
        activation, budget = 0, kv_cache_memory
    else:
        activation = shape.activation_bytes(tp, dtype_bytes, max_num_batched_tokens, max_num_seqs)
        budget = int(gpu_memory * gpu_memory_utilization) - weights - activation
        if budget < per_block:
            raise ValueError(f"`gpu_memory` {gpu_memory / 2**30:.1f} GiB x {gpu_memory_utilization} holds the "
                             f"weights ({weights / 2**30:.1f} GiB per GPU) and activations "
                             f"({activation / 2**30:.1f} GiB) but no KV block; raise tensor_parallel_size")
    num_blocks = max(0, budget // per_block)
    length = min(prompt_len + output_len, max_model_len)
    by_memory = num_blocks // -(-length // block_size)
    concurrent = min(by_memory, max_num_seqs)
    steps = tokens_per_s = single = None
    if hbm_bandwidth:
        # Decode at the planned concurrency, each request halfway through its output.
        context = min(prompt_len + output_len // 2, max_model_len)
        read = weights + concurrent * context * per_token
        steps = hbm_bandwidth / read
        tokens_per_s = steps * concurrent
        single = hbm_bandwidth / (weights + min(prompt_len, max_model_len) * per_token)
    # Two all-reduces of [batch, hidden] per layer; a ring moves 2(N-1)/N of it per GPU.
    allreduce = (int(2 * shape.num_layers * concurrent * shape.hidden_size * dtype_bytes * 2 * (tp - 1) / tp)
                 if tp > 1 else 0)
    return Plan(
        model=shape.name, tensor_parallel_size=tp, dtype=dtype, kv_cache_dtype=kv_cache_dtype, block_size=block_size,
        max_model_len=max_model_len, weight_bytes_per_gpu=weights, activation_reserve_bytes=activation,
        kv_budget_bytes=budget, kv_bytes_per_token=per_token, kv_bytes_per_block=per_block, num_blocks=num_blocks,
        tokens=num_blocks * block_size, prompt_len=prompt_len, output_len=output_len, requests_fit_in_kv=by_memory,
        concurrent_requests=concurrent, concurrency_limited_by="KV memory" if by_memory < max_num_seqs
        else "max_num_seqs", memory_bytes_per_gpu=gpu_memory, hbm_bandwidth_bytes_per_s=hbm_bandwidth,
        decode_steps_per_s_ceiling=steps, decode_tokens_per_s_ceiling=tokens_per_s,
        single_request_tokens_per_s_ceiling=single, allreduce_bytes_per_step_per_gpu=allreduce,
        kv_host_memory_bytes=kv_host_memory, host_tier_tokens=kv_host_memory // per_block * block_size,
        data_parallel_size=dp, gpus_needed=dp * tp, total_tokens=dp * num_blocks * block_size,
        total_requests_fit_in_kv=dp * by_memory, total_concurrent_requests=dp * concurrent,
        total_decode_tokens_per_s_ceiling=None if tokens_per_s is None else dp * tokens_per_s)


def format_plan(plan: Plan) -> str:
    gib, gb = 2**30, 1e9
    dp, tp = plan.data_parallel_size, plan.tensor_parallel_size
    lines = [f"quire plan: {plan.model}, tensor_parallel_size={tp}"
             + (f", data_parallel_size={dp}" if dp > 1 else "")
             + f", dtype={plan.dtype}, kv_cache_dtype={plan.kv_cache_dtype}, block_size={plan.block_size}, "
             f"max_model_len={plan.max_model_len}"]
    if dp > 1:  # one replica: the GPUs are tensor_parallel_size, the output as it always was
        devices = "GPUs" if plan.memory_bytes_per_gpu else "ranks (CPU processes)"
        lines.append(f"{devices} needed: {plan.gpus_needed} ({dp} replicas x tensor_parallel_size {tp})")
    lines.append(("per GPU" if plan.memory_bytes_per_gpu else "per rank (CPU: KV budget as given)")
                 + (", the same in every replica:" if dp > 1 else ":"))
    if plan.memory_bytes_per_gpu:
        lines.append(f"  device memory            {plan.memory_bytes_per_gpu / gib:10.2f} GiB")
    lines += [
        f"  weights (this shard)     {plan.weight_bytes_per_gpu / gib:10.2f} GiB  ({plan.weight_bytes_per_gpu / gb:.2f} GB)",
        f"  activation reserve       {plan.activation_reserve_bytes / gib:10.2f} GiB  (estimate, full-budget step)",
        f"  KV cache budget          {plan.kv_budget_bytes / gib:10.2f} GiB",
        f"  KV per token             {plan.kv_bytes_per_token / 1024:10.1f} KiB"
        + ("  (1-byte codes + float16 scales)" if plan.kv_cache_dtype in kv_format.QUANTIZED_KV_CACHE_DTYPES else ""),
        f"  KV per block             {plan.kv_bytes_per_block / 2**20:10.2f} MiB  ({plan.block_size} tokens)",
        f"  blocks                   {plan.num_blocks:10d}",
        f"  tokens that fit          {plan.tokens:10d}",
    ]
    if plan.kv_host_memory_bytes:
        lines.append(f"  host tier (prefix cache) {plan.kv_host_memory_bytes / gib:10.2f} GiB of host memory: "
                     f"{plan.host_tier_tokens} tokens")
    lines += [
        f"requests of prompt {plan.prompt_len} + output {plan.output_len} tokens: {plan.requests_fit_in_kv} fit in "
        f"the KV cache; {plan.concurrent_requests} run at once (limited by {plan.concurrency_limited_by})",
    ]
    if plan.hbm_bandwidth_bytes_per_s:
        lines += [
            f"decode ceiling at {plan.hbm_bandwidth_bytes_per_s / 1e12:.2f} TB/s per GPU (weights + KV read once a step):",
            f"  steps/s                  {plan.decode_steps_per_s_ceiling:10.1f}",
            f"  output tokens/s          {plan.decode_tokens_per_s_ceiling:10.0f}  "
            f"({plan.concurrent_requests} requests, each halfway through its output)",
            f"  one request, tokens/s    {plan.single_request_tokens_per_s_ceiling:10.1f}",
        ]
    if plan.tensor_parallel_size > 1:
        lines.append(f"all-reduce per decode step: {plan.allreduce_bytes_per_step_per_gpu / 2**20:.1f} MiB sent per "
                     "GPU (ring; NVLink time not modelled)")
    if dp > 1:
        lines += [
            f"data parallel: {dp} replicas behind one router (the figures above are each replica's)",
            f"                           {'per replica':>12} {'total':>12}",
            f"  KV tokens                {plan.tokens:12d} {plan.total_tokens:12d}",
            f"  requests that fit in KV  {plan.requests_fit_in_kv:12d} {plan.total_requests_fit_in_kv:12d}",
            f"  requests at once         {plan.concurrent_requests:12d} {plan.total_concurrent_requests:12d}",
        ]
        if plan.decode_tokens_per_s_ceiling is not None:
            lines.append(f"  output tokens/s ceiling  {plan.decode_tokens_per_s_ceiling:12.0f} "
                         f"{plan.total_decode_tokens_per_s_ceiling:12.0f}")
    return "\n".join(lines)
