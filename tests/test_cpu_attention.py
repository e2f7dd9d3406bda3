"""The CPU in-place paged-attention kernel (kernels/cpu_attention.py): it matches the torch
reference on ragged batches (prefill chunks with and without cached prefixes, decodes, block
boundaries, shuffled block tables, GQA/MQA, odd block sizes and head dims, fp32/bf16, value and
quantized caches), its build is cached across processes, and a failed build falls back to the
torch backend with a warning."""
import logging
import os
import subprocess
import sys
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quire.kernels import cpu_attention, kv_quant, select_backend
from quire.kernels.attention_ref import paged_attention_ref
from quire.kernels.cpu_attention import CpuPagedAttentionBackend

TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2}  # relative to the output's scale
BACKEND = CpuPagedAttentionBackend()


@pytest.fixture(scope="module", autouse=True)
def built():
    cpu_attention.load_extension()


def make_batch(shapes, num_heads, num_kv_heads, head_dim, block_size, dtype=torch.float32,
               cache_dtype=None, seed=0, table_dtype=torch.int64):
    """A step for requests of (cached tokens, query tokens): caches full of random K/V (codes and
    scales for a quantized cache) in shuffled blocks, a block table padded with junk ids."""
    g = torch.Generator().manual_seed(seed)
    cache_dtype = cache_dtype or dtype
    per_req = [max(1, -(-(c + q) // block_size)) for c, q in shapes]
    num_blocks = sum(per_req) + 3
    free = torch.randperm(num_blocks, generator=g).tolist()
    values = [torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g) for _ in "kv"]
    if kv_quant.is_quantized(cache_dtype):
        (k, ks), (v, vs) = (kv_quant.quantize(t, cache_dtype) for t in values)
    else:
        (k, v), ks, vs = (t.to(cache_dtype) for t in values), None, None
    tables, seq_lens, starts = [], [], [0]
    for (cached, q_len), n in zip(shapes, per_req):
        tables.append([free.pop() for _ in range(n)])
        seq_lens.append(cached + q_len)
        starts.append(starts[-1] + q_len)
    width = max(len(t) for t in tables) + 1
    block_tables = torch.tensor([t + [num_blocks - 1] * (width - len(t)) for t in tables], dtype=table_dtype)
    query = torch.randn(starts[-1], num_heads, head_dim, generator=g).to(dtype)
    return dict(query=query, k_cache=k, v_cache=v, k_scale=ks, v_scale=vs, block_tables=block_tables,
                seq_lens=seq_lens, query_start_loc=starts, scale=head_dim ** -0.5,
                block_size=block_size, num_heads=num_heads, num_kv_heads=num_kv_heads)


def check(batch):
    """The kernel against the reference on the same inputs (for a quantized cache, the reference
    attends over the dequantized cache: the same values the kernel reads)."""
    plan = BACKEND.plan(batch["block_tables"], batch["seq_lens"], batch["query_start_loc"],
                        block_size=batch["block_size"], num_heads=batch["num_heads"],
                        num_kv_heads=batch["num_kv_heads"])
    got = BACKEND.attend(batch["query"], batch["k_cache"], batch["v_cache"], plan, batch["scale"],
                         batch["k_scale"], batch["v_scale"])
    k, v = batch["k_cache"], batch["v_cache"]
    if kv_quant.is_quantized(k.dtype):
        k, v = kv_quant.dequantize(k, batch["k_scale"]), kv_quant.dequantize(v, batch["v_scale"])
    expected = paged_attention_ref(batch["query"].float(), k.float(), v.float(), batch["block_tables"],
                                   batch["seq_lens"], batch["query_start_loc"], batch["scale"])
    assert got.dtype == batch["query"].dtype and got.shape == batch["query"].shape
    tol = TOLERANCE[batch["query"].dtype] * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(got.float(), expected, atol=tol, rtol=0)


@pytest.mark.parametrize("block_size", [1, 12, 16, 32])
def test_contexts_around_block_boundaries(block_size):
    b = block_size
    shapes = [(b - 2, 1), (b - 1, 1), (b, 1), (0, 1), (0, b - 1), (0, b), (0, b + 1), (2 * b - 1, 1), (b, b + 1)]
    check(make_batch([(max(0, c), q) for c, q in shapes], 8, 2, 64, block_size))


@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 4), (8, 2), (16, 2), (8, 1)], ids=["g1", "g4", "g8", "mqa"])
@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_gqa_groups_and_head_dims(num_heads, num_kv_heads, head_dim):
    check(make_batch([(37, 1), (0, 21), (50, 17), (5, 1)], num_heads, num_kv_heads, head_dim, 16, seed=head_dim))


