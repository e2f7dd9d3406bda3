"""Weights packed once for MKL's GEMM (`kernels.packed_gemm`) compute what `F.linear` does, for
any row count (MKL's packed layout of B does not depend on it), and a model whose projections
are packed gives the logits and tokens of the unpacked one; packing frees the originals."""
import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional

from quire.kernels.packed_gemm import PackedWeight, packing_available
from quire.worker.linear import ColumnParallelLinear, ProjectionWeight, QKVParallelLinear, RowParallelLinear
from quire.worker.models.llama import LlamaForCausalLM
from quire.worker.parallel import ParallelContext

pytestmark = pytest.mark.skipif(not packing_available(torch.zeros(1, 1)), reason="this torch has no MKL")


def close(actual, expected):
    # Summation order differs between MKL's packed and unpacked kernels (and its gemv for a row
    # or two): a few ulps of the result's scale.
    scale = expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * max(scale, 1.0))


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(0, 700), in_features=st.integers(1, 300), out_features=st.integers(1, 300),
       bias=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_a_packed_weight_computes_f_linear_for_any_row_count(rows, in_features, out_features, bias, seed):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=g)
    b = torch.randn(out_features, generator=g) if bias else None
    x = torch.randn(rows, in_features, generator=g)
    packed = PackedWeight(weight)
    close(packed.linear(x, b), functional.linear(x, weight, b))
    weight.zero_()  # the packed panels are a copy: the source may be freed or reused
    assert packed.linear(x, b).shape == (rows, out_features)


def test_one_packing_serves_every_batch_size_in_one_process():
    weight = torch.randn(384, 256)
    packed = PackedWeight(weight)
    for rows in (1, 2, 3, 7, 16, 63, 64, 65, 200, 1024, 5, 64):
        x = torch.randn(rows, 256)
        close(packed.linear(x), functional.linear(x, weight))


def test_strided_and_batched_inputs():
    weight = torch.randn(96, 64)
    packed = PackedWeight(weight)
    wide = torch.randn(10, 128)
    close(packed.linear(wide[:, ::2]), functional.linear(wide[:, ::2], weight))  # non-contiguous rows
    x = torch.randn(3, 5, 64)
    close(packed.linear(x), functional.linear(x, weight))


def test_bad_inputs_name_what_is_wrong():
    packed = PackedWeight(torch.randn(8, 16))
    with pytest.raises(ValueError, match="15 features, the weight takes 16"):
        packed.linear(torch.randn(4, 15))
    for weight in (torch.randn(8, 16, dtype=torch.bfloat16), torch.randn(2, 8, 16)):
        assert not packing_available(weight)
        with pytest.raises(ValueError, match="cannot pack"):
            PackedWeight(weight)


@pytest.mark.parametrize("make", [
    lambda ctx: ColumnParallelLinear(64, 96, True, ctx, torch.float32),
    lambda ctx: QKVParallelLinear(64, 16, 4, 2, False, ctx, torch.float32),
    lambda ctx: RowParallelLinear(96, 64, True, ctx, torch.float32),
])
def test_a_layer_packs_its_weight_and_frees_the_original(make):
    layer = make(ParallelContext())
    torch.manual_seed(0)
    for p in layer.parameters():
        p.data.normal_()
    shape = tuple(layer.weight.shape)
    x = torch.randn(9, shape[1])
    before = layer(x)
    assert layer.pack_weight() is True
    assert layer.weight is None and layer.weight_shape == shape
    close(layer(x), before)
    assert layer.pack_weight() is False, "packing twice is a no-op"


def test_a_bf16_layer_is_left_alone():
    layer = ColumnParallelLinear(64, 32, False, ParallelContext(), torch.bfloat16)
    assert layer.pack_weight() is False and layer.weight is not None and layer.packed is None


def tiny_model(tied: bool) -> LlamaForCausalLM:
    config = transformers.LlamaConfig(vocab_size=211, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                      num_key_value_heads=2, num_hidden_layers=2, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config, ParallelContext(), torch.float32, 256).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("tied", [False, True])
def test_a_packed_model_gives_the_unpacked_logits(tied):
    from quire.kernels.backend import select_backend
    from quire.worker.kv_pool import KVPool
    from quire.worker.model_runner import ModelRunner
    from quire.worker.sampler import Sampler

    model = tiny_model(tied)
    device = torch.device("cpu")
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8, 9, 10], list(range(20, 60))]

    def logits():
        pool = KVPool(model.kv_cache_spec(), num_blocks=32, block_size=4, device=device)
        runner = ModelRunner(model, ParallelContext(), device, pool, select_backend(device), Sampler(0))
        return runner.prompt_logits(prompts)

    unpacked_bytes, before = model.weight_bytes(), logits()
    embedding = model.model.embed_tokens.weight
    assert model.pack_gemm_weights() == 2 * 4 + 1, "q/k/v, o, gate/up, down per layer, and the LM head"
    assert all(m.weight is None for m in model.modules() if isinstance(m, ProjectionWeight))
    assert model.model.embed_tokens.weight is embedding, "the lookups keep the embedding table"
    head_bytes = embedding.numel() * embedding.element_size()
    assert model.weight_bytes() == unpacked_bytes + (head_bytes if tied else 0), "a tied head's panels are a copy"
    for got, want in zip(logits(), before):
        close(got, want)
        assert torch.equal(got.argmax(-1), want.argmax(-1))
