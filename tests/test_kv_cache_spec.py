"""The model states its KV-cache geometry (`kv_cache_spec()`), it matches the checkpoint's
config on every rank, and the worker sizes and allocates its KV pool from it with the one
attention backend it chose at setup."""
import pytest
import torch

from conftest import TINY_CONFIGS
from quire.cluster import LLM
from quire.kernels import kv_quant
from quire.worker.kv_pool import KVCacheSpec, KVPool
from quire.worker.loader import load_config, load_model
from quire.worker.parallel import ParallelContext


def expected_spec(config, world_size: int, dtype: torch.dtype) -> KVCacheSpec:
    """From the config alone: KV heads split across ranks, replicated once ranks outnumber them."""
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_size = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return KVCacheSpec(config.num_hidden_layers, max(1, kv_heads // world_size), head_size, dtype)


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_the_spec_matches_the_config(name, tiny_checkpoint):
    path = tiny_checkpoint(name)
    model = load_model(path, ParallelContext(), torch.float32, torch.device("cpu"), 256)
    spec = model.kv_cache_spec()
    assert spec == expected_spec(load_config(path), 1, torch.float32)
    attn = model.model.layers[0].self_attn.attn  # what the layers actually write into the cache
    assert (spec.num_kv_heads, spec.head_size) == (attn.num_kv_heads, attn.head_dim)


@pytest.mark.parametrize("tp", [2, 4])
def test_each_rank_states_its_share_of_the_kv_heads(tp, tiny_checkpoint):
    path = tiny_checkpoint("llama-tp")  # 2 KV heads: split at tp=2, replicated at tp=4
    for rank in range(tp):
        model = load_model(path, ParallelContext(rank=rank, world_size=tp), torch.float32, torch.device("cpu"), 256)
        assert model.kv_cache_spec() == expected_spec(load_config(path), tp, torch.float32), f"rank {rank} of {tp}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_pool_takes_its_shapes_and_size_from_the_spec(dtype):
    spec = KVCacheSpec(num_layers=3, num_kv_heads=2, head_size=8, dtype=dtype)
    pool = KVPool(spec, num_blocks=5, block_size=4, device=torch.device("cpu"), num_cpu_blocks=2)
    assert len(pool.caches) == len(pool.cpu_caches) == 3
    assert all(t.shape == (5, 4, 2, 8) and t.dtype == dtype for pair in pool.caches for t in pair)
    assert all(t.shape == (2, 4, 2, 8) for pair in pool.cpu_caches for t in pair)
    device_bytes = sum(t.numel() * t.element_size() for pair in pool.caches for t in pair)
    assert spec.bytes_per_block(4) * 5 == device_bytes


def test_the_worker_sizes_its_pool_by_the_spec_and_keeps_one_backend(tiny_checkpoint, monkeypatch):
    monkeypatch.delenv("QUIRE_ATTENTION_BACKEND", raising=False)
    llm = LLM(model=str(tiny_checkpoint("mistral-gqa")), dtype="float32", num_kv_blocks=16)
    try:
        worker = llm.engine.executor.worker
        runner = worker.runner
        assert worker.kv_spec == worker.model.kv_cache_spec() == runner.kv_pool.spec
        assert worker.kv_spec.head_size == 32, "mistral-gqa's head_dim is not hidden_size / heads"
        assert runner.attention is worker.attention, "chosen once per worker, not per runner or step"
        assert runner.backend == runner.attention.name == "cpu"  # the cache is on the CPU: the C++ paged-attention backend
    finally:
        llm.shutdown()


@pytest.mark.parametrize("name, dtype", [("int8", torch.int8), ("fp8_e4m3", torch.float8_e4m3fn)])
def test_a_quantized_block_holds_codes_and_scales(name, dtype):
    """One code byte per value and a float16 scale per token and KV head: at head_dim 128 the
    same budget holds about twice bf16's tokens and four times fp32's."""
    layers, kv_heads, head_dim, block_size = 32, 8, 128, 16
    quantized = KVCacheSpec(layers, kv_heads, head_dim, kv_quant.cache_dtype(name, torch.bfloat16))
    assert quantized.dtype == dtype and quantized.quantized
    assert quantized.bytes_per_block(block_size) == 2 * layers * block_size * kv_heads * (head_dim + 2)
    budget = 1 << 30
    tokens = {d: budget // KVCacheSpec(layers, kv_heads, head_dim, d).bytes_per_block(block_size) * block_size
              for d in (torch.bfloat16, torch.float32)}
    held = budget // quantized.bytes_per_block(block_size) * block_size
    assert held >= 1.9 * tokens[torch.bfloat16] and held >= 3.8 * tokens[torch.float32]


def test_the_model_states_the_cache_dtype_it_is_given(tiny_checkpoint):
    model = load_model(tiny_checkpoint("llama-gqa4"), ParallelContext(), torch.float32, torch.device("cpu"), 256)
    assert model.kv_cache_spec().dtype == model.kv_cache_spec("auto").dtype == torch.float32
    assert model.kv_cache_spec("int8").dtype == torch.int8
    assert model.kv_cache_spec("fp8_e4m3").dtype == torch.float8_e4m3fn
    with pytest.raises(ValueError, match="`kv_cache_dtype`.*'fp8'"):
        model.kv_cache_spec("fp8")
