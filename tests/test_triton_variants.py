"""Compiled variants of the Triton kernels: a worker launches a small set, known in advance
and independent of batch sizes and sequence lengths, and `warm_up` launches exactly that set.

Triton's interpreter compiles nothing, so the launches are recorded and keyed the way
Triton keys its compile cache: constexprs and launch options, argument dtypes, pointer
alignment, and for each integer argument it specialises whether it is 1 or divisible by 16.
"""
import inspect
import random

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed (pip install 'quire[triton]')")

from quire.kernels import AttentionBackend, WarmUpResult, kv_quant  # noqa: E402
from quire.kernels import triton_attention as ta  # noqa: E402
from quire.kernels import triton_write_kv as tw  # noqa: E402
from quire.kernels.attention_ref import TorchAttentionBackend  # noqa: E402
from quire.kernels.triton_variants import (MAX_SPLITS, SPLIT_ALIGN, SPLIT_LADDER, attention_variant,  # noqa: E402
                                           choose_num_splits, compile_variants, tile_config)
from quire.kernels.verify import random_paged_batch  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CAPABILITIES = [None, (7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (10, 0)]
DYNAMIC = {"_paged_attention_kernel": ta.ATTENTION_DYNAMIC, "_reduce_kernel": ta.REDUCE_DYNAMIC,
           "_write_kv_kernel": tw.WRITE_KV_DYNAMIC, "_write_kv_quant_kernel": tw.WRITE_KV_DYNAMIC}
MODULES = {"_paged_attention_kernel": ta, "_reduce_kernel": ta, "_write_kv_kernel": tw, "_write_kv_quant_kernel": tw}
CACHE_DTYPES = [None, torch.int8, torch.float8_e4m3fn]  # None: the activation dtype


def cache_key(name, kernel, args, kwargs):
    """What Triton's compile cache distinguishes for one launch (module docstring)."""
    params = list(inspect.signature(kernel.fn).parameters)
    key = []
    for param, arg in zip(params, args):
        if isinstance(arg, torch.Tensor):
            key.append((param, arg.dtype, arg.data_ptr() % 16 == 0))
        elif isinstance(arg, bool) or isinstance(arg, float):
            key.append((param, type(arg).__name__))
        elif isinstance(arg, int):
            width = "i32" if -2**31 <= arg < 2**31 else "i64"
            key.append((param, width) if param in DYNAMIC[name] else (param, width, arg == 1, arg % 16 == 0))
        else:
            raise AssertionError(f"unexpected argument {param}={arg!r}")
    return (name, tuple(key), tuple(sorted(kwargs.items())))


class Recorder:
    """Stands in for a kernel: records each launch's cache key, then launches it."""

    def __init__(self, name, kernel, keys):
        self.name, self.kernel, self.keys, self.fn = name, kernel, keys, kernel.fn

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.keys.add(cache_key(self.name, self.kernel, args, kwargs))
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.fixture
def recorded(monkeypatch):
    keys = set()
    for name, module in MODULES.items():
        monkeypatch.setattr(module, name, Recorder(name, getattr(module, name), keys))
    return keys


@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("capability", CAPABILITIES)
def test_a_worker_compiles_a_few_variants_whatever_its_geometry(dtype, capability, cache_dtype):
    quantized = cache_dtype is not None
    for heads, kv_heads, head_dim, block_size in [(32, 8, 128, 16), (16, 2, 128, 32), (8, 1, 64, 16),
                                                  (64, 1, 128, 64), (4, 4, 80, 8), (2, 1, 256, 24)]:
        variants = compile_variants(heads, kv_heads, head_dim, block_size, dtype, capability, cache_dtype=cache_dtype)
        attention = [v for v in variants if v.kernel == "paged_attention"]
        assert len(variants) <= 6 and 2 <= len(attention) <= 4
        write = "write_kv_quant" if quantized else "write_kv"
        assert {v.kernel for v in variants} == {"paged_attention", "reduce", write}
        # The cache dtype is part of every key that reads or writes the cache.
        assert all(v.cache_dtype == (cache_dtype or dtype) for v in variants if v.kernel != "reduce")
        assert all(dict(v.constexprs)["QUANT"] == (0 if not quantized else 1 if cache_dtype == torch.int8 else 2)
                   for v in attention)


def test_plans_of_any_lengths_use_only_the_enumerated_variants():
    rng = random.Random(0)
    heads, kv_heads, head_dim, block_size = 32, 8, 128, 16
    for capability in CAPABILITIES:
        variants = compile_variants(heads, kv_heads, head_dim, block_size, torch.float16, capability)
        for _ in range(200):
            batch = rng.randint(1, 300)
            query_lens = [1 if rng.random() < 0.8 else rng.randint(1, 2048) for _ in range(batch)]
            seq_lens = [q + rng.randint(0, 32768) for q in query_lens]
            starts = [0]
            for q in query_lens:
                starts.append(starts[-1] + q)
            plan = ta.TritonAttentionPlan.build(seq_lens, starts, heads // kv_heads, kv_heads, torch.device("cpu"))
            assert plan.num_splits in SPLIT_LADDER and plan.split_len % SPLIT_ALIGN == 0
            assert plan.split_len * plan.num_splits >= max(seq_lens)
            used = attention_variant(heads, kv_heads, head_dim, block_size, torch.float16, plan.block_m,
                                     plan.num_splits > 1, capability, False)
            assert used in variants


def test_the_split_rule_picks_only_ladder_values():
    cpu = torch.device("cpu")
    picks = {choose_num_splits(programs, seq, cpu) for programs in range(1, 20) for seq in range(1, 20000, 97)}
    assert picks <= set(SPLIT_LADDER) and picks > {1}
    assert max(SPLIT_LADDER) == MAX_SPLITS and all(b == 2 * a for a, b in zip(SPLIT_LADDER, SPLIT_LADDER[1:]))


def test_the_launch_table_fits_the_kernels():
    for capability in CAPABILITIES:
        for tile, block_m in (("decode", 16), ("prefill", 64)):
            for head_dim_pad in (16, 32, 64, 128, 256):
                for elem_size in (2, 4):
                    config = tile_config(tile, head_dim_pad, block_m, elem_size, capability)
                    assert SPLIT_ALIGN % config.block_n == 0 and config.block_n >= 16
                    assert config.num_warps in (4, 8) and config.num_stages >= 1
    # A 64-row prefill tile at head dim 128 spills registers with 4 warps.
    assert all(tile_config("prefill", 128, 64, 2, c).num_warps == 8 for c in CAPABILITIES)


def test_the_base_warm_up_does_nothing():
    result = TorchAttentionBackend().warm_up(num_heads=4, num_kv_heads=2, head_dim=32, block_size=16,
                                             dtype=torch.float32, device="cpu")
    assert result == WarmUpResult(variants=0, seconds=0.0)
    assert "warm_up" not in AttentionBackend.__abstractmethods__


@pytest.mark.parametrize("dtype, cache_dtype", [(torch.float16, None), (torch.bfloat16, None),
                                                (torch.bfloat16, torch.int8), (torch.float16, torch.float8_e4m3fn)])
def test_warm_up_launches_exactly_what_serving_launches(recorded, dtype, cache_dtype):
    heads, kv_heads, head_dim, block_size = 4, 2, 32, 16
    backend = ta.TritonAttentionBackend()
    result = backend.warm_up(num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, block_size=block_size,
                             dtype=dtype, device=DEVICE, kv_cache_dtype=cache_dtype)
    interpret = DEVICE.type != "cuda"
    capability = None if interpret else tuple(torch.cuda.get_device_capability(DEVICE))
    assert result.variants == len(compile_variants(heads, kv_heads, head_dim, block_size, dtype, capability,
                                                   interpret, cache_dtype)) <= 6
    warmed = set(recorded)
    assert len(warmed) == result.variants, "each variant is one compiled kernel"

    # Steps of many sizes: 1 and 16 tokens, tables 1 and 16 blocks wide, split and not, long and short.
    steps = [[(0, 1)], [(15, 1)] * 16, [(3, 1), (40, 7)], [(255, 1)] * 3, [(1100, 1)], [(600, 1), (10, 1)],
             [(0, 37)], [(700, 16)], [(31, 1), (0, 1), (17, 2), (250, 1), (9, 1)]]
    splits = set()
    for shapes in steps:
        query, k_cache, v_cache, tables, seq_lens, starts = random_paged_batch(
            shapes, heads, kv_heads, head_dim, block_size, dtype, DEVICE)
        scales = [None, None]
        if cache_dtype is not None:  # the worker's quantized caches: codes, contiguous fp16 scales
            (k_cache, k_scale), (v_cache, v_scale) = (kv_quant.quantize(c, cache_dtype) for c in (k_cache, v_cache))
            scales = [k_scale, v_scale]
        tokens = query.shape[0]
        slots = torch.randperm(k_cache.shape[0] * block_size, device=DEVICE)[:tokens]
        backend.write_kv(query[:, :kv_heads], query[:, kv_heads:], k_cache, v_cache, slots, *scales)
        plan = backend.plan(tables, seq_lens, starts, block_size=block_size, num_heads=heads, num_kv_heads=kv_heads)
        backend.attend(query, k_cache, v_cache, plan, head_dim ** -0.5, *scales)
        splits.add(plan.kernel_plan.num_splits)
    assert len(splits) >= 3, "the steps cover unsplit launches and several split counts"
    assert recorded == warmed, f"compiled after warm-up: {recorded - warmed}"
