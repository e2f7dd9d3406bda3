"""Quantized paged KV (int8 and fp8 e4m3, kernels/kv_quant.py) inside the attention backends:
slot writes store exactly `kv_quant.quantize`'s codes and scales (the Triton kernel bit for bit
as the torch backend), attention over codes matches attention over the dequantized cache, and
the rule's own error bounds hold. Triton runs compiled on a GPU, else in its interpreter
(conftest sets TRITON_INTERPRET=1); the shapes are small so the interpreter stays fast."""
import importlib.util

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quire.kernels import AttentionBackend, kv_quant
from quire.kernels.attention_ref import TorchAttentionBackend, paged_attention_ref

HAVE_TRITON = importlib.util.find_spec("triton") is not None
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed (pip install 'quire[triton]')")
CACHE_DTYPES = [pytest.param(torch.int8, id="int8"), pytest.param(torch.float8_e4m3fn, id="fp8_e4m3")]
BACKENDS = ["torch", "cpu", pytest.param("triton", marks=needs_triton)]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}  # relative to the output's scale


def backend(name: str) -> AttentionBackend:
    if name == "torch":
        return TorchAttentionBackend()
    if name == "cpu":
        from quire.kernels.cpu_attention import CpuPagedAttentionBackend, load_extension

        load_extension()
        return CpuPagedAttentionBackend()
    from quire.kernels.triton_attention import TritonAttentionBackend

    return TritonAttentionBackend()


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """Bitwise comparisons (equality of float8 is not implemented everywhere, and -0 == 0)."""
    return t.view(torch.uint8) if t.element_size() == 1 else t.view(torch.int16)


