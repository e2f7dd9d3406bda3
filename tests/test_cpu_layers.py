"""The C++ layer kernels (kernels/cpu_layers.py): RMSNorm with and without the fused residual
add, SiLU-and-mul and the in-place rotary agree with the torch layers they replace (fp32 to a
few ulps, bf16/fp16 to one rounding step) on any row count, width and row stride; they keep the
torch versions' mutation contracts; and a worker on the C++ attention backend runs its model
through them while one on the torch backend does not."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quire.kernels import cpu_attention, cpu_layers
from quire.worker.models.llama import RMSNorm, silu_and_mul
from quire.worker.rotary import rotate_qk_

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module", autouse=True)
def built():
    cpu_attention.load_extension()


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """fp32: a few ulps of the values' scale; 16-bit: at most one step of the format."""
    assert got.dtype == want.dtype and got.shape == want.shape
    g, w = got.float(), want.float()
    assert torch.isfinite(g).all() == torch.isfinite(w).all()
    rel = {torch.float32: 4e-6, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}[dtype]
    torch.testing.assert_close(g, w, rtol=rel, atol=rel * max(1.0, float(w.abs().max()) if w.numel() else 1.0))


def strided_rows(rows: int, width: int, dtype: torch.dtype, seed: int, pad: int, scale: float = 1.0) -> torch.Tensor:
    """`[rows, width]` random rows inside a wider buffer: row stride `width + pad`."""
    g = torch.Generator().manual_seed(seed)
    buffer = (torch.randn(rows, width + pad, generator=g) * scale).to(dtype)
    return buffer[:, :width]


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(0, 40), width=st.sampled_from([8, 12, 64, 100, 768]), dtype=st.sampled_from(DTYPES),
       pad=st.sampled_from([0, 5]), seed=st.integers(0, 2 ** 16), residual=st.booleans())
def test_rms_norm_matches_the_torch_layer(rows, width, dtype, pad, seed, residual):
    norm = RMSNorm(width, 1e-5, dtype)
    norm.weight.data = torch.randn(width, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    x = strided_rows(rows, width, dtype, seed, pad)
    res = strided_rows(rows, width, dtype, seed + 2, pad) if residual else None
    x_torch, x_cpu = x.clone(), x.clone()
    if res is None:
        want, got = norm(x_torch), cpu_layers.rms_norm(x_cpu, norm.weight, 1e-5)
        assert torch.equal(x_cpu, x)  # the input is left untouched
    else:
        (want, want_res), (got, got_res) = norm(x_torch, res), cpu_layers.rms_norm(x_cpu, norm.weight, 1e-5, res)
        assert got_res is x_cpu  # the new residual stream is x itself, overwritten with x + residual
        assert torch.equal(got_res, want_res)  # the add is one rounding in both
    close(got, want, dtype)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(0, 40), half=st.sampled_from([8, 12, 100, 2048]), dtype=st.sampled_from(DTYPES),
       pad=st.sampled_from([0, 3]), seed=st.integers(0, 2 ** 16), scale=st.sampled_from([1.0, 30.0]))
def test_silu_and_mul_matches_the_torch_layer(rows, half, dtype, pad, seed, scale):
    gate_up = strided_rows(rows, 2 * half, dtype, seed, pad, scale)  # scale 30: exp's clamps at both ends
    before = gate_up.clone()
    got = cpu_layers.silu_and_mul(gate_up)
    assert torch.equal(gate_up, before)  # read only
    close(got, silu_and_mul(gate_up.clone()), dtype)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 30), head_dim=st.sampled_from([16, 20, 64, 128]), heads=st.integers(1, 6),
       extra=st.integers(0, 3), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2 ** 16))
def test_rotary_in_place_matches_the_torch_layer(rows, head_dim, heads, extra, dtype, seed):
    # The rotated columns are the first `heads` heads of a wider row (q and k inside a fused QKV).
    # (At least one row: a step has a token, and the torch version cannot view zero rows.)
    qkv = strided_rows(rows, (heads + extra) * head_dim, dtype, seed, 0)
    angles = torch.rand(rows, 1, head_dim, generator=torch.Generator().manual_seed(seed + 1)) * 6
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    sin[..., : head_dim // 2].neg_()  # RotaryEmbedding's signed table
    want, got = qkv.clone(), qkv.clone()
    rotate_qk_(want[:, : heads * head_dim], cos, sin)
    out = cpu_layers.rotate_qk_(got[:, : heads * head_dim], cos, sin)
    assert out.data_ptr() == got.data_ptr()  # in place
    assert torch.equal(got[:, heads * head_dim:], qkv[:, heads * head_dim:])  # other columns untouched
    close(got, want, dtype)


def test_bad_shapes_are_refused_with_the_argument_named():
    with pytest.raises(RuntimeError, match="rms_norm"):
        cpu_layers.rms_norm(torch.zeros(2, 8), torch.ones(7), 1e-5)
    with pytest.raises(RuntimeError, match="silu_and_mul"):
        cpu_layers.silu_and_mul(torch.zeros(2, 7))
    with pytest.raises(RuntimeError, match="rotate_qk"):
        cpu_layers.rotate_qk_(torch.zeros(2, 30), torch.zeros(2, 1, 16), torch.zeros(2, 1, 16))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_the_worker_swaps_in_the_layer_kernels_with_the_cpu_backend_only(tiny_checkpoint, monkeypatch, backend):
    from quire.cluster import LLM, SamplingParams

    monkeypatch.setenv("QUIRE_ATTENTION_BACKEND", backend)
    llm = LLM(model=str(tiny_checkpoint("llama-gqa4")), dtype="float32", num_kv_blocks=32)
    model = llm.engine.executor.worker.runner.model
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    assert norms and all((n.kernel is cpu_layers.rms_norm) == (backend == "cpu") for n in norms)
    mlp = model.model.layers[0].mlp
    assert (mlp.act_and_mul is cpu_layers.silu_and_mul) == (backend == "cpu")
    out = llm.generate(["hello"], SamplingParams(max_tokens=4, temperature=0.0))
    assert len(out[0].outputs[0].token_ids) == 4
