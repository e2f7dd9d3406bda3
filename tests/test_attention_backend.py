"""The attention backend contract (kernels/backend.py): every implementation fulfils it and
they agree through it, and a worker's backend is chosen by the cache's device unless
`QUIRE_ATTENTION_BACKEND` (or an explicit override) says otherwise."""
import importlib.util
import sys

import pytest
import torch

from quire.kernels import BACKENDS, AttentionBackend, AttentionPlan, kv_quant, select_backend
from quire.kernels.attention_ref import TorchAttentionBackend, paged_attention_ref, write_kv_ref

HAVE_TRITON = importlib.util.find_spec("triton") is not None
# Triton runs compiled on a GPU, else in its interpreter (conftest sets TRITON_INTERPRET=1).
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed (pip install 'quire[triton]')")


def triton_backend() -> AttentionBackend:
    from quire.kernels.triton_attention import TritonAttentionBackend

    return TritonAttentionBackend()


def ragged_batch(num_heads=4, num_kv_heads=2, head_dim=32, block_size=8, seed=0, device=torch.device("cpu")):
    """Fresh tokens to write and attend for requests of (cached tokens, query tokens), with the
    cached K/V already in shuffled, non-contiguous blocks. Returns the step's inputs."""
    torch.manual_seed(seed)
    shapes = [(block_size - 1, 1), (block_size, 1), (0, block_size + 3), (block_size + 5, 6), (3, 1)]
    num_blocks = sum(-(-(c + q) // block_size) for c, q in shapes) + 2
    free = torch.randperm(num_blocks).tolist()
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim)
    v_cache = torch.randn_like(k_cache)
    tables, seq_lens, starts, slots = [], [], [0], []
    for cached, q_len in shapes:
        table = [free.pop() for _ in range(-(-(cached + q_len) // block_size))]
        tables.append(table)
        seq_lens.append(cached + q_len)
        starts.append(starts[-1] + q_len)
        slots += [table[p // block_size] * block_size + p % block_size for p in range(cached, cached + q_len)]
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    num_tokens = starts[-1]
    tensors = dict(query=torch.randn(num_tokens, num_heads, head_dim),
                   key=torch.randn(num_tokens, num_kv_heads, head_dim),
                   value=torch.randn(num_tokens, num_kv_heads, head_dim), k_cache=k_cache, v_cache=v_cache,
                   block_tables=block_tables, slot_mapping=torch.tensor(slots))
    return {**{name: t.to(device) for name, t in tensors.items()}, "seq_lens": seq_lens, "query_start_loc": starts,
            "block_size": block_size, "num_heads": num_heads, "num_kv_heads": num_kv_heads, "scale": head_dim ** -0.5}


def run_step(backend: AttentionBackend, batch: dict, scales: tuple = (None, None)) -> tuple:
    """One layer's step through the contract: plan, write K/V, attend (a quantized cache with its
    `scales`, which are copied first). Returns (out, k_cache, v_cache, k_scale, v_scale)."""
    k_cache, v_cache = batch["k_cache"].clone(), batch["v_cache"].clone()
    scales = tuple(s if s is None else s.clone() for s in scales)
    plan = backend.plan(batch["block_tables"], batch["seq_lens"], batch["query_start_loc"],
                        block_size=batch["block_size"], num_heads=batch["num_heads"],
                        num_kv_heads=batch["num_kv_heads"])
    assert isinstance(plan, AttentionPlan)
    assert plan.seq_lens == batch["seq_lens"] and plan.query_start_loc == batch["query_start_loc"]
    backend.write_kv(batch["key"], batch["value"], k_cache, v_cache, batch["slot_mapping"], *scales)
    return backend.attend(batch["query"], k_cache, v_cache, plan, batch["scale"], *scales), k_cache, v_cache, *scales


def test_torch_backend_is_the_reference_through_the_contract():
    backend = TorchAttentionBackend()
    assert isinstance(backend, AttentionBackend) and backend.name == "torch"
    batch = ragged_batch()
    out, k_cache, v_cache, _, _ = run_step(backend, batch)
    expected_k, expected_v = batch["k_cache"].clone(), batch["v_cache"].clone()
    write_kv_ref(batch["key"], batch["value"], expected_k, expected_v, batch["slot_mapping"])
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
    expected = paged_attention_ref(batch["query"], expected_k, expected_v, batch["block_tables"], batch["seq_lens"],
                                   batch["query_start_loc"], batch["scale"])
    assert torch.equal(out, expected)


@needs_triton
@pytest.mark.parametrize("num_heads, num_kv_heads, block_size", [(4, 2, 8), (8, 1, 16), (2, 2, 4)])
def test_both_backends_write_the_same_cache_and_agree(num_heads, num_kv_heads, block_size):
    batch = ragged_batch(num_heads, num_kv_heads, block_size=block_size, device=DEVICE)
    backend = triton_backend()
    assert isinstance(backend, AttentionBackend) and backend.name == "triton"
    got, got_k, got_v, _, _ = run_step(backend, batch)
    expected, expected_k, expected_v, _, _ = run_step(TorchAttentionBackend(), batch)
    assert torch.equal(got_k, expected_k) and torch.equal(got_v, expected_v), "the slot writes are exact copies"
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@needs_triton
@pytest.mark.parametrize("cache_dtype", [torch.int8, torch.float8_e4m3fn], ids=["int8", "fp8_e4m3"])
def test_both_backends_quantize_the_same_cache_and_agree(cache_dtype):
    """A quantized cache through the whole contract: the Triton write stores the torch write's codes
    and scales bit for bit, and both attend over them alike."""
    batch = ragged_batch(8, 2, block_size=8, device=DEVICE)
    (k_codes, k_scale), (v_codes, v_scale) = (kv_quant.quantize(batch[c], cache_dtype) for c in ("k_cache", "v_cache"))
    batch.update(k_cache=k_codes, v_cache=v_codes)
    got = run_step(triton_backend(), batch, (k_scale, v_scale))
    expected = run_step(TorchAttentionBackend(), batch, (k_scale, v_scale))
    def bits(t):  # float8 has no equality everywhere, and -0 == 0
        return t.view(torch.uint8) if t.element_size() == 1 else t.view(torch.int16)

    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(got[1:], expected[1:])), "codes and scales"
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-5)


def test_the_cpu_kernel_writes_the_same_cache_and_agrees_with_torch():
    from quire.kernels.cpu_attention import CpuPagedAttentionBackend

    for num_heads, num_kv_heads, block_size in [(4, 2, 8), (8, 1, 16), (2, 2, 4), (6, 2, 5)]:
        batch = ragged_batch(num_heads, num_kv_heads, block_size=block_size)
        got, got_k, got_v, _, _ = run_step(CpuPagedAttentionBackend(), batch)
        expected, expected_k, expected_v, _, _ = run_step(TorchAttentionBackend(), batch)
        assert torch.equal(got_k, expected_k) and torch.equal(got_v, expected_v)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cache_dtype", [torch.int8, torch.float8_e4m3fn], ids=["int8", "fp8_e4m3"])
def test_the_cpu_kernel_quantizes_the_same_cache_and_agrees_with_torch(cache_dtype):
    from quire.kernels.cpu_attention import CpuPagedAttentionBackend

    batch = ragged_batch(8, 2, block_size=8)
    (k_codes, k_scale), (v_codes, v_scale) = (kv_quant.quantize(batch[c], cache_dtype) for c in ("k_cache", "v_cache"))
    batch.update(k_cache=k_codes, v_cache=v_codes)
    got = run_step(CpuPagedAttentionBackend(), batch, (k_scale, v_scale))
    expected = run_step(TorchAttentionBackend(), batch, (k_scale, v_scale))
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(got[1:3], expected[1:3]))
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-5)


def test_every_named_backend_implements_the_whole_contract():
    from quire.kernels.cpu_attention import CpuPagedAttentionBackend

    assert BACKENDS == ("torch", "triton", "cpu")
    with pytest.raises(TypeError):
        AttentionBackend()  # abstract: an implementation must provide plan, write_kv and attend
    implementations = [TorchAttentionBackend, CpuPagedAttentionBackend] + (
        [type(triton_backend())] if HAVE_TRITON else [])
    for cls in implementations:
        assert cls.name in BACKENDS and not getattr(cls, "__abstractmethods__", None)


def test_the_device_chooses_the_backend_without_an_override(monkeypatch):
    monkeypatch.delenv("QUIRE_ATTENTION_BACKEND", raising=False)
    # The CPU gets the C++ in-place kernel (it builds here; tests/test_cpu_attention.py covers
    # the fallback to torch when it cannot).
    assert select_backend(torch.device("cpu")).name == "cpu"
    assert select_backend("cpu", override="").name == "cpu"
    # A CUDA cache gets Triton where Triton imports (choosing needs no GPU: nothing runs).
    assert select_backend("cuda").name == ("triton" if HAVE_TRITON else "torch")


def test_the_environment_overrides_the_device(monkeypatch):
    monkeypatch.setenv("QUIRE_ATTENTION_BACKEND", " Torch ")
    assert select_backend("cuda").name == "torch"
    assert select_backend("cpu").name == "torch"
    monkeypatch.setenv("QUIRE_ATTENTION_BACKEND", "cpu")
    assert select_backend("cpu").name == "cpu"
    if HAVE_TRITON:
        monkeypatch.setenv("QUIRE_ATTENTION_BACKEND", "triton")
        assert select_backend("cpu").name == "triton"
    monkeypatch.setenv("QUIRE_ATTENTION_BACKEND", "flash")
    with pytest.raises(ValueError, match="QUIRE_ATTENTION_BACKEND must be one of"):
        select_backend("cpu")
    assert select_backend("cpu", override="torch").name == "torch", "an explicit override beats the environment"


def test_without_triton_cuda_falls_back_and_forcing_triton_fails(monkeypatch):
    monkeypatch.delenv("QUIRE_ATTENTION_BACKEND", raising=False)
    monkeypatch.setitem(sys.modules, "quire.kernels.triton_attention", None)  # its import now raises ImportError
    assert select_backend("cuda").name == "torch"
    with pytest.raises(RuntimeError, match="Triton paged-attention kernels are not built"):
        select_backend("cuda", override="triton")