def edge_rows(num_tokens: int, num_kv_heads: int, head_dim: int, seed: int) -> torch.Tensor:
    """Random K/V rows with the cases the rule singles out: an all-zero row, a tiny row (scale
    clamped to MIN_SCALE), a huge row (scale clamped to MAX_SCALE, codes saturate), an outlier."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(num_tokens, num_kv_heads, head_dim, generator=g) * 2
    rows[0, 0] = 0.0
    rows[1, -1] *= 1e-7
    rows[2, 0] *= 1e7
    rows[3, 0, 5] = 300.0
    return rows


def empty_cache(num_blocks, block_size, num_kv_heads, head_dim, cache_dtype, seed=0):
    """Caches and scales full of random codes and scales, so slots a write must not touch are told apart."""
    g = torch.Generator().manual_seed(seed)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    codes = [torch.randint(0, 0x7F, shape, generator=g, dtype=torch.uint8).view(cache_dtype) for _ in "kv"]
    scales = [torch.rand(shape[:3], generator=g).to(kv_quant.SCALE_DTYPE) for _ in "kv"]
    return [t.to(DEVICE) for t in codes + scales]


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
def test_write_kv_stores_the_quantized_rows_in_their_slots(name, cache_dtype):
    num_blocks, block_size, kv_heads, head_dim, tokens = 9, 8, 3, 40, 21
    key, value = edge_rows(tokens, kv_heads, head_dim, 1), edge_rows(tokens, kv_heads, head_dim, 2)
    slots = torch.randperm(num_blocks * block_size, generator=torch.Generator().manual_seed(3))[:tokens]
    k_cache, v_cache, k_scale, v_scale = empty_cache(num_blocks, block_size, kv_heads, head_dim, cache_dtype)
    before = [t.clone() for t in (k_cache, v_cache, k_scale, v_scale)]
    backend(name).write_kv(key.to(DEVICE), value.to(DEVICE), k_cache, v_cache, slots.to(DEVICE), k_scale, v_scale)
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    written[slots] = True
    for rows, cache, scales, old_cache, old_scales in ((key, k_cache, k_scale, before[0], before[2]),
                                                      (value, v_cache, v_scale, before[1], before[3])):
        codes, expected_scales = kv_quant.quantize(rows, cache_dtype)
        flat_codes = as_bytes(cache).cpu().view(-1, kv_heads, head_dim)
        flat_scales = as_bytes(scales).cpu().view(-1, kv_heads)
        assert torch.equal(flat_codes[slots], as_bytes(codes)) and torch.equal(flat_scales[slots],
                                                                               as_bytes(expected_scales))
        assert torch.equal(flat_codes[~written], as_bytes(old_cache).cpu().view(-1, kv_heads, head_dim)[~written])
        assert torch.equal(flat_scales[~written], as_bytes(old_scales).cpu().view(-1, kv_heads)[~written])
        assert not flat_codes[slots[0], 0].any(), "an all-zero row has zero codes"


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
def test_triton_write_is_the_torch_write_bit_for_bit(cache_dtype, dtype):
    num_blocks, block_size, kv_heads, head_dim, tokens = 6, 16, 2, 64, 24
    # K and V as views of one fused projection row (token stride != row size), as the model passes them.
    fused = torch.cat([edge_rows(tokens, kv_heads, head_dim, 4), edge_rows(tokens, kv_heads, head_dim, 5)], 1)
    fused = fused.clamp(-60000, 60000).to(dtype).to(DEVICE)  # finite in fp16
    key, value = fused[:, :kv_heads], fused[:, kv_heads:]
    slots = torch.randperm(num_blocks * block_size, generator=torch.Generator().manual_seed(6))[:tokens].to(DEVICE)
    got = empty_cache(num_blocks, block_size, kv_heads, head_dim, cache_dtype)
    want = [t.cpu().clone() for t in got]
    backend("triton").write_kv(key, value, *got[:2], slots, *got[2:])
    backend("torch").write_kv(key.cpu(), value.cpu(), *want[:2], slots.cpu(), *want[2:])
    for a, b in zip(got, want):
        assert torch.equal(as_bytes(a).cpu(), as_bytes(b))


@pytest.mark.parametrize("name", BACKENDS)
def test_a_quantized_cache_requires_its_scales(name):
    attention = backend(name)
    cache = torch.zeros(2, 4, 1, 16, dtype=torch.int8, device=DEVICE)
    scales = torch.ones(2, 4, 1, dtype=torch.float16, device=DEVICE)
    rows, slots = torch.randn(1, 1, 16, device=DEVICE), torch.zeros(1, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="`k_scale` is None"):
        attention.write_kv(rows, rows, cache, cache.clone(), slots)
    with pytest.raises(ValueError, match="`v_scale` is None"):
        attention.write_kv(rows, rows, cache, cache.clone(), slots, scales)
    plan = attention.plan(torch.tensor([[0]], device=DEVICE), [1], [0, 1], block_size=4, num_heads=1, num_kv_heads=1)
    with pytest.raises(ValueError, match="`k_scale` is None"):
        attention.attend(torch.randn(1, 1, 16, device=DEVICE), cache, cache, plan, 0.25)


def quantized_batch(shapes, num_heads, num_kv_heads, head_dim, block_size, cache_dtype, dtype, seed=0):
    """A random paged batch (verify.random_paged_batch's layout) with its caches quantized; returns
    query, codes and scales of K and V, tables, seq_lens, starts, and the fp32 reference output
    (the whole cache dequantized, then the unquantized torch reference)."""
    from quire.kernels.verify import random_paged_batch

    query, k, v, tables, seq_lens, starts = random_paged_batch(shapes, num_heads, num_kv_heads, head_dim, block_size,
                                                               torch.float32, torch.device("cpu"), seed)
    (k_codes, k_scale), (v_codes, v_scale) = kv_quant.quantize(k, cache_dtype), kv_quant.quantize(v * 3, cache_dtype)
    scale = head_dim ** -0.5
    expected = paged_attention_ref(query, kv_quant.dequantize(k_codes, k_scale), kv_quant.dequantize(v_codes, v_scale),
                                   tables, seq_lens, starts, scale)
    on_device = [t.to(DEVICE) for t in (query.to(dtype), k_codes, v_codes, k_scale, v_scale, tables)]
    return (*on_device, seq_lens, starts, expected)


def assert_matches(got, expected, dtype):
    error = (got.float().cpu() - expected).abs().max().item()
    tolerance = TOLERANCE[dtype] * (1 + expected.abs().max().item())
    assert got.dtype == dtype and error <= tolerance, f"max error {error:.3g} over tolerance {tolerance:.3g}"


# (id, requests as (cached tokens, query tokens), heads, kv heads, head dim, block size, splits)
ATTENTION_CASES = [
    # Contexts ending one before, exactly at and one past a block end; prefill chunks with and without a prefix.
    ("boundaries-mha", [(14, 1), (15, 1), (16, 1), (0, 19), (21, 6)], 2, 2, 64, 16, None),
    ("gqa2-block8", [(7, 1), (8, 1), (0, 11), (13, 6)], 4, 2, 32, 8, None),
    ("gqa4-head-dim-80-block32", [(31, 1), (0, 9), (40, 3)], 8, 2, 80, 32, None),
    ("mqa-split-k", [(600, 1), (40, 1), (0, 30), (9, 1)], 4, 1, 64, 16, 3),
    ("split-k-prefill-tiles", [(300, 20), (130, 1)], 4, 2, 32, 16, 2),
]


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=[c[0] for c in ATTENTION_CASES])
@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
@needs_triton
def test_triton_attention_over_codes_is_attention_over_the_dequantized_cache(cache_dtype, case):
    from quire.kernels.triton_attention import TritonAttentionPlan, paged_attention

    _, shapes, heads, kv_heads, head_dim, block_size, splits = case
    query, k_codes, v_codes, k_scale, v_scale, tables, seq_lens, starts, expected = quantized_batch(
        shapes, heads, kv_heads, head_dim, block_size, cache_dtype, torch.float32)
    plan = TritonAttentionPlan.build(seq_lens, starts, heads // kv_heads, kv_heads, DEVICE, num_splits=splits)
    assert plan.num_splits == (splits or plan.num_splits)
    got = paged_attention(query, k_codes, v_codes, tables, plan, head_dim ** -0.5, k_scale, v_scale)
    assert_matches(got, expected, torch.float32)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
def test_a_mixed_step_through_the_contract(name, cache_dtype, dtype):
    """Plan, then attend a batch of decodes and prefill chunks, with queries in each activation dtype."""
    shapes, heads, kv_heads, head_dim, block_size = [(15, 1), (0, 9), (17, 4), (16, 1)], 4, 2, 32, 16
    query, k_codes, v_codes, k_scale, v_scale, tables, seq_lens, starts, expected = quantized_batch(
        shapes, heads, kv_heads, head_dim, block_size, cache_dtype, dtype, seed=1)
    attention = backend(name)
    plan = attention.plan(tables, seq_lens, starts, block_size=block_size, num_heads=heads, num_kv_heads=kv_heads)
    got = attention.attend(query, k_codes, v_codes, plan, head_dim ** -0.5, k_scale, v_scale)
    assert_matches(got, expected, dtype)


@needs_triton
@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
def test_the_static_decode_plan_reads_quantized_caches(cache_dtype):
    """The graph-safe plan (fixed split count, lengths rewritten in place between replays)."""
    heads, kv_heads, head_dim, block_size, max_seq_len = 4, 2, 16, 16, 512
    blocks = max_seq_len // block_size
    query, k_codes, v_codes, k_scale, v_scale, tables, _, _, _ = quantized_batch(
        [(max_seq_len - 1, 1)] * 3, heads, kv_heads, head_dim, block_size, cache_dtype, torch.float32, seed=2)
    assert tables.shape[1] == blocks
    attention = backend("triton")
    seq_lens = torch.ones(3, dtype=torch.int32, device=DEVICE)
    plan = attention.static_decode_plan(tables, seq_lens, max_seq_len=max_seq_len, block_size=block_size,
                                        num_heads=heads, num_kv_heads=kv_heads)
    assert plan.kernel_plan.num_splits > 1, "the interpreter's capacity makes this plan split"
    dequantized = [kv_quant.dequantize(c, s).cpu() for c, s in ((k_codes, k_scale), (v_codes, v_scale))]
    for lens in ([1, 300, 512], [257, 2, 16]):  # empty splits, a block end
        seq_lens.copy_(torch.tensor(lens))
        got = attention.attend(query, k_codes, v_codes, plan, head_dim ** -0.5, k_scale, v_scale)
        expected = paged_attention_ref(query.cpu(), *dequantized, tables.cpu(), lens, [0, 1, 2, 3], head_dim ** -0.5)
        assert_matches(got, expected, torch.float32)


@needs_triton
@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
def test_warm_up_with_a_quantized_cache_compiles_what_compile_variants_predicts(cache_dtype):
    from quire.kernels.triton_attention import TritonAttentionBackend
    from quire.kernels.triton_variants import compile_variants

    heads, kv_heads, head_dim, block_size, dtype = 4, 2, 32, 16, torch.float16
    result = TritonAttentionBackend().warm_up(num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                                              block_size=block_size, dtype=dtype, device=DEVICE,
                                              kv_cache_dtype=cache_dtype)
    interpret = DEVICE.type != "cuda"
    capability = None if interpret else tuple(torch.cuda.get_device_capability(DEVICE))
    variants = compile_variants(heads, kv_heads, head_dim, block_size, dtype, capability, interpret, cache_dtype)
    assert result.variants == len(variants) <= 6
    assert {v.kernel for v in variants} == {"paged_attention", "reduce", "write_kv_quant"}
    assert all(v.cache_dtype == cache_dtype for v in variants if v.kernel != "reduce")
    unquantized = compile_variants(heads, kv_heads, head_dim, block_size, dtype, capability, interpret)
    assert {v.kernel for v in variants & unquantized} == {"reduce"}, "only the reduction reads no cache"


def fp8_half_step(values: torch.Tensor) -> torch.Tensor:
    """Half the e4m3 grid step around `values` (code units): 2^(exponent - 3) / 2, exponent >= -6."""
    exponent = torch.floor(torch.log2(values.abs().clamp(min=2.0 ** kv_quant.FP8_MIN_EXPONENT)))
    return 2.0 ** (exponent - kv_quant.FP8_MANTISSA_BITS) / 2


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 6), head_dim=st.integers(1, 48), magnitude=st.sampled_from([1e-9, 1e-3, 1.0, 50.0, 1e4]),
       zero_row=st.booleans(), seed=st.integers(0, 2**16), fp8=st.booleans())
def test_quantization_error_is_within_half_a_step(rows, head_dim, magnitude, zero_row, seed, fp8):
    cache_dtype = torch.float8_e4m3fn if fp8 else torch.int8
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, head_dim, generator=g) * magnitude * torch.rand(rows, 1, generator=g)
    if zero_row:
        x[0] = 0.0
    codes, scale = kv_quant.quantize(x, cache_dtype)
    assert codes.dtype == cache_dtype and scale.dtype == kv_quant.SCALE_DTYPE and scale.shape == (rows,)
    assert (scale.float() >= kv_quant.MIN_SCALE).all() and (scale.float() <= kv_quant.MAX_SCALE).all()
    values = codes.float()
    assert (values.abs() <= kv_quant.code_max(cache_dtype)).all() and torch.isfinite(values).all()
    if not fp8:
        assert torch.equal(values, values.round())
    if zero_row:
        assert not as_bytes(codes[0]).any(), "an all-zero row has zero codes"
    # In code units: |x / scale - code| is at most half a grid step (fp32 rounding of x / scale and of
    # the product aside: a relative 2^-22 slack).
    scale32 = scale.float()[:, None]
    step = fp8_half_step(values) if fp8 else torch.full_like(values, 0.5)
    error = (x - kv_quant.dequantize(codes, scale)).abs() / scale32
    assert (error <= step * (1 + 2.0 ** -20) + (x.abs() / scale32) * 2.0 ** -22).all()