def test_long_prefill_chunks_with_prior_context_mixed_with_decodes():
    """Several chunks of a few hundred tokens after a cached prefix, beside decodes: tiles, the
    causal diagonal inside a chunk, and (few items, long contexts) the split-and-reduce path."""
    shapes = [(0, 300), (300, 256), (556, 200), (700, 1), (3, 1), (1000, 1)]
    check(make_batch(shapes, 12, 4, 64, 16))
    check(make_batch([(2000, 1)], 4, 1, 64, 16, seed=1))  # one long decode: split across threads
    check(make_batch([(1500, 3)], 8, 8, 64, 12, seed=2))


@pytest.mark.parametrize("threads", [1, 4])
def test_split_contexts_reduce_to_the_reference(threads):
    """The flash-decoding split: with more threads, long context ranges (of decodes and of prefill
    tiles whose last rows see a chunk the first rows do not) are cut into more pieces and reduced."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check(make_batch([(2000, 1)], 4, 1, 64, 16, seed=3))
        check(make_batch([(1500, 3)], 4, 1, 80, 12, seed=4))
        check(make_batch([(700, 40), (900, 1), (5, 1)], 8, 2, 64, 16, dtype=torch.bfloat16,
                         cache_dtype=torch.int8, seed=5))
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("cache", ["auto", "int8", "fp8_e4m3"])
def test_activation_and_cache_dtypes(dtype, cache):
    cache_dtype = kv_quant.cache_dtype(cache, dtype)
    shapes = [(15, 1), (0, 9), (33, 5), (16, 1), (400, 1)]
    check(make_batch(shapes, 8, 2, 80, 16, dtype=dtype, cache_dtype=cache_dtype, table_dtype=torch.int32))


def test_empty_batch_and_one_token_context():
    check(make_batch([(0, 1)], 4, 2, 64, 16))
    batch = make_batch([(0, 1)], 4, 2, 64, 16)
    plan = BACKEND.plan(batch["block_tables"][:0], [], [0], block_size=16, num_heads=4, num_kv_heads=2)
    out = BACKEND.attend(batch["query"][:0], batch["k_cache"], batch["v_cache"], plan, 0.1)
    assert out.shape == (0, 4, 64)


def test_quantized_cache_requires_scales():
    batch = make_batch([(3, 1)], 4, 2, 64, 16, cache_dtype=torch.int8)
    plan = BACKEND.plan(batch["block_tables"], batch["seq_lens"], batch["query_start_loc"], block_size=16,
                        num_heads=4, num_kv_heads=2)
    with pytest.raises(ValueError, match="k_scale"):
        BACKEND.attend(batch["query"], batch["k_cache"], batch["v_cache"], plan, 0.1)


@settings(max_examples=30, deadline=None)
@given(data=st.data(), kv_heads=st.sampled_from([1, 2, 3]), group=st.sampled_from([1, 2, 4]),
       head_dim=st.sampled_from([8, 32, 48, 64]), block_size=st.sampled_from([1, 3, 8, 16]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), cache=st.sampled_from(["auto", "int8", "fp8_e4m3"]))
def test_random_ragged_batches_match_the_reference(data, kv_heads, group, head_dim, block_size, dtype, cache):
    shapes = data.draw(st.lists(st.tuples(st.integers(0, 70), st.integers(1, 40)), min_size=1, max_size=5))
    check(make_batch(shapes, kv_heads * group, kv_heads, head_dim, block_size, dtype=dtype,
                     cache_dtype=kv_quant.cache_dtype(cache, dtype), seed=data.draw(st.integers(0, 1000))))


@settings(max_examples=40, deadline=None)
@given(data=st.data(), tokens=st.integers(0, 40), kv_heads=st.integers(1, 4), head_dim=st.sampled_from([8, 20, 64]),
       block_size=st.sampled_from([1, 5, 16]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       strided=st.booleans())
def test_kv_writes_match_the_reference(data, tokens, kv_heads, head_dim, block_size, dtype, strided):
    from quire.kernels.attention_ref import write_kv_ref

    num_blocks = max(1, -(-tokens // block_size)) + data.draw(st.integers(0, 3))
    slots = torch.tensor(data.draw(st.permutations(range(num_blocks * block_size)))[:tokens], dtype=torch.int64)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 16)))
    # Strided rows are what the model hands over: views of one fused [tokens, q + k + v] output.
    width = kv_heads * head_dim
    fused = torch.randn(tokens, 3 * width, generator=g).to(dtype)
    key, value = (fused[:, i * width:(i + 1) * width] for i in (1, 2))
    key, value = ((t if strided else t.contiguous()).view(tokens, kv_heads, head_dim) for t in (key, value))
    caches = [torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype) for _ in "kv"]
    expected = [c.clone() for c in caches]
    BACKEND.write_kv(key, value, *caches, slots)
    write_kv_ref(key, value, *expected, slots)
    assert all(torch.equal(c, e) for c, e in zip(caches, expected))


# Values the quantization rule treats apart: signed zeros, subnormals, both ends of the scale's
# clamp, e4m3's grid edges, saturation, and non-finite values (a NaN row's scale is NaN).
EDGE_VALUES = [0.0, -0.0, 1e-45, -1e-40, 2.0 ** -14, 6e-8, 0.5, -1.0, 1.5, 3.0, 447.0, 448.0, 449.0, 1e4, -6.55e4,
               1e20, -1e38, float("inf"), -float("inf"), float("nan")]


@settings(max_examples=60, deadline=None)
@given(data=st.data(), tokens=st.integers(0, 24), kv_heads=st.integers(1, 3), head_dim=st.sampled_from([1, 8, 20, 64]),
       block_size=st.sampled_from([1, 5, 16]), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       cache_dtype=st.sampled_from([torch.int8, torch.float8_e4m3fn]), strided=st.booleans())
def test_quantized_kv_writes_are_the_references_bit_for_bit(data, tokens, kv_heads, head_dim, block_size, dtype,
                                                            cache_dtype, strided):
    from quire.kernels.attention_ref import TorchAttentionBackend, write_kv_ref

    num_blocks = max(1, -(-tokens // block_size)) + data.draw(st.integers(0, 2))
    slots = torch.tensor(data.draw(st.permutations(range(num_blocks * block_size)))[:tokens], dtype=torch.int64)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 16)))
    width = kv_heads * head_dim
    # Rows at scales from tiny to huge, some elements replaced by edge values.
    fused = torch.randn(tokens, 3 * width, generator=g) * 10.0 ** torch.randint(-30, 30, (tokens, 1), generator=g)
    edges = torch.tensor(EDGE_VALUES)
    pick = torch.rand(fused.shape, generator=g) < data.draw(st.sampled_from([0.0, 0.05, 0.5]))
    fused[pick] = edges[torch.randint(0, len(edges), (int(pick.sum()),), generator=g)]
    fused = fused.to(dtype)
    key, value = (fused[:, i * width:(i + 1) * width] for i in (1, 2))
    key, value = ((t if strided else t.contiguous()).view(tokens, kv_heads, head_dim) for t in (key, value))
    shape = (num_blocks, block_size, kv_heads, head_dim)
    caches = [torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).view(cache_dtype) for _ in "kv"]
    caches += [torch.rand(shape[:3], generator=g).to(kv_quant.SCALE_DTYPE) for _ in "kv"]
    expected = [c.clone() for c in caches]
    with mock.patch.object(TorchAttentionBackend, "write_kv", side_effect=AssertionError("took the reference")):
        BACKEND.write_kv(key, value, caches[0], caches[1], slots, caches[2], caches[3])
    write_kv_ref(key, value, expected[0], expected[1], slots, expected[2], expected[3])
    for got, want in zip(caches, expected):
        as_bits = (lambda t: t.view(torch.uint8)) if got.element_size() == 1 else (lambda t: t.view(torch.int16))
        assert torch.equal(as_bits(got), as_bits(want))


def test_a_kv_write_to_a_slot_outside_the_cache_writes_nothing():
    caches = [torch.zeros(2, 4, 1, 8) for _ in "kv"]
    rows = torch.ones(3, 1, 8)
    with pytest.raises(RuntimeError, match="slot 8 of token 2 is outside the cache's 8"):
        BACKEND.write_kv(rows, rows, *caches, torch.tensor([0, 1, 8]))
    with pytest.raises(RuntimeError, match="slot -1 of token 0"):
        BACKEND.write_kv(rows, rows, *caches, torch.tensor([-1, 1, 2]))
    assert all(not c.any() for c in caches), "every slot is checked before any is written"


def test_warm_up_reports_the_kernel():
    result = BACKEND.warm_up(num_heads=8, num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.bfloat16,
                             device="cpu", kv_cache_dtype=torch.float8_e4m3fn)
    assert result.variants == 1 and result.seconds >= 0.0


def test_a_cached_build_is_loaded_not_rebuilt():
    """A second process finds the build in the extension cache: the shared object is not rewritten."""
    from torch.utils.cpp_extension import _get_build_directory

    library = os.path.join(_get_build_directory(cpu_attention.extension_name(), False),
                           cpu_attention.extension_name() + ".so")
    before = os.stat(library).st_mtime_ns
    probe = "from quire.kernels import cpu_attention as c; print(c.load_extension())"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert os.stat(library).st_mtime_ns == before
    assert float(out.stdout.strip()) < 5.0, "a cached load takes well under a build's time"


def test_a_failed_build_falls_back_to_torch_with_one_warning(monkeypatch, caplog):
    from quire.kernels import backend

    def fail():
        raise cpu_attention.ExtensionUnavailable("no compiler")

    monkeypatch.delenv("QUIRE_ATTENTION_BACKEND", raising=False)
    monkeypatch.setattr(cpu_attention, "load_extension", fail)
    monkeypatch.setattr(backend, "_cpu_warned", False)
    with caplog.at_level(logging.WARNING, logger="quire.kernels.backend"):
        assert select_backend("cpu").name == "torch"
        assert select_backend("cpu").name == "torch"
    assert sum("falling back to the torch" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(RuntimeError, match="QUIRE_ATTENTION_BACKEND=cpu, but no compiler"):
        select_backend("cpu", override="cpu")


def test_the_cpu_kernel_is_the_cpu_default(monkeypatch):
    monkeypatch.delenv("QUIRE_ATTENTION_BACKEND", raising=False)
    assert select_backend("cpu").name == "cpu"
    monkeypatch.setenv("QUIRE_ATTENTION_BACKEND", "torch")
    assert select_backend("cpu").name == "torch"


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_the_kernels_parallel_regions_use_every_torch_thread(threads):
    # at::parallel_for is inlined into the extension: built without OpenMP it silently runs on
    # the calling thread alone (as it once did). The width is that of a region in the extension.
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert torch.ops.quire_cpu.parallel_width() == threads
    finally:
        torch.set_num_threads(previous)


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512",
                    reason="the native build is already the 8-lane one")
def test_the_8_lane_build_passes_this_file():
    """The kernels' loops are written for any vector width; this machine builds them for 16
    lanes, so the 8-lane (AVX2) build that other machines get runs this file in a subprocess."""
    env = {**os.environ, "QUIRE_TEST_VECTOR_FLAGS": "-mavx2 -mfma -mf16c",
           "PYTHONPATH": os.pathsep.join(filter(None, [os.path.dirname(__file__), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "vector_width_plugin", "-p",
                          "no:cacheprovider", __file__, "-k", "not 8_lane"],
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "passed" in run.stdout and "cpu kernels built as quire_paged_attention_cpu_avx2" in run.stdout
